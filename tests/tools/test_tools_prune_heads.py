"""`slimgraph prune --heads R` (issue 20): attention heads removed from the command line, alone
or before channels; the table of blocks printed without -v; asking for heads that cannot be
removed is one line on stderr, exit 2, nothing written, the input untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from tests import models_hf
from tests.kit.asserts import output_list
from tests.kit.files import save_ir


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_ir(models_hf.exported("bert")[1], tmp_path_factory.mktemp("bert") / "bert.onnx")


def _heads(model: ir.Model) -> list[tuple[int, ...]]:
    """The [heads, head size] of every head-split Reshape target that is a constant."""
    return sorted(tuple(n.inputs[1].const_value.numpy().tolist())[-2:] for n in model.graph
                  if n.op_type == "Reshape" and n.inputs[1].const_value is not None
                  and n.inputs[1].const_value.size == 4)


def test_heads_alone_remove_half_the_heads_of_every_block(cli, bert: Path,
                                                          tmp_path: Path) -> None:
    target = tmp_path / "pruned.onnx"
    result = cli("prune", bert, "-o", target, "--heads", "0.5")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == f"wrote {target}"
    assert "attention heads (0.5 per block, l1): 8 -> 4" in lines
    rows = [line.split() for line in lines if line.startswith("model.encoder.layer.")]
    assert [row[:3] for row in rows] == [[f"model.encoder.layer.{i}.attention.self", "4", "2"]
                                         for i in (0, 1)]
    assert "groups:" not in result.out  # no channel pruning asked for
    pruned = sg.load(target)
    assert _heads(pruned) == [(2, 8)] * 6  # q, k, v of both layers: 2 heads of 8
    feed = models_hf.exported("bert")[0].feeds(3, 11, 1)
    want = output_list(models_hf.exported("bert")[1], feed)[0]
    assert output_list(pruned, feed)[0].shape == want.shape


def test_heads_then_channels_in_one_command(cli, bert: Path, tmp_path: Path) -> None:
    target = tmp_path / "pruned.onnx"
    result = cli("prune", bert, "-o", target, "--heads", "0.5", "--ratio", "0.5", "--json")
    assert result.code == 0, result.err
    data = result.json()
    assert data["heads_ratio"] == 0.5 and data["ratio"] == 0.5
    assert [(b["heads"], b["kept"], len(b["kept_heads"])) for b in data["heads"]] == [(4, 2, 2)] * 2
    ffn = [layer for layer in data["layers"] if layer["layer"].endswith("intermediate.dense")]
    assert [(layer["before"], layer["after"]) for layer in ffn] == [(64, 32)] * 2
    assert data["params_after"] < data["params_before"]
    assert 0 < data["macs_after"] < data["macs_before"]
    assert data["mac_dims"] == {"seq": 8}  # the export's sequence; the batch counts as 1


def _broken(tmp_path: Path, which: tuple[int, ...]) -> Path:
    """BERT with the attention probabilities of blocks `which` as graph outputs (not prunable)."""
    _, model = models_hf.exported("bert")
    softmaxes = [n for n in model.graph if n.op_type == "Softmax"]
    for index in which:
        model.graph.outputs.append(softmaxes[index].outputs[0])
    return save_ir(model, tmp_path / "broken.onnx")


def test_a_block_left_alone_is_printed_without_verbose(cli, tmp_path: Path) -> None:
    result = cli("prune", _broken(tmp_path, (1,)), "-o", tmp_path / "out.onnx", "--heads", "0.5")
    assert result.code == 0, result.err
    assert ("not pruned: model.encoder.layer.1.attention.self: the attention probabilities are "
            "a graph output") in result.out.splitlines()


@pytest.mark.parametrize(("make", "args", "message"), [
    ("resnet", ["--heads", "0.5"], "prune --heads 0.5: no attention block found"),
    ("broken", ["--heads", "0.5"], "prune --heads 0.5: no attention block could lose a head "
     "(model.encoder.layer.0.attention.self: the attention probabilities are a graph output; "
     "model.encoder.layer.1.attention.self: the attention probabilities are a graph output)"),
    ("bert", ["--heads", "0.2"], "prune --heads 0.2 removes no head (the largest block has 4 "
     "heads, one must stay); nothing written: use a larger --heads"),
    ("bert", ["--heads", "1"], "--heads must be strictly between 0 and 1, got 1.0"),
    ("bert", ["--heads", "0.5", "--criterion", "bn"],
     "--criterion bn does not score attention heads: use l1 or l2 with --heads"),
    ("bert", [], "give --ratio R, --target-macs R or --heads R"),
])
def test_heads_that_cannot_be_removed_are_one_line_and_exit_2(
        cli, bert: Path, tmp_path: Path, make: str, args: list[str], message: str) -> None:
    if make == "resnet":
        source = save_ir(models_hf.exported("resnet")[1], tmp_path / "resnet.onnx")
    elif make == "broken":
        source = _broken(tmp_path, (0, 1))
    else:
        source = bert
    before = source.read_bytes()
    target = tmp_path / "out.onnx"
    result = cli("prune", source, "-o", target, *args)
    assert result.code == 2
    assert result.err.strip().splitlines() == [f"slimgraph prune: error: {message}"]
    assert not target.exists() and source.read_bytes() == before


def test_python_names_the_keyword() -> None:
    _, model = models_hf.exported("bert")
    with pytest.raises(sg.errors.BadOptionError,
                       match=r"^prune\(heads=0.2\) removes no head \(the largest block has 4"):
        sg.prune(model, heads=0.2)
    pruned, report = sg.prune_with_report(model, heads=0.5)
    for block in report.heads:  # the two heads with the largest norms stay
        assert len(block.kept_heads) == 2 and set(block.kept_heads).isdisjoint(block.removed)
        assert min(block.scores[h] for h in block.kept_heads) >= max(
            block.scores[h] for h in block.removed)
    assert report.params_after < report.params_before
    assert np.isfinite(output_list(pruned, models_hf.exported("bert")[0].feeds(2, 5, 0))[0]).all()
