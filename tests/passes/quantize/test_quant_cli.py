"""`slimgraph quantize` and `slimgraph demo` end to end, in process."""

from __future__ import annotations

import json

import numpy as np
import pytest

import slimgraph as sg
from slimgraph.runtime.torch_backend import zero_shot_options
from slimgraph.tools import quantize_cmd
from slimgraph.tools.cli import main
from tests.kit.asserts import accuracy
from tests.kit.data import DIGITS, DIGITS_CALIB, digits, digits_test


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_quantize_static_writes_model_and_prints_report(tmp_path, capsys) -> None:
    out = tmp_path / "digits.int8.onnx"
    code, stdout, stderr = _run(capsys, "quantize", DIGITS, "-o", out, "--calib", DIGITS_CALIB)
    assert code == 0, stderr
    assert f"wrote {out} (static, qdq)" in stdout
    assert "worst tensors" in stdout and "output linear: cosine 0.99" in stdout
    images, labels = digits_test()
    assert accuracy(sg.load(out), images, labels) >= accuracy(digits(), images, labels) - 0.003


def test_quantize_json_and_exclude_from_printed_names(tmp_path, capsys) -> None:
    out = tmp_path / "q.onnx"
    code, stdout, _ = _run(capsys, "quantize", DIGITS, "-o", out, "--calib", DIGITS_CALIB,
                           "--json", "--method", "percentile")
    assert code == 0
    result = json.loads(stdout)
    assert result["mode"] == "static" and result["size_ratio"] < 0.3
    # sizes are the files on disk, written and read, not re-serialized models
    assert (result["size_bytes"], result["input_size_bytes"]) == (
        out.stat().st_size, DIGITS.stat().st_size)
    worst = next(t for t in result["report"]["tensors"] if t["kind"] == "weight")
    code, stdout, _ = _run(capsys, "quantize", DIGITS, "-o", out, "--calib", DIGITS_CALIB,
                           "--json", "--exclude", worst["node"])
    assert code == 0
    names = {t["node"] for t in json.loads(stdout)["report"]["tensors"] if t["kind"] == "weight"}
    assert worst["node"] not in names


def test_quantize_bad_calibration_data_exits_2_with_one_line(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((3, 1, 8, 8), np.float32))
    out = tmp_path / "q.onnx"
    code, stdout, stderr = _run(capsys, "quantize", DIGITS, "-o", out, "--calib", bad)
    assert code == 2 and not out.exists()
    assert stderr.strip().splitlines() == [
        f"slimgraph quantize: error: {bad}: its keys (pixels) do not match the model's input "
        "names (missing image; not inputs of the model: pixels); the model expects image: "
        "float32[batch, 1, 8, 8]"
    ]


def test_quantize_refuses_to_overwrite_its_input(tmp_path, capsys) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(DIGITS.read_bytes())
    code, _, stderr = _run(capsys, "quantize", model, "-o", model, "--calib", DIGITS_CALIB)
    assert code == 2 and "refusing to write over the input model" in stderr
    assert model.read_bytes() == DIGITS.read_bytes()


def test_quantize_static_without_calibration_data_is_an_error(tmp_path, capsys) -> None:
    code, _, stderr = _run(capsys, "quantize", DIGITS, "-o", tmp_path / "q.onnx", "--mode",
                           "static")
    assert code == 2 and "static quantization needs calibration data" in stderr


@pytest.mark.slow
def test_demo_tells_the_whole_story_and_writes_nothing(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = _run(capsys, "demo", "--rounds", "2", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["samples"] == 450
    fp32 = result["fp32"]["accuracy"]
    assert result["int8"]["accuracy"] >= fp32 - 0.003
    assert result["int8"]["size_bytes"] < 0.3 * result["fp32"]["size_bytes"]
    assert result["pruned"]["accuracy"] < 0.5  # pruning alone collapses
    assert result["distilled"]["accuracy"] >= fp32 - 0.01  # distillation brings it back
    assert result["distilled_int8"]["accuracy"] >= fp32 - 0.01
    assert result["distilled_int8"]["size_bytes"] < 0.1 * result["fp32"]["size_bytes"]
    assert result["int8"]["latency_ratio_batch1"] > 0 and result["written"] == []
    # the baseline is the lossless fp32 model: the raw export is the same function, not faster
    assert result["exported"]["accuracy"] == fp32
    assert result["exported"]["latency_ratio_batch1"] > 1.0
    assert result["qat"]["qat"] is True and result["distillation"]["epochs"] == 5
    assert list(tmp_path.iterdir()) == []


def test_demo_table_and_output_folder(tmp_path, capsys) -> None:
    code, stdout, _ = _run(capsys, "demo", "--rounds", "1", "--epochs", "1", "--qat-epochs", "0",
                           "-o", tmp_path)  # fmt: skip
    assert code == 0
    for label in ("fp32 (lossless)", "fp32 as exported", "int8", "pruned 0.5", "pruned + distilled",
                  "pruned + distilled + int8 QAT", "batch 1", "batch 450", "accuracy"):
        assert label in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "digits_cnn.distilled.int8.onnx", "digits_cnn.distilled.onnx", "digits_cnn.exported.onnx",
        "digits_cnn.fp32.onnx", "digits_cnn.int8.onnx", "digits_cnn.pruned.onnx",
    ]


def test_include_op_quantizes_an_op_left_float_by_default(tmp_path, capsys) -> None:
    from tests.kit.exports import exported_model

    source, data = tmp_path / "bert.onnx", tmp_path / "calib.npz"
    sg.save(exported_model("bert"), source)
    rng = np.random.default_rng(0)
    np.savez(data, input_ids=rng.integers(0, 1000, (16, 16)).astype(np.int64),
             attention_mask=np.ones((16, 16), np.int64))

    def softmax_outputs_quantized(path) -> list[bool]:
        model = sg.load(path)
        return [any(u.op_type == "QuantizeLinear" for u in n.outputs[0].consumers())
                for n in model.graph if n.op_type == "Softmax"]

    out = tmp_path / "q.onnx"
    code, _, stderr = _run(capsys, "quantize", source, "-o", out, "--calib", data)
    assert code == 0, stderr
    assert softmax_outputs_quantized(out) == [False, False]
    code, _, stderr = _run(capsys, "quantize", source, "-o", out, "--calib", data,
                           "--include-op", "Softmax")
    assert code == 0, stderr
    assert softmax_outputs_quantized(out) == [True, True]
    code, _, stderr = _run(capsys, "quantize", source, "-o", tmp_path / "r.onnx", "--calib",
                           data, "--include-op", "Conv")
    assert code == 2 and not (tmp_path / "r.onnx").exists()
    assert stderr.strip().splitlines() == [
        "slimgraph quantize: error: --include-op Conv: quantized by default already (include-op "
        "asks for ops left float: Softmax, Where, LayerNormalization, Mul, ...)"
    ]


def test_zero_shot_quantizes_without_data_and_keeps_accuracy(tmp_path, capsys) -> None:
    out = tmp_path / "zs.onnx"
    code, stdout, stderr = _run(capsys, "quantize", DIGITS, "-o", out, "--zero-shot",
                                "--zero-shot-samples", "32", "--no-progress")  # fmt: skip
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out} (static, qdq)")
    images, labels = digits_test()
    fp32 = accuracy(sg.load(DIGITS), images, labels)
    assert accuracy(sg.load(out), images, labels) >= fp32 - 0.01


def test_zero_shot_ranges_ignore_the_tails_of_synthesized_inputs(tmp_path, capsys,
                                                                monkeypatch) -> None:
    """Synthesized rows match BatchNorm's means and deviations, not real data's tails: one value
    in 16384 at 100 among digits in [0, 1] sets no range (the percentile calibrator), and `--method`
    still chooses."""
    with np.load(DIGITS_CALIB) as archive:
        rows = np.tile(archive["image"][:64], (4, 1, 1, 1))  # 16384 values
    rows[0, 0, 4, 4] = 100.0
    monkeypatch.setattr(quantize_cmd, "zero_shot_calibration",
                        lambda model, **options: {"image": rows})

    def input_scale(*extra: str) -> float:
        out = tmp_path / "zs.onnx"
        code, _, stderr = _run(capsys, "quantize", DIGITS, "-o", out, "--zero-shot",
                               "--no-progress", *extra)
        assert code == 0, stderr
        graph = sg.load(out).graph
        (node,) = [n for n in graph if n.op_type == "QuantizeLinear"
                   and n.inputs[0] is not None and n.inputs[0].name == "image"]
        return float(node.inputs[1].const_value.numpy())

    assert input_scale() < 2.0 / 255  # the digits' [0, 1]
    assert input_scale("--method", "minmax") == pytest.approx(100.0 / 255, rel=1e-3)


def test_zero_shot_options_give_python_the_ranges_of_the_cli(tmp_path, capsys,
                                                             monkeypatch) -> None:
    """`sg.quantize(model, calibration=rows, **zero_shot_options(model))` writes the scales
    `quantize --zero-shot` writes on the same rows (percentile, BatchNorm bounds), and unlike
    plain `sg.quantize` (min/max) reads no range from one value at 100 among digits in [0, 1]."""
    with np.load(DIGITS_CALIB) as archive:
        rows = np.tile(archive["image"][:64], (4, 1, 1, 1))
    rows[0, 0, 4, 4] = 100.0
    monkeypatch.setattr(quantize_cmd, "zero_shot_calibration",
                        lambda model, **options: {"image": rows})
    out = tmp_path / "zs.onnx"
    code, _, stderr = _run(capsys, "quantize", DIGITS, "-o", out, "--zero-shot", "--no-progress")
    assert code == 0, stderr

    def scales(model: sg.ir.Model) -> dict[str, float]:
        return {n.inputs[0].name: float(n.inputs[1].const_value.numpy()) for n in model.graph
                if n.op_type == "QuantizeLinear" and n.inputs[1].const_value.numpy().size == 1}

    model = sg.load(DIGITS)
    cli = scales(sg.load(out))
    python = scales(sg.quantize(model, calibration={"image": rows}, progress=False,
                                **zero_shot_options(model)))
    assert python.keys() == cli.keys()
    for name, scale in cli.items():
        assert python[name] == pytest.approx(scale, rel=1e-6), name
    plain = scales(sg.quantize(model, calibration={"image": rows}, progress=False))
    assert python["image"] < 2.0 / 255 < plain["image"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--calib", DIGITS_CALIB],
         "--zero-shot synthesizes the calibration data: leave out --calib"),
        (["--mode", "dynamic"], "--zero-shot is only used by static quantization, not --mode "
                                "dynamic"),
    ],
)
def test_zero_shot_bad_options(tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "zs.onnx"
    code, _, stderr = _run(capsys, "quantize", DIGITS, "-o", out, "--zero-shot", *extra)
    assert code == 2 and not out.exists()
    assert stderr.strip() == f"slimgraph quantize: error: {message}"


def test_zero_shot_without_batchnorm_is_one_line(tmp_path, capsys) -> None:
    folded = tmp_path / "folded.onnx"
    sg.save(sg.optimize(sg.load(DIGITS)), folded)  # BatchNorm folded into the convolutions
    code, _, stderr = _run(capsys, "quantize", folded, "-o", tmp_path / "zs.onnx", "--zero-shot")
    assert code == 2 and not (tmp_path / "zs.onnx").exists()
    assert stderr.strip() == (
        "slimgraph quantize: error: zero-shot calibration needs BatchNormalization layers (their "
        "running statistics); the model has none (calibrate with data instead)"
    )
