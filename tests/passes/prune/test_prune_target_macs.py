"""`prune(target_macs=...)` honours the channel rounding; `prune --data` alone reports the
pruned model's fidelity; parameters counted as `inspect` counts them."""

from __future__ import annotations

import json

import numpy as np
import pytest

import slimgraph as sg
from slimgraph._tables import format_count
from slimgraph.api import prune as prune_api
from slimgraph.api.prune import prune_with_report
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import analysis
from slimgraph.ir.summary import summarize
from slimgraph.passes.prune import prepare_for_pruning
from slimgraph.runtime.compare import compare
from slimgraph.tools.cli import main
from tests.kit.asserts import check_valid
from tests.kit.data import DIGITS, DIGITS_TEST
from tests.kit.exports import exported_model


@pytest.fixture(scope="module")
def digits():  # noqa: ANN201
    return sg.load(DIGITS)  # channel groups of 32, 32, 64, 64 (and the logits)


@pytest.fixture(scope="module")
def rows():  # noqa: ANN201
    with np.load(DIGITS_TEST) as found:
        return {key: found[key][:48] for key in found.files}  # with labels


def _kept_rounded(report, multiple: int) -> None:
    pruned = [g for g in report.groups if g.kept < g.channels]
    assert pruned
    for group in report.groups:
        if group.reason:  # a graph output's channels, a group that cannot shrink
            assert group.kept == group.channels
        elif group.channels > multiple:
            assert group.kept % multiple == 0, (group.channels, group.kept)
        else:
            assert group.kept == group.channels  # a group no larger than the multiple stays


def test_target_macs_rounds_by_default(monkeypatch) -> None:
    monkeypatch.setattr(prune_api, "channel_multiple", lambda: 16)  # as with AVX-512
    assert prune_api.PruneOptions(target_macs=0.5, data={}).rounding == 16
    assert prune_api.PruneOptions(target_macs=0.5, data={}, round_to=1).rounding == 1


def test_target_macs_keeps_rounded_counts_and_meets_the_target(digits, rows) -> None:
    pruned, report = prune_with_report(digits, target_macs=0.5, data=rows, round_to=8)
    _kept_rounded(report, 8)
    macs = report.macs_after / report.macs_before
    assert 0.45 <= macs <= 0.5  # at most the target, and rounded steps backed off toward it
    assert analysis.parameter_count(pruned) == report.params_after
    check_valid(pruned)


def test_target_macs_round_to_larger_than_every_group_names_target_macs(digits, rows, tmp_path,
                                                                        capsys) -> None:
    with pytest.raises(BadOptionError) as raised:
        prune_with_report(digits, target_macs=0.5, data=rows, round_to=64)
    assert str(raised.value) == (
        "target_macs=0.5 with round_to=64 removes no channel (the largest prunable group has "
        "64); nothing written: use a smaller round_to")
    data, out = tmp_path / "v.npz", tmp_path / "p.onnx"
    np.savez(data, **rows)
    assert main(["prune", str(DIGITS), "-o", str(out), "--target-macs", "0.5", "--data",
                 str(data), "--round-to", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["slimgraph prune: error: --target-macs 0.5 --round-to 64 removes no channel "
                   "(the largest prunable group has 64); nothing written: use a smaller "
                   "--round-to"]
    assert not out.exists()


def test_target_macs_out_of_reach_with_rounding_says_so(digits, rows) -> None:
    with pytest.raises(UnsupportedModelError) as raised:
        prune_with_report(digits, target_macs=0.2, data=rows, round_to=32)
    assert str(raised.value).startswith(
        "target_macs=0.2 is out of reach: pruning every group at ratio 0.75 (kept counts "
        "rounded to a multiple of 32) leaves ")
    assert str(raised.value).endswith("x of the MACs; use a smaller round_to")


def test_prune_data_alone_reports_fidelity(tmp_path, capsys) -> None:
    out = tmp_path / "p.onnx"
    assert main(["prune", str(DIGITS), "-o", str(out), "--ratio", "0.5", "--data",
                 str(DIGITS_TEST), "--no-speed-check", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model, pruned = sg.load(DIGITS), sg.load(out)
    expected = compare(model, pruned, str(DIGITS_TEST))
    fidelity = result["fidelity"]
    assert fidelity == json.loads(json.dumps(expected.to_dict()))
    assert expected.accuracy is not None and expected.samples == 450
    assert main(["prune", str(DIGITS), "-o", str(out), "--ratio", "0.5", "--data",
                 str(DIGITS_TEST), "--no-speed-check"]) == 0
    text = capsys.readouterr().out
    assert "\n".join(expected.summary_lines()) in text  # the lines quantize --data prints
    _, report = prune_with_report(DIGITS, ratio=0.5, data=str(DIGITS_TEST))
    assert report.fidelity is not None
    assert report.fidelity.worst_cosine == pytest.approx(expected.worst_cosine, abs=1e-6)


def test_prune_says_why_it_counts_more_parameters_than_inspect() -> None:
    """The export builds conv biases at run time: pruning counts them folded, before and after
    (comparable), and a note gives the input's stored count, `inspect`'s."""
    resnet = exported_model("resnet")  # ResNet-18 layout, widths 8/16/32/64
    inspected = summarize(resnet).parameters
    folded = analysis.parameter_count(prepare_for_pruning(resnet))
    assert folded > inspected
    pruned, report = prune_with_report(resnet, ratio=0.5)
    assert report.params_before == folded
    assert report.params_after == summarize(pruned).parameters
    assert str(report).splitlines()[0].startswith(f"parameters: {format_count(folded)} -> ")
    assert (f"note: parameters counted with the weights the input builds at run time folded "
            f"({folded:,}); the input file stores {inspected:,}, as inspect counts them"
            ) in report.notes
