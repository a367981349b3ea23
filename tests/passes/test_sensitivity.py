"""Sensitivity tables, accuracy-aware quantization, pruning toward a MAC target, factorization
under a budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import slimgraph as sg
from slimgraph.api.prune import prune_with_report
from slimgraph.api.quantize import budget_search_of
from slimgraph.api.sensitivity import sensitivity
from slimgraph.errors import VerificationError
from slimgraph.ir.select import exact_pattern
from slimgraph.runtime.metrics import evaluate, load_data
from slimgraph.tools.cli import main

DATA = Path(sg.__file__).parent / "data"
DIGITS = DATA / "digits_cnn.onnx"
TEST = DATA / "digits_test.npz"
CALIB = DATA / "digits_calib.npz"


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    return sg.load(DIGITS)


@pytest.fixture(scope="module")
def data(model):  # noqa: ANN001, ANN201
    return load_data(TEST, model)


def test_prune_sensitivity_ranking_is_right_on_the_cnn(model, data) -> None:
    table = sensitivity(model, data, method="prune", ratio=0.5)
    changes = [row.change for row in table.rows]
    assert changes == sorted(changes) and len(table.rows) == 4
    assert all(row.macs_saved and row.macs_saved > 0 for row in table.rows)
    top, bottom = table.rows[0].node, table.rows[-1].node
    # validation: leaving the top layer out of a uniform prune keeps more than leaving the bottom
    keep_top = evaluate(sg.prune(model, ratio=0.5, exclude=[exact_pattern(top)]), data,
                        reference=model)
    keep_bottom = evaluate(sg.prune(model, ratio=0.5, exclude=[exact_pattern(bottom)]), data,
                           reference=model)
    assert keep_top.cosine > keep_bottom.cosine
    assert keep_top.accuracy > keep_bottom.accuracy


def test_quantize_sensitivity_ranking_is_right_on_the_cnn(model, data) -> None:
    table = sensitivity(model, data, method="quantize", calibration=str(CALIB))
    assert len(table.rows) == 7  # six convs and the classifier
    assert {row.node for row in table.rows} <= {node.name for node in model.graph}
    top, bottom = table.rows[0].node, table.rows[-1].node
    float_top = sg.quantize(model, calibration=str(CALIB), exclude=[exact_pattern(top)],
                            progress=False)
    float_bottom = sg.quantize(model, calibration=str(CALIB), exclude=[exact_pattern(bottom)],
                               progress=False)
    assert (evaluate(float_top, data, reference=model).cosine
            > evaluate(float_bottom, data, reference=model).cosine)


def test_sensitivity_command_prints_json_and_writes_the_report(tmp_path, capsys) -> None:
    code = main(["sensitivity", str(DIGITS), "--data", str(TEST), "--method", "factorize",
                 "--json", "--report", str(tmp_path / "rep")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "factorize" and result["metric"] == "accuracy"
    layers = result["layers"]
    assert [row["change"] for row in layers] == sorted(row["change"] for row in layers)
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    (plot,) = report["plots"]
    assert plot["kind"] == "barh"
    assert plot["series"][0]["x"] == [row["layer"] or row["node"] for row in layers]
    assert (tmp_path / "rep" / "report.txt").read_text().startswith("sensitivity to factorize")


def test_quantize_keeps_the_most_sensitive_layers_float_until_the_budget_holds(model,
                                                                              data) -> None:
    full = sg.quantize(model, calibration=str(CALIB), progress=False)
    full_cosine = evaluate(full, data, reference=model).cosine
    target = 1 - (1 - full_cosine) / 3  # three times closer to fp32 than plain int8
    mixed = sg.quantize(model, calibration=str(CALIB), data=data, min_cosine=target,
                        progress=False)
    search = budget_search_of(mixed)
    assert 1 <= len(search.kept) < 7
    assert search.evaluation.cosine >= target
    assert evaluate(mixed, data, reference=model).cosine >= target
    floats = {n.name for n in mixed.graph if n.op_type in ("Conv", "Gemm")
              and n.inputs[1].const_value is not None}
    assert floats == {layer.node for layer in search.kept}
    assert "kept float: " in search.summary() and "SQNR" in search.summary()  # issue 27
    with pytest.raises(VerificationError, match="no mix meets the accuracy budget"):
        sg.quantize(model, calibration=str(CALIB), data=data, min_cosine=1.0, progress=False)


def test_prune_to_a_mac_target_beats_the_uniform_ratio(model, data, tmp_path, capsys) -> None:
    # exact counts on both sides: the allocation against the uniform ratio, rounding aside
    # (rounded target_macs counts: tests/passes/prune/test_prune_target_macs.py)
    pruned, report = prune_with_report(model, target_macs=0.6, data=data, round_to=1)
    macs = report.macs_after / report.macs_before
    assert macs <= 0.62
    assert len(set(report.layer_ratios.values())) > 1  # non-uniform
    ours = evaluate(pruned, data, reference=model)
    # the largest uniform ratio that still keeps at least as many MACs (bisection)
    low, high = 0.0, 0.9
    for _ in range(7):
        middle = (low + high) / 2
        _, uniform_report = prune_with_report(model, ratio=middle, round_to=1)
        if uniform_report.macs_after / uniform_report.macs_before >= macs:
            low = middle
        else:
            high = middle
    uniform, uniform_report = prune_with_report(model, ratio=low, round_to=1)
    assert uniform_report.macs_after / uniform_report.macs_before >= macs
    theirs = evaluate(uniform, data, reference=model)
    assert ours.cosine > theirs.cosine
    assert "ratios per group (first producer's layer): " in str(report)
    assert set(report.layer_ratios) <= {layer.layer for layer in report.layers}  # layer names
    out = tmp_path / "p.onnx"
    assert main(["prune", str(DIGITS), "-o", str(out), "--target-macs", "0.6"]) == 2
    assert "--target-macs needs --data VAL.npz" in capsys.readouterr().err
    assert not out.exists()


def test_factorize_under_a_budget_leaves_sensitive_layers_whole(model, data, tmp_path,
                                                                capsys) -> None:
    out = tmp_path / "f.onnx"
    code = main(["factorize", str(DIGITS), "-o", str(out), "--rank-ratio", "0.5", "--data",
                 str(TEST), "--max-drop", "0.01"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "kept whole: " in stdout and "budget held (drop <= 0.01)" in stdout
    result = evaluate(sg.load(out), data)
    assert result.accuracy >= 0.9956 - 0.01
    plain = sg.factorize(model, rank_ratio=0.5)
    assert evaluate(plain, data).accuracy < 0.9956 - 0.01  # the budget did something
