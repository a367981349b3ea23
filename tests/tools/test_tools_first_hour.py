"""What a deployer's first hour tripped over (issue 22), through the command line's entry point:
messages that name the real problem, global options anywhere, fidelity printed by every
quantization mode with the format actually written, and figures that read the same everywhere."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import slimgraph as sg
from slimgraph.runtime.metrics import evaluate, load_data
from tests.kit.cli import run_script
from tests.kit.data import DIGITS, DIGITS_CALIB, DIGITS_TEST

EXPECTS = "the model expects image: float32[batch, 1, 8, 8]"


@pytest.fixture(scope="module")
def int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("int8") / "int8.onnx"
    sg.save(sg.quantize(DIGITS, calibration=DIGITS_CALIB, progress=False), path)
    return path


# -- item 2: messages that mislead --------------------------------------------------------------


def test_a_labels_key_typo_says_the_key_is_missing_and_lists_the_keys(cli) -> None:
    result = cli("compare", DIGITS, DIGITS, "--data", DIGITS_TEST, "--labels", "label")
    assert (result.code, result.out) == (2, "")
    assert result.err == (
        f"slimgraph compare: error: {DIGITS_TEST}: no labels key 'label' (its keys: image, "
        "labels), and 'labels' is not an input of the model: if it holds the labels, pass "
        f"--labels labels; {EXPECTS}\n"
    )


def test_a_misnamed_labels_key_in_the_file_is_named_with_the_option_to_use(cli,
                                                                           tmp_path) -> None:
    images, labels = np.load(DIGITS_TEST)["image"], np.load(DIGITS_TEST)["labels"]
    data = tmp_path / "val.npz"
    np.savez(data, image=images, target=labels)
    result = cli("quantize", DIGITS, "-o", tmp_path / "q.onnx", "--calib", DIGITS_CALIB,
                 "--data", data, "--max-drop", "0.01")
    assert result.code == 2 and not (tmp_path / "q.onnx").exists()
    assert "no labels key 'labels' (its keys: image, target)" in result.err
    assert "if it holds the labels, pass --labels target" in result.err


def test_a_wrong_shape_is_reported_as_saved_with_what_the_model_takes(cli, tmp_path) -> None:
    """(10, 64) for [N, 1, 8, 8]: calibration reads the file a slice of rows at a time, yet the
    message reports the array the user saved, not the first row it checked."""
    flat = np.load(DIGITS_CALIB)["image"][:10].reshape(10, 64)
    data = tmp_path / "flat.npz"
    np.savez(data, image=flat)
    for command in (["quantize", DIGITS, "-o", tmp_path / "q.onnx", "--calib", data],
                    ["compare", DIGITS, DIGITS, "--data", data]):
        result = cli(*command)
        assert result.code == 2
        assert result.err.endswith(
            f"error: {data}: 'image' has shape [10, 64], but the model takes [N, 1, 8, 8] for "
            f"it (samples stacked on axis 0); {EXPECTS}\n"
        ), result.err


def test_budget_messages_name_options_as_the_command_line_spells_them(cli, tmp_path) -> None:
    result = cli("quantize", DIGITS, "-o", tmp_path / "q.onnx", "--calib", DIGITS_CALIB,
                 "--max-drop", "0.01")
    assert result.err == ("slimgraph quantize: error: an accuracy budget (drop <= 0.01) needs "
                          "validation data: --data VAL.npz\n")
    with pytest.raises(sg.BadOptionError) as error:  # the same error, in Python terms
        sg.quantize(DIGITS, calibration=DIGITS_CALIB, max_drop=0.01)
    assert str(error.value) == ("an accuracy budget (drop <= 0.01) needs validation data: pass "
                                "data= (an .npz path or a dict of arrays, with 'labels' for "
                                "max_drop)")
    assert "--" not in str(error.value)


# -- item 3: global options anywhere -------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_accepted_before_or_after_the_command(tmp_path, where: str) -> None:
    """The installed console script: --debug adds the traceback wherever it is written."""
    missing = tmp_path / "missing.npz"
    command = ["quantize", DIGITS, "-o", tmp_path / "q.onnx", "--calib", missing]
    done = run_script(*(["--debug", *command] if where == "before" else [*command, "--debug"]))
    assert done.returncode == 2, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.rstrip().endswith(f"slimgraph quantize: error: {missing}: no such file")
    if where == "after":  # -v after the command too; without --debug, no traceback
        quiet = run_script(*command, "-v")
        assert quiet.returncode == 2 and "Traceback" not in quiet.stderr


# -- item 4: fidelity in every quantization mode, the format written -----------------------------


@pytest.mark.parametrize(
    ("args", "mode", "fmt", "op"),
    [
        (["--calib", DIGITS_CALIB], "static", "qdq", "QuantizeLinear"),
        (["--calib", DIGITS_CALIB, "--format", "qoperator"], "static", "qoperator",
         "QLinearConv"),
        (["--mode", "dynamic"], "dynamic", "dynamic", "MatMulInteger"),
        (["--mode", "weight-only"], "weight-only", "matmulnbits", "MatMulNBits"),
        (["--mode", "weight-only", "--format", "qdq"], "weight-only", "qdq", "DequantizeLinear"),
    ],
    ids=["static", "static-qoperator", "dynamic", "weight-only", "weight-only-qdq"],
)
def test_every_mode_reports_fidelity_and_the_format_written(cli, tmp_path, args, mode, fmt,
                                                            op) -> None:
    out = tmp_path / "q.onnx"
    data = cli("quantize", DIGITS, "-o", out, *args, "--no-progress", "--json").json()
    ops = [node.op_type for node in sg.load(out).graph]
    assert (data["mode"], data["format"]) == (mode, fmt)
    assert data["quantized_ops"][op] == ops.count(op) > 0
    fidelity = data["fidelity"]
    (output,) = fidelity["outputs"]
    assert 0.99 < output["cosine"] <= 1 and output["sqnr_db"] > 15
    assert output["top1_agreement"] is not None
    # without --data: static on its calibration data, the others on random inputs, said so
    if mode == "static":
        assert fidelity["data"].startswith("the calibration data")
    else:
        assert fidelity["data"] == "random inputs (4 batches of 8, seed 0)"
        assert fidelity["note"].startswith("figures come from random data")


@pytest.mark.parametrize("mode", ["dynamic", "weight-only"])
def test_dynamic_and_weight_only_print_fidelity_and_accuracy_on_data(cli, tmp_path,
                                                                     mode: str) -> None:
    out = tmp_path / "q.onnx"
    result = cli("quantize", DIGITS, "-o", out, "--mode", mode, "--data", DIGITS_TEST)
    assert result.code == 0, result.err
    data = load_data(DIGITS_TEST, sg.load(DIGITS))
    before, after = evaluate(sg.load(DIGITS), data).accuracy, evaluate(sg.load(out), data).accuracy
    lines = result.out.splitlines()
    assert lines[1] == f"fidelity on {DIGITS_TEST} (450 samples):"
    assert re.fullmatch(r"  output linear: cosine 0\.99\d{4}, SQNR \d+\.\d dB, top-1 agreement "
                        r"\d+\.\d\d%", lines[2]), lines[2]
    assert lines[3] == (f"  top-1 accuracy ('labels', 450 samples): reference {before:.2%}, "
                        f"candidate {after:.2%}, drop {(before - after) * 100:.2f} points")


def test_without_data_dynamic_says_its_figures_come_from_random_inputs(cli, tmp_path) -> None:
    result = cli("quantize", DIGITS, "-o", tmp_path / "q.onnx", "--mode", "dynamic")
    lines = result.out.splitlines()
    assert lines[1] == "fidelity on random inputs (4 batches of 8, seed 0):"
    assert lines[2].startswith("  note: figures come from random data")
    assert lines[3].startswith("  output linear: cosine ")


# -- item 5: figures formatted one way ------------------------------------------------------------


def test_compare_counts_samples_and_prints_cosines_with_the_same_digits(cli, int8) -> None:
    text = cli("compare", DIGITS, int8, "--data", DIGITS_TEST).out
    row = next(line.split() for line in text.splitlines() if line.startswith("linear"))
    worst = text.splitlines()[-2]
    assert row[1:3] == ["[450,", "10]"]  # all 450 samples, not one batch's shape
    assert re.fullmatch(r"0\.\d{6}", row[5])
    assert worst.startswith(f"worst cosine {row[5]}, worst SQNR {row[6]} dB (450 samples in ")
    data = cli("compare", DIGITS, int8, "--data", DIGITS_TEST, "--batch", "100", "--json").json()
    assert (data["samples"], data["batches"]) == (450, 5)
    assert data["accuracy"]["samples"] == 450


def test_sensitivity_prints_macs_with_a_unit(cli) -> None:
    text = cli("sensitivity", DIGITS, "--data", DIGITS_TEST, "--method", "prune").out
    header, _, *rows = text.splitlines()[1:]
    assert header.split()[-2:] == ["MACs", "saved"]
    for row in rows:
        assert re.search(r"  \d+(\.\d+)? [KM] MACs$", row), row
        assert re.search(r"\d+\.\d\d%  +[-+]\d+\.\d\d points", row), row


def test_target_macs_names_layers_as_every_other_table(cli, tmp_path) -> None:
    result = cli("prune", DIGITS, "-o", tmp_path / "p.onnx", "--target-macs", "0.6", "--data",
                 DIGITS_TEST, "--json")
    assert result.code == 0, result.err
    data = result.json()
    layers = {layer["layer"] for layer in data["layers"]}
    assert data["layer_ratios"] and set(data["layer_ratios"]) <= layers
    assert not any(name.startswith("node_") for name in data["layer_ratios"])
