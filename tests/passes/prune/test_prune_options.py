"""Options of sg.prune: criteria, scopes, round_to, exclusions, unstructured, bad input, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.api.prune import prune_with_report
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import layer_name
from slimgraph.ir.analysis import parameter_count
from slimgraph.passes.prune import kept_count, prepare_for_pruning
from slimgraph.passes.prune.channels import analyze_channels
from slimgraph.tools.cli import main
from tests.kit.asserts import check_valid
from tests.kit.exports import exported_model


def _conv_out_channels(model) -> dict[str, int]:
    return {
        layer_name(n): n.inputs[1].const_value.shape[0]
        for n in model.graph
        if n.op_type == "Conv" and n.attributes.get_int("group", 1) == 1
    }


@pytest.mark.parametrize(
    ("channels", "ratio", "round_to", "expected"),
    [(64, 0.5, None, 32), (10, 0.3, None, 7), (64, 0.3, None, 44), (3, 0.9, None, 1),
     (64, 0.3, 8, 48), (64, 0.9, 8, 8), (6, 0.5, 8, 6), (100, 0.5, 16, 48)],
)  # fmt: skip
def test_prune_kept_count(channels: int, ratio: float, round_to: int | None, expected: int) -> None:
    assert kept_count(channels, ratio, round_to) == expected


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "random"])
def test_prune_criteria_keep_half_of_every_group(criterion: str) -> None:
    model = exported_model("resnet")
    pruned, report = prune_with_report(model, ratio=0.5, criterion=criterion, round_to=1)
    for group in report.groups:
        expected = kept_count(group.channels, 0.5) if not group.reason else group.channels
        assert group.kept == expected
    assert set(_conv_out_channels(pruned).values()) == {4, 8, 16, 32}
    check_valid(pruned)


def test_prune_l1_removes_the_smallest_norm_channels() -> None:
    model = prepare_for_pruning(exported_model("mlp"))
    fc1 = next(n for n in model.graph if n.op_type == "MatMul")
    weight = fc1.inputs[1].const_value.numpy()  # (32, 128): output channels on axis 1
    order = np.argsort(np.abs(weight).sum(0))
    pruned = sg.prune(model, ratio=0.25)
    kept = next(n for n in pruned.graph if n.op_type == "MatMul").inputs[1].const_value.numpy()
    np.testing.assert_array_equal(kept, weight[:, np.sort(order[32:])])


def test_prune_global_scope_uses_one_threshold() -> None:
    model = exported_model("mobilenetv2")
    local = prune_with_report(model, ratio=0.5, round_to=1)[1]
    global_ = prune_with_report(model, ratio=0.5, scope="global", round_to=1)[1]
    prunable = [g for g in global_.groups if not g.reason]
    removed = sum(g.channels - g.kept for g in prunable)
    assert removed == int(sum(g.channels for g in prunable) * 0.5)
    assert [g.kept for g in prunable] != [g.kept for g in local.groups if not g.reason]
    assert all(g.kept >= 1 for g in prunable)


def test_prune_round_to_keeps_multiples() -> None:
    pruned, report = prune_with_report(exported_model("resnet"), ratio=0.3, round_to=8)
    for group in report.groups:
        assert group.kept == group.channels or group.kept % 8 == 0
    check_valid(pruned)


def test_prune_exclude_layer_keeps_its_channels() -> None:
    model = exported_model("resnet")
    pruned = sg.prune(model, ratio=0.5, exclude=["layer4.0.conv1"])
    channels = _conv_out_channels(pruned)
    assert channels["layer4.0.conv1"] == 64
    assert channels["layer4.1.conv1"] == 32
    weight = next(n for n in pruned.graph if layer_name(n) == "layer4.0.conv1").inputs[1]
    assert weight.const_value.shape[1] == 32  # its input channels still shrink


@pytest.mark.parametrize("pad", [False, True])
def test_prune_exclude_op_blocks_or_pads_its_inputs(pad: bool) -> None:
    model = exported_model("resnet")
    pruned, report = prune_with_report(model, ratio=0.5, exclude_ops=["Gemm"], pad=pad)
    channels = _conv_out_channels(pruned)
    # the last stage's output feeds the excluded Gemm: it stays unless padded back before it
    assert channels["layer4.1.conv2"] == (32 if pad else 64)
    assert channels["layer4.1.conv1"] == 32
    fc = next(n for n in pruned.graph if n.op_type == "Gemm")
    assert fc.inputs[1].const_value.shape == (10, 64)
    assert any(g.padded for g in report.groups) == pad
    check_valid(pruned)


def test_prune_input_model_untouched() -> None:
    model = exported_model("resnet")
    before = ir.to_proto(model).SerializeToString()  # every weight byte and attribute
    sg.prune(model, ratio=0.5)
    assert ir.to_proto(model).SerializeToString() == before


@pytest.mark.parametrize("scope", ["local", "global"])
def test_prune_unstructured_sparsity(scope: str) -> None:
    model = exported_model("resnet")
    pruned, report = prune_with_report(model, ratio=0.6, unstructured=True, scope=scope)
    total = sum(s.elements for s in report.sparsity)
    zeros = sum(s.zeros for s in report.sparsity)
    # random float weights have no ties and no zeros: exactly the smallest 60% become zero
    if scope == "local":
        assert all(s.zeros == int(s.elements * 0.6) for s in report.sparsity)
    else:
        assert zeros == int(total * 0.6)
    # counted with the conv biases the export builds at run time folded, as the result stores
    assert report.params_after == report.params_before == parameter_count(pruned) == (
        parameter_count(prepare_for_pruning(model)))
    assert any(note.startswith(f"note: the result stores {report.params_after:,} parameters")
               for note in report.notes)
    check_valid(pruned)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"ratio": 0.0}, BadOptionError, r"ratio must be strictly between 0 and 1, got 0.0"),
        ({"ratio": 1.0}, BadOptionError, r"ratio must be strictly between 0 and 1, got 1.0"),
        ({"ratio": -0.5}, BadOptionError, r"ratio must be strictly between 0 and 1"),
        ({"ratio": 0.5, "criterion": "l3"}, BadOptionError, r"criterion must be one of"),
        ({"ratio": 0.5, "scope": "layer"}, BadOptionError, r"scope must be one of"),
        ({"ratio": 0.5, "round_to": 0}, BadOptionError, r"round_to must be a positive integer"),
        ({"ratio": 0.5, "exclude": ["nolayer*"]}, BadOptionError,
         r"exclude pattern 'nolayer\*' matches no layer or node of the model"),
        ({"ratio": 0.5, "exclude_ops": ["LSTM"]}, BadOptionError, r"the model has no LSTM node"),
    ],
)  # fmt: skip
def test_prune_bad_options(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        sg.prune(exported_model("resnet"), **options)


def test_prune_nothing_prunable_names_the_reasons() -> None:
    with pytest.raises(UnsupportedModelError, match=r"nothing to prune: .*channel shuffle"):
        sg.prune(exported_model("grouped"), ratio=0.5)


def test_prune_grouped_net_reasons_in_analysis() -> None:
    model = prepare_for_pruning(exported_model("grouped"))
    analysis = analyze_channels(model.graph)
    reasons = {r for g in analysis.groups for r in g.reasons}
    assert any("channel shuffle" in r for r in reasons)
    assert any("graph output" in r for r in reasons)


def _save(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.onnx"
    sg.save(exported_model(name), path)
    return path


def test_prune_cli_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = _save(tmp_path, "resnet")
    target = tmp_path / "out.onnx"
    assert main(["prune", str(source), "-o", str(target), "--ratio", "0.5", "--round-to", "1",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert 0.25 <= data["macs_after"] / data["macs_before"] <= 0.35
    assert {g["kept"] for g in data["groups"] if not g["reason"]} == {4, 8, 16, 32}
    assert any(layer["layer"] == "conv1" and layer["after"] == 4 for layer in data["layers"])
    check_valid(sg.load(target))
    output = sg.load(source).graph.outputs[0].name
    assert main(["prune", str(source), "-o", str(target), "--ratio", "0.5", "--pad"]) == 0
    text = capsys.readouterr().out  # the logits are never padded unless named
    assert "channels per layer:" in text and "padded at" not in text
    assert "is a graph output" in text
    # the 10 logits shrink only at exact counts (the fast multiple, 16, would keep all 10)
    argv = ["prune", str(source), "-o", str(target), "--ratio", "0.5", "--round-to", "1", "--pad",
            "--prune-output"]
    assert main([*argv, output]) == 0
    text = capsys.readouterr().out
    assert "channels per layer:" in text and "padded at 1 edge(s)" in text


def test_prune_cli_unstructured_prints_sparsity(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = _save(tmp_path, "mlp")
    target = tmp_path / "sparse.onnx"
    args = ["prune", str(source), "-o", str(target), "--ratio", "0.7", "--unstructured"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "sparsity" in text and "70.0%" in text
    weights = [n.inputs[1].const_value.numpy() for n in sg.load(target).graph
               if n.op_type == "MatMul"]  # fmt: skip
    assert weights and all(abs((w == 0).mean() - 0.7) < 0.01 for w in weights)


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("resnet", ["--ratio", "1.5"], "ratio must be strictly between 0 and 1, got 1.5"),
        ("resnet", ["--ratio", "0.5", "--exclude", "missing.layer"], "matches no layer"),
        ("grouped", ["--ratio", "0.5"], "nothing to prune"),
    ],
)
def test_prune_cli_bad_input_exit_2_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str, extra: list[str], message: str
) -> None:
    source = _save(tmp_path, name)
    target = tmp_path / "out.onnx"
    assert main(["prune", str(source), "-o", str(target), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimgraph prune: error: ") and message in err
    assert not target.exists()


@pytest.mark.parametrize("scope", ["local", "global"])
def test_round_to_counts_channels_of_grouped_convolutions_in_both_scopes(scope: str) -> None:
    # AlexNet's layout: a chain of 2-group convolutions couples its channels per conv group,
    # so the group has 2 entries of 48, 192 and 128 channels; round_to=16 counts channels (each
    # entry already a multiple of 16), not the 2 entries (which would keep everything)
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 96, 3, padding=1), nn.ReLU(),
        nn.Conv2d(96, 384, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10),
    ).eval()  # fmt: skip
    model = sg.from_torch(net, (torch.randn(1, 3, 8, 8),))
    pruned, report = prune_with_report(model, ratio=0.5, round_to=16, scope=scope)
    assert {(layer.before, layer.after) for layer in report.layers if layer.before != 10} == {
        (96, 48), (384, 192), (256, 128)
    }
    check_valid(pruned)
