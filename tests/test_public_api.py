"""The Python API as a new user meets it (issue 11, item 4): models or paths everywhere, help that
points only at public names, results that print as the command line's tables, documented errors."""

from __future__ import annotations

import builtins
import inspect
import re
from pathlib import Path

import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.errors import BadOptionError
from slimgraph.tools.cli import main

DIGITS = Path(sg.__file__).parent / "data" / "digits_cnn.onnx"
CALIB = DIGITS.with_name("digits_calib.npz")

PUBLIC_FUNCTIONS = [
    name for name in sg.__all__ if inspect.isfunction(getattr(sg, name))
]  # fmt: skip


@pytest.mark.parametrize(
    "call",
    [
        lambda p: sg.quantize(p, mode="dynamic"),
        lambda p: sg.quantize(p, calibration=CALIB),
        lambda p: sg.prune(p, ratio=0.5),
        lambda p: sg.prune_with_report(p, ratio=0.5)[0],
        lambda p: sg.factorize(p, rank_ratio=0.5),
        lambda p: sg.factorize_with_report(p, rank_ratio=0.5)[0],
        lambda p: sg.convert_fp16(p),
        lambda p: sg.optimize(p),
    ],
    ids=["quantize-dynamic", "quantize-static", "prune", "prune_with_report", "factorize",
         "factorize_with_report", "convert_fp16", "optimize"],  # fmt: skip
)
@pytest.mark.parametrize("kind", ["str", "path"])
def test_every_transform_takes_a_model_or_a_path(call, kind: str) -> None:
    given = str(DIGITS) if kind == "str" else DIGITS
    out = call(given)
    assert isinstance(out, ir.Model)
    assert [str(d) for d in out.graph.outputs[0].shape] == ["batch", "10"]


def test_a_model_that_is_neither_is_one_clear_error() -> None:
    with pytest.raises(BadOptionError) as error:
        sg.quantize(42)  # type: ignore[arg-type]
    assert str(error.value) == "expected an onnx_ir.Model or the path of an .onnx file, got int"


def test_help_points_only_at_public_names() -> None:
    for name in PUBLIC_FUNCTIONS:
        doc = inspect.getdoc(getattr(sg, name)) or ""
        called = set(re.findall(r"`(?:sg\.|slimgraph\.)?([a-z_]+)\(", doc)) - set(dir(builtins))
        assert called <= set(sg.__all__), (name, called - set(sg.__all__))
    assert "`slimgraph.report_of(quantized)`" in " ".join(inspect.getdoc(sg.quantize).split())
    quantized = sg.quantize(sg.load(DIGITS), calibration=CALIB, report=True)
    assert sg.report_of(quantized) is not None


def test_public_functions_document_raises_and_stand_alone() -> None:
    for name in PUBLIC_FUNCTIONS:
        doc = inspect.getdoc(getattr(sg, name)) or ""
        assert "Raises:" in doc, name
        assert "module docstring" not in doc, name


def test_compare_prints_the_cli_table(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    model = sg.load(DIGITS)
    feeds = [sg.random_feeds(model, batch=8, seed=i) for i in range(4)]  # as `compare` draws
    quantized = sg.quantize(model, mode="dynamic")
    fidelity = sg.compare(DIGITS, quantized, feeds)
    text = str(fidelity)
    assert text.splitlines()[0].split() == [
        "output", "shape", "max", "abs", "mean", "abs", "cosine", "SQNR", "dB", "top-1"
    ]
    assert text.splitlines()[-1].startswith("worst cosine ")
    sg.save(quantized, tmp_path / "dq.onnx")
    capsys.readouterr()
    assert main(["compare", str(DIGITS), str(tmp_path / "dq.onnx")]) == 0
    assert capsys.readouterr().out.rstrip("\n").endswith(text)


def test_benchmark_prints_the_cli_table() -> None:
    model = sg.load(DIGITS)
    result = sg.benchmark([DIGITS, model], sg.random_feeds(model, batch=4), labels=["a", "b"],
                          rounds=3, warmup=1, threads=1)  # fmt: skip
    lines = str(result).splitlines()
    assert lines[0].split() == ["model", "median", "ms", "p90", "ms", "ratio", "90%", "interval"]
    assert [line.split()[0] for line in lines[2:4]] == ["a", "b"]
    assert lines[2].split()[3] == "1.00x"
    assert lines[-1].startswith("3 interleaved rounds, 1 intra-op thread(s)")


def test_float64_calibration_is_cast(caplog: pytest.LogCaptureFixture) -> None:
    import numpy as np

    with np.load(CALIB) as archive:
        images = archive["image"]
    as32 = sg.quantize(DIGITS, calibration={"image": images})
    as64 = sg.quantize(DIGITS, calibration={"image": images.astype(np.float64)})
    assert "note: calibration data: 'image' is float64; cast to float32, the model's input " \
        "type" in caplog.messages
    scales = [
        [v.const_value.numpy().tolist() for v in m.graph.initializers.values()
         if v.name and v.name.endswith("_scale")]
        for m in (as32, as64)
    ]  # fmt: skip
    assert scales[0] == scales[1] and scales[0]
