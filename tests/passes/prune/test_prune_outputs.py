"""Graph outputs keep their channels: `--pad` never prunes class logits unless they are named.

Issue 11, item 1: `Conv(3->16) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(16->10)` pruned with
`--ratio 0.5 --pad` used to zero 5 of the 10 logits (4 with `--scope global`; a ConvNeXt head the
same). Also the other pruning surprises of issue 11: which channel indices were kept, a
`--round-to` that keeps every channel, and what `--unstructured` does not buy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import slimgraph as sg
from slimgraph import runtime
from slimgraph.errors import BadOptionError
from slimgraph.passes.prune import UNSTRUCTURED_NOTE
from slimgraph.tools.cli import main
from tests.kit.asserts import assert_fed_by, assert_rewired, assert_same_outputs, check_valid
from tests.passes.prune.prune_helpers import zero_channels


def _classifier(seed: int = 0) -> ir.Model:
    """x[N,3,8,8] -> Conv(3->16) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(16->10)."""
    rng = np.random.default_rng(seed)
    inits = {
        "conv.weight": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(16).astype(np.float32),
        "fc.weight": rng.standard_normal((10, 16)).astype(np.float32),
        "fc.bias": rng.standard_normal(10).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1],
                         name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1, name="fc"),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(proto)


class _ConvNeXtTiny(torch.nn.Module):
    """A ConvNeXt stage in miniature: depthwise 7x7, channels-last LayerNorm, inverted MLP with
    GELU, residual; head: global mean, LayerNorm, Linear (the ConvNeXt classifier head)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 2, 2)
        self.dwconv = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm = torch.nn.LayerNorm(16)
        self.pw1 = torch.nn.Linear(16, 64)
        self.pw2 = torch.nn.Linear(64, 16)
        self.head_norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pw2(torch.nn.functional.gelu(self.pw1(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(self.head_norm(x.mean((2, 3))))


def _dead_logits(model: ir.Model, pruned: ir.Model) -> int:
    """Output columns that are exactly zero for every one of 64 random inputs."""
    feeds = runtime.random_feeds(model, batch=64, seed=1)
    (out,) = runtime.run(runtime.create_session(pruned, threads=1), feeds).values()
    return int((np.abs(out) == 0).all(axis=0).sum())


@pytest.mark.parametrize("scope", ["local", "global"])
def test_pad_never_prunes_the_logits(scope: str) -> None:
    model = _classifier()
    pruned, report = sg.prune_with_report(model, ratio=0.5, pad=True, scope=scope)
    assert _dead_logits(model, pruned) == 0
    assert [tuple(v.shape) for v in pruned.graph.outputs] == [tuple(v.shape) for v in
                                                              model.graph.outputs]  # fmt: skip
    head = next(g for g in report.groups if g.producers == ("fc",))
    assert (head.channels, head.kept, head.reason, head.padded) == (
        10, 10, "logits is a graph output", 0
    )
    conv = next(layer for layer in report.layers if layer.layer == "conv")
    assert (conv.before, conv.after) == (16, 8)  # the inner channels still shrink


@pytest.mark.parametrize("scope", ["local", "global"])
def test_pad_keeps_a_convnext_head(scope: str) -> None:
    torch.manual_seed(0)
    model = sg.from_torch(_ConvNeXtTiny().eval(), (torch.randn(2, 3, 16, 16),))
    pruned, report = sg.prune_with_report(model, ratio=0.5, pad=True, scope=scope)
    assert _dead_logits(model, pruned) == 0
    head = next(layer for layer in report.layers if layer.layer == "head")
    assert (head.before, head.after) == (10, 10)
    assert any(layer.after < layer.before for layer in report.layers)  # something was pruned
    assert [str(d) for d in pruned.graph.outputs[0].shape] == ["batch", "10"]


def test_named_output_is_pruned_and_padded_back_exactly() -> None:
    """Naming the output opts in: its zeroed channels are removed and padded back, exactly."""
    zeroed, _, count = zero_channels(_classifier(), 0.5, pad=True, seed=2,
                                     prune_outputs=["logits"])  # fmt: skip
    assert count == 8 + 5
    pruned, report = sg.prune_with_report(zeroed, ratio=0.5, pad=True, prune_outputs=["logits"])
    head = next(g for g in report.groups if g.producers == ("fc",))
    assert (head.kept, head.padded) == (5, 1)
    # the output is the scatter back to full size: Gather(Pad(fc's pruned output))
    fc = next(n for n in pruned.graph if n.name == "fc")
    gather = pruned.graph.outputs[0].producer()
    assert gather is not None and gather.op_type == "Gather"
    pad = assert_fed_by(gather, 0, "Pad")
    assert_rewired(pad, 0, fc.outputs[0])
    assert pruned.graph.outputs[0].name == "logits" and fc.outputs[0].name != "logits"
    check_valid(pruned)
    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    assert_same_outputs(zeroed, pruned, {"x": x})


def test_prune_output_must_name_a_graph_output() -> None:
    with pytest.raises(BadOptionError) as error:
        sg.prune(_classifier(), ratio=0.5, prune_outputs=["probs"])
    assert str(error.value) == "--prune-output 'probs' is not a graph output (outputs: logits)"


def test_report_lists_the_kept_channel_indices() -> None:
    model = _classifier()
    pruned, report = sg.prune_with_report(model, ratio=0.5)
    conv = next(layer for layer in report.layers if layer.layer == "conv")
    weight = model.graph.initializers["conv.weight"].const_value.numpy()
    expected = np.sort(np.argsort(np.abs(weight).sum(axis=(1, 2, 3)), kind="stable")[8:])
    assert conv.kept == tuple(expected.tolist())
    kept_weight = next(
        v.const_value.numpy() for v in pruned.graph.initializers.values()
        if v.const_value is not None and v.const_value.shape[1:] == (3, 3, 3)
    )  # fmt: skip
    np.testing.assert_array_equal(kept_weight, weight[list(conv.kept)])
    fc = next(layer for layer in report.layers if layer.layer == "fc")
    assert fc.kept == tuple(range(10))


def test_round_to_that_keeps_every_channel_is_an_error(tmp_path: Path, capsys) -> None:
    source = tmp_path / "m.onnx"
    sg.save(_classifier(), source)
    target = tmp_path / "p.onnx"
    args = ["prune", str(source), "-o", str(target), "--ratio", "0.5", "--round-to", "100"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "slimgraph prune: error: --ratio 0.5 --round-to 100 removes no channel (the largest "
        "prunable group has 16); nothing written: use a larger --ratio or a smaller --round-to\n"
    )
    assert not target.exists()


def test_unstructured_says_it_neither_shrinks_nor_speeds_up(tmp_path: Path, capsys) -> None:
    source = tmp_path / "m.onnx"
    sg.save(_classifier(), source)
    target = tmp_path / "p.onnx"
    assert main(["prune", str(source), "-o", str(target), "--ratio", "0.5", "--unstructured"]) == 0
    out = capsys.readouterr().out
    assert UNSTRUCTURED_NOTE in out.splitlines()
    assert UNSTRUCTURED_NOTE == (
        "note: unstructured pruning only zeroes weights: they are still stored densely, so the "
        "file does not shrink and onnxruntime runs the model no faster (it has no sparse "
        "kernels); structured pruning (without --unstructured) removes channels and does both"
    )
    assert "parameters: 618 -> 618 (1.000x)" in out
    assert main(["prune", str(source), "-o", str(target), "--ratio", "0.5", "--unstructured",
                 "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["notes"] == [UNSTRUCTURED_NOTE]


def test_pad_help_says_outputs_are_kept() -> None:
    proto = ir.to_proto(_classifier())
    onnx.checker.check_model(proto)
    from slimgraph.tools.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    assert "--prune-output NAME [NAME ...]" in text
