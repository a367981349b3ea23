"""Issue 10, kinds 5-7: a hostile-file corpus (generated here, see hostile_files.py) through the
command line: exit 2, exactly one line on stderr (onnxruntime's own log lines and Python warnings
silenced), nothing written, and `inspect` says when the model is invalid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import slimgraph as sg
from slimgraph.errors import InvalidModelError
from slimgraph.tools.cli import main
from tests.ir.hostile_files import HOSTILE, build

# What each file must be refused with (a fragment of the one line), for every command below.
REFUSED = {
    "non_ascii_offset": "offset '²' is not an integer",
    "arabic_offset": "is not an integer",
    "huge_sparse_initializer": "sparse tensor 'S' has dims [536870912]",
    "huge_sparse_2d": "sparse tensor 'S' has dims [65536, 65536]",
    "negative_dim": "invalid model: graph input 'x' has a negative dimension [-3, 4]",
    "negative_output_dim": "invalid model: graph output 'y' has a negative dimension",
    "recursive_function": "invalid model: function 'F' calls itself (F -> F)",
    "mutually_recursive_functions": "invalid model: function 'F' calls itself (F -> G -> F)",
    "empty_graph": "invalid model: the graph has no outputs",
    "no_outputs": "invalid model: the graph has no outputs",
    "huge_op_type": "invalid model: the op type of a XXXX",
    "huge_name": "invalid model: the output of a MatMul node is 1048576 characters long",
    "terabyte_sparse_file": "a sparse file (1099511627776 bytes declared",
}
# Valid files that cannot be compressed: inspect works, compressing commands refuse.
REFUSED_TO_COMPRESS = {
    "nan_weight": "weight 'W' holds 1 NaN/Inf value(s) of 16 (first: NaN at index [1, 2])",
    "inf_weight": "weight 'W' holds 1 NaN/Inf value(s) of 16 (first: Inf at index [3, 0])",
    "huge_input": "input 'x' declares shape [1099511627776, 1099511627776]",
    "huge_batch": "input 'x' declares shape [1099511627776, 4]",
}

COMMANDS = {
    "optimize": ["optimize"],
    "dynamic": ["quantize", "--mode", "dynamic"],
    "weight-only": ["quantize", "--mode", "weight-only"],
    "prune": ["prune", "--ratio", "0.5"],
    "factorize": ["factorize", "--rank-ratio", "0.5"],
    "fp16": ["convert", "--fp16"],
}


def test_the_corpus_covers_every_builder() -> None:
    assert set(REFUSED) | set(REFUSED_TO_COMPRESS) | {"unknown_external_key"} == set(HOSTILE)


def _stderr_line(capfd: pytest.CaptureFixture[str]) -> str:
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[:2000]
    return lines[0]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_inspect_says_the_file_is_invalid(
    name: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = build(name, tmp_path)
    assert main(["inspect", str(path)]) == 2
    line = _stderr_line(capfd)
    assert line.startswith("slimgraph inspect: error: ") and REFUSED[name] in line
    assert len(line) < 400


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("name", sorted(REFUSED) + sorted(REFUSED_TO_COMPRESS))
def test_every_command_exits_2_with_one_line(
    name: str, command: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = build(name, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out.onnx"
    code = main([*COMMANDS[command], str(path), "-o", str(out)])
    if name in ("huge_input", "huge_batch") and command in ("prune", "factorize", "fp16"):
        # valid declarations; these commands never run the model: done, or refused cleanly
        assert code in (0, 2) and "internal error" not in capfd.readouterr().err
        return
    assert code == 2
    line = _stderr_line(capfd)
    assert {**REFUSED, **REFUSED_TO_COMPRESS}[name] in line and "internal error" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_nan_weight_is_refused_by_the_python_api_naming_the_tensor(tmp_path: Path) -> None:
    model = sg.load(build("nan_weight", tmp_path))
    calibration = {"x": np.ones((4, 4), np.float32)}
    for call in (
        lambda: sg.optimize(model),
        lambda: sg.quantize(model, mode="dynamic"),
        lambda: sg.quantize(model, mode="weight-only", block_size=16),  # K = 4: one block
        lambda: sg.quantize(model, calibration=calibration),
        lambda: sg.prune(model, ratio=0.5),
        lambda: sg.factorize(model, rank_ratio=0.5),
        lambda: sg.convert_fp16(model),
    ):
        with pytest.raises(InvalidModelError, match="weight 'W' holds 1 NaN"):
            call()


def test_nan_in_a_conv_of_the_bundled_cnn_through_every_command(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The issue's example: one NaN in a Conv weight of a real model."""
    proto = onnx.load(Path(sg.__file__).parent / "data" / "digits_cnn.onnx")
    tensor = next(t for t in proto.graph.initializer if len(t.dims) == 4)
    array = onnx.numpy_helper.to_array(tensor).copy()
    array.flat[3] = np.nan
    tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    source = tmp_path / "nan_cnn.onnx"
    onnx.save(proto, source)
    for command in COMMANDS.values():
        assert main([*command, str(source), "-o", str(tmp_path / "out.onnx")]) == 2
        assert f"weight '{tensor.name}' holds 1 NaN" in _stderr_line(capfd)
    assert not (tmp_path / "out.onnx").exists()


def test_unknown_external_data_keys_print_no_warning(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = build("unknown_external_key", tmp_path)
    with_key = onnx.load(path, load_external_data=False).graph.initializer[0]
    assert "sha256" in [e.key for e in with_key.external_data]
    assert main(["inspect", str(path)]) == 0
    assert main(["compare", str(path), str(path)]) == 0
    assert capfd.readouterr().err == ""


def test_onnxruntime_failures_print_one_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A custom op onnxruntime does not have: its own '[E:onnxruntime:...]' log line is gone."""
    from tests.passes.quantize.test_hardening_quant import fancy_model

    source = tmp_path / "fancy.onnx"
    sg.save(fancy_model(), source)
    assert main(["optimize", str(source), "-o", str(tmp_path / "out.onnx")]) == 2
    line = _stderr_line(capfd)
    assert "does not run on onnxruntime" in line and "[E:onnxruntime" not in line
