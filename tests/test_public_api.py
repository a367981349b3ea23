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


# -- issue 22: the Python compare reads data like every other function, reports print readably --

TEST = DIGITS.with_name("digits_test.npz")


def test_compare_takes_an_npz_path_with_labels_and_reports_accuracy() -> None:
    import numpy as np

    from slimgraph.runtime.metrics import evaluate, load_data

    model = sg.load(DIGITS)
    quantized = sg.quantize(model, calibration=CALIB)
    fidelity = sg.compare(model, quantized, TEST)
    data = load_data(TEST, model)
    assert fidelity.samples == 450 and fidelity.accuracy is not None
    assert fidelity.accuracy.samples == 450 and fidelity.accuracy.labels == "labels"
    assert fidelity.accuracy.reference == evaluate(model, data).accuracy
    assert fidelity.accuracy.candidate == evaluate(quantized, data).accuracy
    assert f"top-1 accuracy ('labels', 450 samples): reference {fidelity.accuracy.reference:.2%}" \
        in str(fidelity)
    # the same figures from stacked arrays (float64, as numpy makes them) under another key
    with np.load(TEST) as archive:
        arrays = {"image": archive["image"].astype(np.float64), "y": archive["labels"]}
    again = sg.compare(DIGITS, quantized, arrays, labels="y")
    assert again.accuracy is not None and again.accuracy.to_dict() == {
        **fidelity.accuracy.to_dict(), "labels": "y"}
    assert again.outputs[0].cosine == pytest.approx(fidelity.outputs[0].cosine, rel=1e-9)
    assert sg.compare(model, quantized, {"image": arrays["image"]}).accuracy is None


def test_compare_reads_data_through_the_same_reader_as_data_keywords(tmp_path: Path) -> None:
    """One reader for every function that takes data: the same file, the same message."""
    import numpy as np

    flat = tmp_path / "flat.npz"
    np.savez(flat, image=np.zeros((10, 64), np.float32), labels=np.zeros(10, np.int64))
    messages = []
    for call in (lambda: sg.compare(DIGITS, DIGITS, flat),
                 lambda: sg.quantize(DIGITS, mode="dynamic", data=flat, min_cosine=0.9),
                 lambda: sg.prune(DIGITS, ratio=0.5, data=flat, min_cosine=0.9),
                 lambda: sg.sensitivity(sg.load(DIGITS), flat)):
        with pytest.raises(sg.BadDataError) as error:
            call()
        messages.append(str(error.value))
    assert len(set(messages)) == 1, messages
    assert messages[0] == (f"{flat}: 'image' has shape [10, 64], but the model takes [N, 1, 8, "
                           "8] for it (samples stacked on axis 0); the model expects image: "
                           "float32[batch, 1, 8, 8]")


def test_python_messages_use_python_names() -> None:
    with pytest.raises(sg.BadDataError) as error:
        sg.compare(DIGITS, DIGITS, TEST, labels="label")
    assert "pass labels='labels'" in str(error.value) and "--labels" not in str(error.value)
    assert "pass --labels labels" in error.value.cli_message
    with pytest.raises(sg.VerificationError) as missed:
        sg.check_budget(sg.prune(DIGITS, ratio=0.5), sg.load(DIGITS),
                        sg.runtime.metrics.load_data(TEST, sg.load(DIGITS)), min_cosine=0.99)
    assert "< min_cosine=0.99" in str(missed.value)
    assert "< --min-cosine 0.99" in missed.value.cli_message


def test_report_objects_print_tables_and_short_reprs() -> None:
    from slimgraph.runtime.metrics import load_data

    model = sg.load(DIGITS)
    data = load_data(TEST, model)
    _, pruned = sg.prune_with_report(model, ratio=0.5, round_to=8)
    _, factorized = sg.factorize_with_report(model, rank_ratio=0.5)
    table = sg.sensitivity(model, data, method="prune")
    evaluation = sg.check_budget(model, model, data, max_drop=0.01)
    quantized = sg.quantize(model, calibration=CALIB, report=True, max_drop=0.01, data=data)
    fidelity = sg.compare(model, quantized, data)
    timed = sg.benchmark([model, quantized], sg.random_feeds(model), rounds=3, warmup=1)
    reports = [pruned, factorized, table, evaluation, sg.report_of(quantized),
               sg.budget_search_of(quantized), fidelity, data, timed]
    for report in reports:
        assert len(repr(report)) < 160, repr(report)
        assert "=" not in repr(report).split(":")[0]  # not a dataclass dump of fields
        assert "array(" not in str(report) and "Report(" not in str(report)
    assert "channels per layer:" in str(pruned) and "block1.conv1" in str(pruned)
    assert str(factorized).splitlines()[0].split()[:3] == ["layer", "op", "method"]
    assert "accuracy 99.56%" in str(evaluation)
    assert re.search(r"\d+(\.\d+)? [KM] MACs", str(table))


def test_finetune_report_and_the_command_line_say_accuracy_in_percent(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import numpy as np

    with np.load(TEST) as archive:
        small = {"image": archive["image"][:64], "labels": archive["labels"][:64]}
    pruned = sg.prune(DIGITS, ratio=0.5)
    _, report = sg.finetune_with_report(pruned, small, epochs=1, val=small, progress=False)
    before, after = report.before, report.after
    assert before is not None and after is not None
    text = str(report)
    assert f"val accuracy: {before:.2%} -> {after:.2%}" in text
    assert f"{before:.4f}" not in text  # never a fraction beside the CLI's percent
    assert repr(report).startswith("<FinetuneReport: offline, 1 epochs, val accuracy ")
    from slimgraph.tools.finetune_cmd import report_dict

    page = report_dict(report, {"input": "p.onnx"})
    assert page["summary"]["val accuracy before"] == f"{before:.2%}"
