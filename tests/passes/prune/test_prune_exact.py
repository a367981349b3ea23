"""Exactness: removing channels whose producing weights are zero leaves the outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from slimgraph import runtime
from slimgraph.api.prune import prune, prune_with_report
from slimgraph.ir import from_torch
from slimgraph.ir.analysis import model_macs
from tests.kit.asserts import assert_same_outputs, check_valid
from tests.kit.exports import exported_model
from tests.models import _randomize_batchnorm
from tests.passes.prune.prune_helpers import zero_channels

CASES = [
    (name, pad)
    for name in ("resnet", "densenet", "mobilenetv2", "mlp", "convtranspose")
    for pad in (False, True)
] + [("grouped", True), ("bert", False), ("bert", True)]


@pytest.mark.parametrize(("name", "pad"), CASES)
def test_prune_exact_on_zeroed_channels(name: str, pad: bool) -> None:
    model = exported_model(name)
    # pad mode pads graph outputs only when they are named (the explicit path)
    outputs = [v.name for v in model.graph.outputs] if pad else []
    zeroed, analysis, count = zero_channels(model, 0.5, pad=pad, seed=1, prune_outputs=outputs)
    assert count > 0
    # the zeroed channels exactly: counts not rounded to the fast multiple
    pruned, report = prune_with_report(
        zeroed, ratio=0.5, criterion="l1", pad=pad, prune_outputs=outputs, round_to=1
    )
    assert sum(g.channels - g.kept for g in report.groups) == count
    assert report.params_after < report.params_before
    check_valid(pruned)
    feeds = runtime.random_feeds(zeroed, batch=2, seed=3)
    assert_same_outputs(zeroed, pruned, feeds)


@pytest.mark.parametrize("name", ["resnet", "densenet", "mobilenetv2", "mlp"])
def test_prune_pad_keeps_output_shapes_and_prunes_named_heads(name: str) -> None:
    model = exported_model(name)
    outputs = [v.name for v in model.graph.outputs]
    plain, plain_report = prune_with_report(model, ratio=0.5, round_to=1)
    padded, pad_report = prune_with_report(model, ratio=0.5, pad=True, prune_outputs=outputs,
                                           round_to=1)
    # a named graph output's group shrinks too, and is padded back
    assert any(g.padded for g in pad_report.groups)
    assert pad_report.params_after < plain_report.params_after
    assert [tuple(v.shape) for v in padded.graph.outputs] == [
        tuple(v.shape) for v in model.graph.outputs
    ]
    feeds = runtime.random_feeds(model, batch=2)
    got = runtime.run(runtime.create_session(padded, threads=1), feeds)
    ref = runtime.run(runtime.create_session(model, threads=1), feeds)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}


def test_prune_resnet_macs_ratio() -> None:
    model = exported_model("resnet")
    pruned = prune(model, ratio=0.5, round_to=1)
    before, after = sum(model_macs(model).values()), sum(model_macs(pruned).values())
    assert 0.25 <= after / before <= 0.35


class _GroupedBlock(torch.nn.Module):
    """conv -> BN -> ReLU -> grouped conv (4 groups) -> BN -> ReLU -> 1x1 conv -> GAP -> fc:
    the grouped conv can only lose whole groups, coupled with the channels feeding them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.gconv = torch.nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.bn2 = torch.nn.BatchNorm2d(32)
        self.head = torch.nn.Conv2d(32, 8, 1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.gconv(x)))
        return self.fc(self.head(x).mean((2, 3)))


def test_prune_grouped_conv_removes_whole_groups() -> None:
    torch.manual_seed(0)
    module = _randomize_batchnorm(_GroupedBlock()).eval()
    model = from_torch(module, (torch.randn(1, 3, 16, 16),))
    zeroed, analysis, count = zero_channels(model, 0.5, pad=False, seed=2)
    grouped = next(
        g for g in analysis.groups
        if any(n.attributes.get_int("group", 1) == 4 for n in g.producers)
    )
    assert grouped.size == 4
    assert grouped.prunable  # 4 conv groups, each = 4 stem channels + 8 grouped-conv channels
    pruned = prune(zeroed, ratio=0.5, round_to=1)
    gconv = next(n for n in pruned.graph if n.attributes.get_int("group", 1) > 1)
    assert gconv.attributes.get_int("group") == 2
    assert gconv.inputs[1].const_value.shape == (16, 4, 3, 3)
    check_valid(pruned)
    assert_same_outputs(zeroed, pruned, runtime.random_feeds(zeroed, batch=2))


def _decomposed_gelu_mlp(seed: int = 0) -> ir.Model:
    """x -> MatMul -> Add bias -> x*0.5*(1+erf(x/sqrt2)) -> MatMul -> Add: the GELU spelled out
    as older exporters write it (Div/Erf/Add/Mul with scalar constants)."""
    rng = np.random.default_rng(seed)

    def init(name: str, array: np.ndarray) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(np.asarray(array, np.float32), name)

    inits = [
        init("w1", rng.standard_normal((16, 32))), init("b1", rng.standard_normal(32)),
        init("w2", rng.standard_normal((32, 16))), init("b2", rng.standard_normal(16)),
        init("sqrt2", np.sqrt(2.0)), init("one", 1.0), init("half", 0.5),
    ]  # fmt: skip
    make = onnx.helper.make_node
    nodes = [
        make("MatMul", ["x", "w1"], ["h0"]), make("Add", ["h0", "b1"], ["h"]),
        make("Div", ["h", "sqrt2"], ["d"]), make("Erf", ["d"], ["e"]),
        make("Add", ["e", "one"], ["e1"]), make("Mul", ["h", "e1"], ["m"]),
        make("Mul", ["m", "half"], ["g"]),
        make("MatMul", ["g", "w2"], ["y0"]), make("Add", ["y0", "b2"], ["y"]),
    ]  # fmt: skip
    graph = onnx.helper.make_graph(
        nodes, "mlp",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8, 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8, 16])],
        inits,
    )  # fmt: skip
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8
    )
    return ir.from_proto(proto)


@pytest.mark.parametrize("pad", [False, True])
def test_prune_transformer_mlp_with_decomposed_gelu(pad: bool) -> None:
    outputs = ["y"] if pad else []
    zeroed, analysis, count = zero_channels(
        _decomposed_gelu_mlp(), 0.5, pad=pad, seed=4, prune_outputs=outputs
    )
    hidden = [g for g in analysis.prunable_groups if g.size == 32]
    assert len(hidden) == 1 and count == (16 + 8 if pad else 16)
    pruned = prune(zeroed, ratio=0.5, pad=pad, prune_outputs=outputs, round_to=1)
    weights = {tuple(v.const_value.shape) for v in pruned.graph.initializers.values()}
    assert {(16, 16), (16, 8) if pad else (16, 16)} <= weights
    check_valid(pruned)
    x = np.random.default_rng(0).standard_normal((2, 8, 16)).astype(np.float32)
    assert_same_outputs(zeroed, pruned, {"x": x})


@pytest.mark.parametrize("name", ["resnet", "densenet"])
def test_prune_exact_with_dynamic_batch(name: str) -> None:
    """A symbolic batch makes the flatten's Reshape shape computed; it becomes a constant."""
    from tests import models as test_models

    batch = torch.export.Dim("batch")
    model = from_torch(
        test_models.build(name), test_models.example_input(name, 2), {"x": {0: batch}}
    )
    zeroed, _, _ = zero_channels(model, 0.5, pad=False, seed=5)
    pruned, report = prune_with_report(zeroed, ratio=0.5, round_to=1)
    assert all(g.kept < g.channels for g in report.groups if "graph output" not in g.reason)
    check_valid(pruned)
    for rows in (1, 3):
        assert_same_outputs(zeroed, pruned, runtime.random_feeds(zeroed, batch=rows))


@pytest.mark.parametrize("pool", [(4, 4), (1, 5)])
def test_prune_exact_through_an_adaptive_pool_exported_as_a_window_gather(pool) -> None:
    # an adaptive pool whose size does not divide the input's (6 -> 4, 6 -> 5) is exported as a
    # Transpose, a GatherND of constant windows, a Transpose and a ReduceMean: the last conv's
    # channels pass through it (they were blocked: "GatherND ... is not understood")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(pool), torch.nn.Flatten(),
        torch.nn.Linear(64 * pool[0] * pool[1], 10),
    ).eval()  # fmt: skip
    model = from_torch(net, (torch.randn(1, 3, 12, 12),))
    assert "GatherND" in {n.op_type for n in model.graph}
    zeroed, _, count = zero_channels(model, 0.5, pad=False, seed=1)
    pruned, report = prune_with_report(zeroed, ratio=0.5, round_to=1)
    assert sum(g.channels - g.kept for g in report.groups) == count == 16 + 32
    check_valid(pruned)
    assert_same_outputs(zeroed, pruned, runtime.random_feeds(zeroed, batch=3, seed=3))


class _RowsPicked(torch.nn.Module):
    """Conv -> rows 0, 2, 4 of the feature map (a Gather on axis 2) -> Conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 8, 1)
        self.register_buffer("rows", torch.tensor([0, 2, 4]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)).index_select(2, self.rows))


def test_prune_exact_through_a_gather_of_rows() -> None:
    torch.manual_seed(0)
    model = from_torch(_RowsPicked().eval(), (torch.randn(1, 3, 6, 6),))
    assert "Gather" in {n.op_type for n in model.graph}
    zeroed, _, count = zero_channels(model, 0.5, pad=False, seed=1)
    pruned, report = prune_with_report(zeroed, ratio=0.5, round_to=1)
    assert sum(g.channels - g.kept for g in report.groups) == count == 8
    assert_same_outputs(zeroed, pruned, runtime.random_feeds(zeroed, batch=2, seed=3))
