"""Bad input through the command line: exit 2, one stderr line naming the problem, no output."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from slimgraph import ir as sg_ir
from tests.kit.cli import run_script
from tests.kit.data import DIGITS, DIGITS_CALIB
from tests.kit.files import folder_state, save_ir

EXPECTS = "the model expects image: float32[batch, 1, 8, 8]"


def bad_model(kind: str, folder: Path) -> Path:
    """A file that is not a usable ONNX model."""
    path = folder / f"{kind}.onnx"
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(DIGITS.read_bytes()[: DIGITS.stat().st_size // 2])
    elif kind == "text":
        path.write_text("this is not an ONNX model\n")
    elif kind == "npz":
        with path.open("wb") as file:
            np.savez(file, image=np.zeros((2, 1, 8, 8), np.float32))
    elif kind == "folder":
        path.mkdir()
    return path


BAD_MODELS = {
    "missing": "no such file",
    "empty": "empty file, not an ONNX model",
    "truncated": "not a readable ONNX model",
    "text": "not a readable ONNX model",
    "npz": "not a readable ONNX model",
    "folder": "not a regular file",
}


def command_lines(bad: Path) -> dict[str, list[object]]:
    """Each command with the bad model in each of its model positions."""
    return {
        "inspect": ["inspect", bad],
        "inspect-json": ["inspect", bad, "--json"],
        "diff-a": ["diff", bad, DIGITS],
        "diff-b": ["diff", DIGITS, bad, "--json"],
        "compare-ref": ["compare", bad, DIGITS],
        "compare-cand": ["compare", DIGITS, bad, "--json"],
        "bench-first": ["bench", bad, DIGITS],
        "bench-second": ["bench", DIGITS, bad, "--json"],
    }


def assert_one_line_error(result, command: str, *needles: str) -> None:
    assert result.code == 2, (result.code, result.err)
    assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(f"slimgraph {command}: error: "), lines[0]
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("kind", sorted(BAD_MODELS))
@pytest.mark.parametrize("position", sorted(command_lines(Path("x"))))
def test_bad_model_file(cli, tmp_path, kind, position) -> None:
    bad = bad_model(kind, tmp_path)
    before = folder_state(tmp_path)
    args = command_lines(bad)[position]
    result = cli(*args)
    assert_one_line_error(result, str(args[0]), str(bad), BAD_MODELS[kind])
    assert folder_state(tmp_path) == before


# ---------------------------------------------------------------- data files for compare


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    with path.open("wb") as file:
        np.savez(file, **arrays)
    return path


def images(count: int = 10) -> np.ndarray:
    with np.load(DIGITS_CALIB) as archive:
        return archive["image"][:count]


def with_value(value: float) -> np.ndarray:
    data = images()
    data[3, 0, 2, 2] = value
    return data


BAD_DATA = {
    "wrong-name": (lambda: {"img": images()},
                   ["its keys (img) do not match the model's input names", "missing image"]),
    "extra-name": (  # a misnamed labels key: said so, with the option that names it
        lambda: {"image": images(), "label": np.zeros(10, np.int64)},
        ["no labels key 'labels' (its keys: image, label)", "pass --labels label"],
    ),
    "wrong-dtype": (lambda: {"image": images().astype(np.int32)}, ["'image' is int32"]),
    "wrong-shape": (lambda: {"image": images()[:, :, :4, :]},
                    ["'image' has shape [10, 1, 4, 8], but the model takes [N, 1, 8, 8]"]),
    "wrong-rank": (lambda: {"image": images()[:, 0]},
                   ["'image' has shape [10, 8, 8], but the model takes [N, 1, 8, 8]"]),
    "nan": (lambda: {"image": with_value(np.nan)}, ["'image' contains NaN or Inf in row 3 "]),
    "inf": (lambda: {"image": with_value(-np.inf)}, ["'image' contains NaN or Inf in row 3 "]),
}


@pytest.mark.parametrize("kind", sorted(BAD_DATA))
def test_bad_data_file(cli, tmp_path, kind) -> None:
    make, needles = BAD_DATA[kind]
    data = write_npz(tmp_path / f"{kind}.npz", **make())
    before = folder_state(tmp_path)
    result = cli("compare", DIGITS, DIGITS, "--data", data)
    assert_one_line_error(result, "compare", str(data), *needles)
    assert result.err.rstrip().endswith(EXPECTS)  # the message says what would fit
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("kind", ["missing", "junk", "npy"])
def test_unreadable_data_file(cli, tmp_path, kind) -> None:
    path = tmp_path / f"{kind}.npz"
    if kind == "junk":
        path.write_text("not a zip archive")
    elif kind == "npy":
        with path.open("wb") as file:
            np.save(file, images())
    result = cli("compare", DIGITS, DIGITS, "--data", path, "--json")
    assert_one_line_error(result, "compare", str(path))


def test_bad_dim_option(cli) -> None:
    result = cli("inspect", DIGITS, "--dim", "batch")
    assert_one_line_error(result, "inspect", "--dim 'batch': expected NAME=VALUE")


# ---------------------------------------------------------------- models onnxruntime rejects


def unknown_op_model(folder: Path) -> Path:
    node = onnx.helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery")
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    path = folder / "unknown_op.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("command", ["compare", "bench"])
def test_model_onnxruntime_cannot_load(cli, tmp_path, command) -> None:
    path = unknown_op_model(tmp_path)
    result = cli(command, path, path)
    assert_one_line_error(result, command, str(path), "onnxruntime cannot load the model")
    # inspect needs no runtime: it still describes the model.
    data = cli("inspect", path, "--json").json()
    assert data["ops"] == {"NoSuchOp": 1}


# ---------------------------------------------------------------- external data attacks (CLI side)


def external_copy(folder: Path) -> Path:
    folder.mkdir()
    return save_ir(sg_ir.load(DIGITS), folder / "model.onnx", external_data=True)


def edit_locations(model: Path, **fields: str) -> None:
    """Set external-data fields of the first external initializer."""
    proto = onnx.load(model, load_external_data=False)
    tensor = next(
        t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    )
    entries = {e.key: e.value for e in tensor.external_data} | fields
    del tensor.external_data[:]
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    model.write_bytes(proto.SerializeToString())


def attack(kind: str, tmp_path: Path) -> tuple[Path, str]:
    model = external_copy(tmp_path / "model")
    data = model.with_name("model.onnx.data")
    if kind == "parent":
        shutil.copy(data, tmp_path / "outside.data")
        edit_locations(model, location="../outside.data")
        return model, "'..' is not allowed"
    if kind == "absolute":
        edit_locations(model, location=str(data))
        return model, "absolute paths are not allowed"
    if kind == "symlink":
        target = tmp_path / "elsewhere.data"
        data.rename(target)
        data.symlink_to(target)
        return model, "symlink"
    if kind == "hardlink":
        os.link(data, tmp_path / "second_name.data")
        return model, "hardlinked files are not allowed"
    if kind == "past-end":
        edit_locations(model, offset=str(data.stat().st_size))
        return model, "past the end of the file"
    if kind == "length":
        edit_locations(model, length="4")
        return model, "does not match its shape"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["parent", "absolute", "symlink", "hardlink", "past-end", "length"]
)
@pytest.mark.parametrize("command", ["inspect", "compare"])
def test_external_data_attacks(cli, tmp_path, kind, command) -> None:
    model, needle = attack(kind, tmp_path)
    before = folder_state(tmp_path)
    args = ["inspect", model] if command == "inspect" else ["compare", DIGITS, model]
    result = cli(*args)
    assert_one_line_error(result, command, str(model), needle)
    assert folder_state(tmp_path) == before


# ---------------------------------------------------------------- the real console script


def test_console_script_bad_model(tmp_path) -> None:
    bad = bad_model("truncated", tmp_path)
    done = run_script("inspect", bad)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"slimgraph inspect: error: {bad}: not a readable ONNX model")


def test_console_script_bad_data_and_debug(tmp_path) -> None:
    data = write_npz(tmp_path / "nan.npz", image=with_value(np.nan))
    done = run_script("compare", DIGITS, DIGITS, "--data", data)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"slimgraph compare: error: {data}: 'image' contains NaN or Inf")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    debug = run_script("--debug", "compare", DIGITS, DIGITS, "--data", data)
    assert debug.returncode == 2 and "Traceback" in debug.stderr  # --debug shows where


def test_console_script_success_and_usage(tmp_path) -> None:
    done = run_script("inspect", DIGITS, "--json")
    assert done.returncode == 0 and '"parameters": 112682' in done.stdout
    usage = run_script("inspect")  # argparse: missing MODEL is bad usage
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    assert "the following arguments are required: MODEL" in usage.stderr


def test_data_that_does_not_fit_is_refused_before_anything_is_written(cli, tmp_path) -> None:
    data = write_npz(tmp_path / "short.npz", image=images(4), labels=np.zeros(3, np.int64))
    before = folder_state(tmp_path)
    result = cli("quantize", DIGITS, "-o", tmp_path / "q.onnx", "--calib", DIGITS_CALIB,
                 "--data", data)
    assert_one_line_error(result, "quantize", f"{data}: 3 labels for 4 samples")
    assert folder_state(tmp_path) == before


@pytest.mark.parametrize("command", ["compare", "quantize"])
def test_labels_outside_the_models_classes_are_refused(cli, tmp_path, command: str) -> None:
    """Every row would count wrong: 0% for both models, a drop of 0 that passes any budget."""
    data = write_npz(tmp_path / "far.npz", image=images(4), labels=np.arange(10, 14))
    before = folder_state(tmp_path)
    target = ["-o", tmp_path / "q.onnx", "--calib", DIGITS_CALIB] if command == "quantize" else [
        DIGITS]
    result = cli(command, DIGITS, *target, "--data", data)
    assert_one_line_error(result, command, f"{data}: labels range over 10..13, but the model "
                                           "outputs 10 class scores")
    assert folder_state(tmp_path) == before


def test_a_command_failing_after_writing_leaves_no_output(cli, tmp_path, monkeypatch) -> None:
    """A failure found only after OUT was written (here compare's, on the written model)
    removes OUT: a failed command leaves nothing behind."""
    from slimgraph.errors import BadDataError
    from slimgraph.tools import quantize_cmd

    def fail(*args: object, **kwargs: object) -> None:
        raise BadDataError("late failure")

    monkeypatch.setattr(quantize_cmd, "compare", fail)
    data = write_npz(tmp_path / "rows.npz", image=images(4))
    before = folder_state(tmp_path)
    result = cli("quantize", DIGITS, "-o", tmp_path / "q.onnx", "--data", data)
    assert_one_line_error(result, "quantize", "late failure")
    assert folder_state(tmp_path) == before
