"""Labelled metrics, compare on labels and on random data, accuracy budgets in every command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import slimgraph as sg
from slimgraph.api.budget import check_budget
from slimgraph.api.quantize import report_of
from slimgraph.errors import BadOptionError, VerificationError
from slimgraph.runtime import calibrated_ranges
from slimgraph.runtime.budget import Budget
from slimgraph.runtime.metrics import evaluate, load_data
from slimgraph.tools.cli import main

DATA = Path(sg.__file__).parent / "data"
DIGITS = DATA / "digits_cnn.onnx"
TEST = DATA / "digits_test.npz"
CALIB = DATA / "digits_calib.npz"


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def int8_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("q") / "digits.int8.onnx"
    sg.save(sg.quantize(sg.load(DIGITS), calibration=str(CALIB), progress=False), path)
    return path


def test_compare_with_labels_prints_both_accuracies_and_the_drop(int8_path, capsys) -> None:
    model, quantized = sg.load(DIGITS), sg.load(int8_path)
    data = load_data(TEST, model)
    ref_acc = evaluate(model, data).accuracy
    cand_acc = evaluate(quantized, data).accuracy
    code, out, err = _run(capsys, "compare", DIGITS, int8_path, "--data", TEST)
    assert code == 0, err
    assert (f"top-1 accuracy ('labels', 450 samples): reference {ref_acc:.2%}, candidate "
            f"{cand_acc:.2%}, drop {(ref_acc - cand_acc) * 100:.2f} points") in out
    assert "random data" not in out
    code, out, _ = _run(capsys, "compare", DIGITS, int8_path, "--data", TEST, "--json")
    result = json.loads(out)
    assert result["random_data"] is False
    assert result["accuracy"] == {"labels": "labels", "samples": 450, "reference": ref_acc,
                                  "candidate": cand_acc, "drop": pytest.approx(ref_acc - cand_acc)}


def test_compare_without_labels_key_reports_fidelity_only(int8_path, tmp_path, capsys) -> None:
    images = np.load(TEST)["image"]
    np.savez(tmp_path / "x.npz", image=images, target=np.load(TEST)["labels"])
    code, out, _ = _run(capsys, "compare", DIGITS, int8_path, "--data", tmp_path / "x.npz",
                        "--labels", "target", "--json")
    assert code == 0 and json.loads(out)["accuracy"]["samples"] == 450
    code, out, err = _run(capsys, "compare", DIGITS, int8_path, "--data", CALIB)
    assert code == 0, err
    assert "top-1 accuracy" not in out and "worst cosine" in out


def test_compare_on_random_feeds_says_so_and_uses_the_calibrated_range(int8_path,
                                                                       capsys) -> None:
    quantized = sg.load(int8_path)
    (low, high), = calibrated_ranges(quantized).values()
    images = np.load(CALIB)["image"]
    # the calibrated range is the calibration data's (min-max calibration, uint8 grid)
    assert low <= float(images.min()) + 1e-6 and high >= float(images.max()) - 1e-6
    assert high - low <= float(images.max() - images.min()) * (1 + 2 / 255) + 1e-6
    code, out, _ = _run(capsys, "compare", DIGITS, int8_path)
    assert code == 0
    assert re.search(r"note +figures come from random data, drawn uniformly from "
                     r"the calibrated input range of the quantized model \(image in \[", out)
    result = json.loads(_run(capsys, "compare", DIGITS, int8_path, "--json")[1])
    assert result["random_data"] is True and "figures come from random data" in result["note"]
    # float against float: no calibrated range, standard normal, said too
    code, out, _ = _run(capsys, "compare", DIGITS, DIGITS)
    assert "(standard-normal floats, integer inputs 0 or 1), which may lie far outside" in out
    # on the calibrated range the int8 model's fidelity is that of real data, not noise
    assert sg.compare(sg.load(DIGITS), quantized, sg.runtime.random_feeds(
        sg.load(DIGITS), batch=32, ranges=calibrated_ranges(quantized))).worst_cosine > 0.999


def test_prune_that_misses_the_budget_exits_1_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "pruned.onnx"
    code, _, err = _run(capsys, "prune", DIGITS, "-o", out, "--ratio", "0.5", "--data", TEST,
                        "--max-drop", "0.01")
    assert code == 1
    assert not out.exists() and not list(tmp_path.iterdir())
    assert re.search(r"the pruned model misses the accuracy budget on .*digits_test.npz \(450 "
                     r"samples\): accuracy 0\.\d{4} vs 0\.9956 before: drop 0\.\d{4} > "
                     r"--max-drop 0\.01; nothing written", err), err


def test_quantize_within_the_budget_exits_0_and_says_so(tmp_path, capsys) -> None:
    out = tmp_path / "q.onnx"
    code, stdout, err = _run(capsys, "quantize", DIGITS, "-o", out, "--calib", CALIB, "--data",
                             TEST, "--max-drop", "0.01")
    assert code == 0, err
    assert out.exists()
    assert re.search(r"budget held \(drop <= 0.01\) on .*digits_test.npz, 450 samples: "
                     r"accuracy 0\.99\d\d \(before 0\.9956, drop [+-]0\.00\d\d\)", stdout)
    data = load_data(TEST, sg.load(DIGITS))
    assert evaluate(sg.load(out), data).accuracy >= 0.9956 - 0.01


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-drop", "0.01", "--data", CALIB], "--max-drop needs labels: .*digits_calib.npz "
         "has no labels key"),
        (["--max-drop", "0.01"], r"needs validation data: --data VAL.npz$"),
        (["--max-drop", "2", "--data", TEST], r"--max-drop is an absolute drop as a fraction"),
    ],
)
def test_budget_options_that_cannot_work_exit_2(tmp_path, capsys, args, message) -> None:
    out = tmp_path / "q.onnx"
    code, _, err = _run(capsys, "quantize", DIGITS, "-o", out, "--calib", CALIB, *args)
    assert code == 2 and re.search(message, err), err
    assert not out.exists()


def test_data_without_a_budget_is_measured_not_refused(tmp_path, capsys) -> None:
    """prune, like quantize and factorize, measures the result on --data without a budget."""
    out = tmp_path / "p.onnx"
    code, text, err = _run(capsys, "prune", DIGITS, "-o", out, "--ratio", "0.5", "--data", TEST,
                           "--no-speed-check")
    assert code == 0, err
    assert f"fidelity on {TEST} (450 samples):" in text
    assert out.exists()


def test_calibration_and_verification_data_may_hold_labels(tmp_path) -> None:
    model = sg.load(DIGITS)
    quantized = sg.quantize(model, calibration=str(TEST), progress=False)  # labels ignored
    assert evaluate(quantized, load_data(TEST, model)).accuracy > 0.98


def test_check_budget_returns_the_evaluation_or_raises_with_the_figure() -> None:
    model = sg.load(DIGITS)
    data = load_data(TEST, model)
    pruned = sg.prune(model, ratio=0.5)
    with pytest.raises(VerificationError, match=r"output cosine 0\.\d{6} < min_cosine=0.9"):
        check_budget(pruned, model, data, min_cosine=0.9)
    evaluation = check_budget(model, model, data, max_drop=0.0, min_cosine=1.0)
    assert evaluation.drop == 0.0 and evaluation.cosine == 1.0
    with pytest.raises(BadOptionError, match="a budget needs max_drop"):
        Budget()


def test_user_metric_is_called_on_all_outputs_and_drives_the_drop() -> None:
    model = sg.load(DIGITS)
    data = load_data(TEST, model)
    seen = []

    def balanced(outputs: dict[str, np.ndarray], labels: np.ndarray | None) -> float:
        seen.append(len(labels))
        predicted = next(iter(outputs.values())).argmax(1)
        return float(np.mean([(predicted[labels == c] == c).mean() for c in range(10)]))

    evaluation = evaluate(model, data, metric=balanced, batch_size=64)
    assert seen == [450] and evaluation.metric_name == "metric"
    assert 0.99 < evaluation.metric <= 1.0
    with pytest.raises(VerificationError, match="metric"):
        check_budget(sg.prune(model, ratio=0.5), model, data, max_drop=0.01, metric=balanced)


def test_pipeline_step_max_drop_stops_the_run(tmp_path) -> None:
    model = sg.load(DIGITS)
    recipe = [{"name": "prune", "ratio": 0.5, "max_drop": 0.01}]
    with pytest.raises(VerificationError, match=r"pass 'prune' dropped accuracy on .* to "
                       r"0\.\d{4} from the input model's 0\.9956 \(drop 0\.\d{4} > "
                       r"max_drop 0.01\)"):
        sg.optimize(model, recipe=recipe, data=str(TEST))
    fine = sg.optimize(model, recipe=[{"name": "prune", "ratio": 0.05, "max_drop": 0.5}],
                       data=str(TEST))
    assert fine is not None
    out = tmp_path / "o.onnx"
    code = main(["optimize", str(DIGITS), "-o", str(out), "--recipe",
                 str(_recipe(tmp_path)), "--data", str(TEST), "--max-drop", "0.01"])
    assert code == 1 and not out.exists()


def _recipe(folder: Path) -> Path:
    path = folder / "recipe.json"
    path.write_text(json.dumps(["lossless", {"name": "prune", "ratio": 0.5}]))
    return path


@pytest.mark.parametrize("mode", ["static", "dynamic", "weight-only"])
def test_quantize_exclude_that_matches_nothing_is_an_error(mode) -> None:
    calibration = str(CALIB) if mode == "static" else None
    with pytest.raises(BadOptionError, match=r"^exclude pattern 'block9\.\*' matches no layer "
                       "or node of the model$"):
        sg.quantize(sg.load(DIGITS), calibration=calibration, mode=mode, exclude=["block9.*"])


def test_report_names_the_nodes_whose_exclusion_keeps_each_tensor_float() -> None:
    model = sg.load(DIGITS)
    quantized = sg.quantize(model, calibration=str(CALIB), report=True, progress=False)
    baseline = sg.runtime.model_bytes(sg.quantize(model, calibration=str(CALIB), progress=False))
    rows = [r for r in report_of(quantized).rows if r.kind == "activation"]
    assert {r.op_type for r in rows} <= {"Conv", "Gemm", "Add"}  # never a Reshape
    mean = next(r for r in rows if r.tensor == "mean")  # read by the classifier via a Reshape
    assert mean.exclude == ("node_linear",)
    for row in rows:
        again = sg.quantize(model, calibration=str(CALIB), exclude=list(row.exclude),
                            progress=False)
        assert sg.runtime.model_bytes(again) != baseline, row
        quantized_inputs = {n.inputs[0].name for n in again.graph if n.op_type == "QuantizeLinear"}
        assert row.tensor not in quantized_inputs, row

