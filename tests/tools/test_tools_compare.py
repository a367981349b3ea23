"""`slimgraph compare`: identical models, a perturbed weight checked against numpy, zoo/torch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from slimgraph import ir as sg_ir
from slimgraph import runtime
from tests.kit.data import DIGITS, DIGITS_CALIB, zoo
from tests.kit.exports import exported_model
from tests.kit.files import save_ir, save_proto
from tests.kit.graphs import single_op_model


def perturbed_digits(tmp_path: Path, scale: float) -> Path:
    """digits_cnn with Gaussian noise of `scale` x std added to the fc weight."""
    proto = onnx.load(DIGITS)
    index = next(i for i, t in enumerate(proto.graph.initializer) if t.name == "fc.weight")
    weight = numpy_helper.to_array(proto.graph.initializer[index])
    noise = np.random.default_rng(1).standard_normal(weight.shape) * scale * weight.std()
    noisy = (weight + noise).astype(np.float32)
    proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(noisy, "fc.weight"))
    return save_proto(proto, tmp_path / f"noisy_{scale}.onnx")


def small_calib(tmp_path: Path, count: int = 64) -> tuple[Path, np.ndarray]:
    with np.load(DIGITS_CALIB) as archive:
        images = archive["image"][:count]
    path = tmp_path / "calib.npz"
    np.savez(path, image=images)
    return path, images


def expected_fidelity(ref: Path, cand: Path, images: np.ndarray) -> dict[str, float]:
    """The statistics computed directly with onnxruntime and numpy over all samples at once."""
    outputs = []
    for path in (ref, cand):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"image": images})[0].astype(np.float64))
    r, c = outputs
    err = r - c
    return {
        "max_abs_error": float(np.abs(err).max()),
        "mean_abs_error": float(np.abs(err).mean()),
        "cosine": float((r * c).sum() / (np.linalg.norm(r) * np.linalg.norm(c))),
        "sqnr_db": float(10 * np.log10((r**2).sum() / (err**2).sum())),
        "top1_agreement": float((r.argmax(1) == c.argmax(1)).mean()),
    }


def test_compare_model_with_itself(cli) -> None:
    result = cli("compare", DIGITS, DIGITS, "--json")
    assert result.code == 0 and result.err == ""
    data = result.json()
    assert data["samples"] == 32 and data["batches"] == 4  # default: 4 random batches of 8
    (output,) = data["outputs"]
    assert output["name"] == "linear" and output["shape"] == [32, 10]  # all rows, stacked
    assert output["sqnr_db"] == "inf"  # strict JSON: no Infinity token
    assert output["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert output["max_abs_error"] == 0.0 and output["mean_abs_error"] == 0.0
    assert output["top1_agreement"] == 1.0
    text = cli("compare", DIGITS, DIGITS).out
    row = next(line for line in text.splitlines() if line.startswith("linear"))
    assert row.split() == ["linear", "[32,", "10]", "0", "0", "1.000000", "inf", "100.00%"]


def test_compare_perturbed_weight_on_data_matches_numpy(cli, tmp_path) -> None:
    data_path, images = small_calib(tmp_path)
    noisy = perturbed_digits(tmp_path, scale=0.05)
    result = cli("compare", DIGITS, noisy, "--data", data_path, "--batch", "16", "--json")
    assert result.code == 0, result.err
    data = result.json()
    assert data["samples"] == 64 and data["batches"] == 4  # 64 samples in batches of 16
    (output,) = data["outputs"]
    expected = expected_fidelity(DIGITS, noisy, images)
    for key, value in expected.items():
        assert output[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert 10 < output["sqnr_db"] < 60  # a real but small error
    assert output["cosine"] < 1.0


def test_compare_more_noise_lowers_sqnr(cli, tmp_path) -> None:
    """10x the noise amplitude costs about 20 dB."""
    data_path, _ = small_calib(tmp_path)
    sqnr = {}
    for scale in (0.01, 0.1):
        noisy = perturbed_digits(tmp_path, scale)
        data = cli("compare", DIGITS, noisy, "--data", data_path, "--json").json()
        sqnr[scale] = data["outputs"][0]["sqnr_db"]
    assert sqnr[0.01] - sqnr[0.1] == pytest.approx(20.0, abs=1.0)


def test_compare_random_feeds_follow_seed(cli, tmp_path) -> None:
    noisy = perturbed_digits(tmp_path, scale=0.05)
    args = ("compare", DIGITS, noisy, "--samples", "2", "--batch", "3", "--json")
    first = cli(*args, "--seed", "5").json()
    again = cli(*args, "--seed", "5").json()
    other = cli(*args, "--seed", "6").json()
    assert first == again
    assert first["outputs"][0]["sqnr_db"] != other["outputs"][0]["sqnr_db"]
    # The documented feeds: random_feeds(reference, batch, seed + i) for i in range(samples).
    model = sg_ir.load(DIGITS)
    batches = [runtime.random_feeds(model, batch=3, seed=5 + i)["image"] for i in (0, 1)]
    images = np.concatenate(batches)
    expected = expected_fidelity(DIGITS, noisy, images)
    assert first["outputs"][0]["sqnr_db"] == pytest.approx(expected["sqnr_db"], rel=1e-5)


def test_compare_zoo_model_with_itself(cli) -> None:
    path = zoo("squeezenet")
    data = cli("compare", path, path, "--samples", "1", "--batch", "1", "--json").json()
    (output,) = data["outputs"]
    assert output["shape"] == [1, 1000, 1, 1]  # rank 4: not class scores, so no top-1
    assert output["sqnr_db"] == "inf" and output["top1_agreement"] is None


def test_compare_torch_model_with_int_inputs(cli, tmp_path) -> None:
    """bert takes int64 input_ids and attention_mask; random feeds fit both."""
    path = save_ir(exported_model("bert"), tmp_path / "bert.onnx")
    data = cli("compare", path, path, "--samples", "1", "--json").json()
    assert data["outputs"] and all(o["sqnr_db"] == "inf" for o in data["outputs"])


def test_compare_models_with_different_inputs(cli, tmp_path) -> None:
    other = save_proto(single_op_model("MatMul", [1, 5], [5, 3]), tmp_path / "mm.onnx")
    result = cli("compare", DIGITS, other)
    assert result.code == 2 and result.out == ""
    assert result.err.count("\n") == 1
    assert "takes different inputs" in result.err
    assert "x: float32[1, 5] vs image: float32[batch, 1, 8, 8]" in result.err


def test_compare_text_reports_worst_values(cli, tmp_path) -> None:
    data_path, images = small_calib(tmp_path)
    noisy = perturbed_digits(tmp_path, scale=0.05)
    text = cli("compare", DIGITS, noisy, "--data", data_path).out
    expected = expected_fidelity(DIGITS, noisy, images)
    assert f"data       {data_path} (64 samples)" in text
    worst = text.strip().splitlines()[-1]
    assert worst.endswith("(64 samples in 1 run)")  # default batch: 64 rows per run
    assert worst.startswith("worst cosine ")
    reported_sqnr = float(worst.split("worst SQNR ")[1].split()[0])
    assert reported_sqnr == pytest.approx(expected["sqnr_db"], rel=1e-3)
    assert math.isfinite(reported_sqnr)


def test_a_labels_key_given_must_be_in_the_data(cli, tmp_path) -> None:
    # once silently ignored: the figures printed without the accuracy asked for
    data_path, _ = small_calib(tmp_path)
    without = cli("compare", DIGITS, DIGITS, "--labels", "NOSUCH")
    assert (without.code, without.out) == (2, "")
    assert without.err == ("slimgraph compare: error: --labels NOSUCH names the labels key of "
                           "--data: give --data DATA.npz\n")
    missing = cli("compare", DIGITS, DIGITS, "--data", data_path, "--labels", "NOSUCH")
    assert (missing.code, missing.out) == (2, "")
    assert missing.err == (f"slimgraph compare: error: {data_path}: labels key 'NOSUCH' is not "
                           "there (its keys: image)\n")
    fed = cli("compare", DIGITS, DIGITS, "--data", data_path, "--labels", "image")
    assert fed.code == 2 and fed.err.endswith("labels key 'image' is an input of the model\n")
    labelled = cli("compare", DIGITS, DIGITS, "--data", DIGITS.with_name("digits_test.npz"),
                   "--labels", "labels")  # fmt: skip
    assert labelled.code == 0 and "top-1 accuracy ('labels', 450 samples)" in labelled.out
