"""`slimgraph factorize`: table and JSON output, atomic write, exit codes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import slimgraph as sg
from slimgraph.runtime.metrics import evaluate, load_data
from slimgraph.tools.cli import main
from tests.kit.data import DIGITS, DIGITS_TEST
from tests.kit.exports import exported_model


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lowrank_cli")
    path = folder / "mlp.onnx"
    sg.save(exported_model("mlp"), path)
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", x=rng.standard_normal((3, 8, 32)).astype(np.float32))
    return path


def test_table_with_data_and_the_written_model(
    mlp_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = mlp_file.read_bytes()
    out = tmp_path / "small.onnx"
    data = mlp_file.parent / "data.npz"
    code = main(["factorize", str(mlp_file), "-o", str(out), "--rank-ratio", "0.25",
                 "--include", "blocks.*", "--data", str(data)])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text
    for layer in ("blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"):
        assert layer in text
    assert "factorized 4 layers, skipped 0" in text
    assert "worst cosine" in text and "(3 samples in 1 run)" in text  # all of --data
    assert mlp_file.read_bytes() == before  # input untouched
    written = sg.load(out)
    ops = [node.op_type for node in written.graph if node.op_type == "MatMul"]
    assert len(ops) == 9  # 4 layers split in two, the head kept


def test_data_measures_fidelity_and_accuracy_on_all_of_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # once measured on the first 8 rows of --data, without the accuracy quantize --data prints
    out = tmp_path / "small.onnx"
    code = main(["factorize", str(DIGITS), "-o", str(out), "--rank-ratio", "0.5", "--data",
                 str(DIGITS_TEST), "--json"])  # fmt: skip
    assert code == 0
    fidelity = json.loads(capsys.readouterr().out)["fidelity"]
    values = load_data(DIGITS_TEST, sg.load(DIGITS))
    assert fidelity["samples"] == values.samples == 450
    accuracy = evaluate(sg.load(out), values).accuracy
    assert fidelity["accuracy"]["candidate"] == pytest.approx(accuracy, abs=1e-12)
    assert fidelity["accuracy"]["reference"] == pytest.approx(
        evaluate(sg.load(DIGITS), values).accuracy, abs=1e-12)
    code = main(["factorize", str(DIGITS), "-o", str(tmp_path / "again.onnx"), "--rank-ratio",
                 "0.5", "--data", str(DIGITS_TEST)])  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("outputs:    worst cosine ") and "(450 samples in " in line
               for line in lines)
    assert any(line.startswith("accuracy:   top-1 accuracy ('labels', 450 samples): reference ")
               for line in lines)


def test_json_report(mlp_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "small.onnx"
    code = main(["factorize", str(mlp_file), "-o", str(out), "--rank", "8", "--json",
                 "--exclude", "head", "--op-types", "MatMul"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["factorized"] == 4 and report["skipped_count"] == 0
    assert {layer["rank"][0] for layer in report["layers"]} == {8}
    assert all(layer["params_after"] == 8 * (32 + 128) for layer in report["layers"])
    assert report["params_after"] < report["params_before"]
    assert report["options"]["rank"] == 8


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--rank-ratio", "0"], r"--rank-ratio must be in \(0, 1\], got 0.0"),
        (["--energy", "1.2"], r"--energy must be in \(0, 1\], got 1.2"),
        (["--rank", "many"], "--rank must be 'auto' or an integer, got 'many'"),
        (["--rank", "auto", "--include", "encoder.*"], "include pattern 'encoder.*' matches no"),
        (["--rank-ratio", "0.5", "--op-types", "LSTM"], "cannot factorize op type 'LSTM'"),
    ],
)
def test_bad_options_exit_2_with_one_line(
    mlp_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    message: str,
) -> None:
    out = tmp_path / "never.onnx"
    assert main(["factorize", str(mlp_file), "-o", str(out), *arguments]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimgraph factorize: error: ")
    assert len(err.splitlines()) == 1
    assert re.search(message, err)
    assert not out.exists()


def test_refuses_to_write_over_the_input(
    mlp_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = mlp_file.read_bytes()
    assert main(["factorize", str(mlp_file), "-o", str(mlp_file), "--rank-ratio", "0.5"]) == 2
    assert "refusing to write over the input model" in capsys.readouterr().err
    assert mlp_file.read_bytes() == before


def test_method_cp_without_kxk_convs_is_one_line_exit_2(
    mlp_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cp.onnx"
    code = main(["factorize", str(mlp_file), "-o", str(out), "--method", "cp", "--rank", "4"])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert err == ("slimgraph factorize: error: --method cp splits convolutions with a KxK "
                   "kernel: the model has none selected (no Conv whose weight is 4-D with a "
                   "kernel larger than 1x1)")


def test_target_macs_without_data_is_one_line_exit_2(
    mlp_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "t.onnx"
    code = main(["factorize", str(mlp_file), "-o", str(out), "--target-macs", "0.5"])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert err == ("slimgraph factorize: error: --target-macs needs --data VAL.npz "
                   "(per-layer sensitivity)")
