"""Helpers for the command-line tests: models to feed the tools, the console script, file states."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from tests.conftest import ZOO_DIR

DIGITS = Path(__file__).resolve().parents[2] / "slimgraph" / "data" / "digits_cnn.onnx"
DIGITS_CALIB = DIGITS.with_name("digits_calib.npz")


def zoo(name: str) -> Path:
    """A model of the onnx package's light zoo by short name ('resnet50', 'squeezenet', ...)."""
    path = ZOO_DIR / f"light_{name}.onnx"
    if not path.exists():
        path = ZOO_DIR / f"light_bvlc_{name}.onnx"
    assert path.exists(), path
    return path


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        def reject(token: str) -> None:
            raise AssertionError(f"non-standard JSON token {token}")

        return json.loads(self.out, parse_constant=reject)


def console_script() -> str:
    """The installed `slimgraph` console script (next to this Python first)."""
    beside = Path(sys.executable).with_name("slimgraph")
    found = str(beside) if beside.exists() else shutil.which("slimgraph")
    if found is None:
        pytest.fail("the slimgraph console script is not installed (pip install -e .)")
    return found


def run_script(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real console script in a subprocess."""
    return subprocess.run(
        [console_script(), *[str(a) for a in args]],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below `folder` with its size and mtime, to prove nothing was written."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def single_op_model(
    op: str,
    input_shape: list[int | str],
    weight_shape: list[int] | None,
    output_shape: list[int | str] | None = None,
    opset: int = 17,
    **attrs: object,
) -> onnx.ModelProto:
    """A one-node model `y = op(x, W)` with W a random initializer; shapes left to inference."""
    import numpy as np

    rng = np.random.default_rng(0)
    inputs = ["x"]
    initializers = []
    if weight_shape is not None:
        weight = rng.standard_normal(weight_shape).astype(np.float32)
        initializers.append(onnx.numpy_helper.from_array(weight, "W"))
        inputs.append("W")
    node = onnx.helper.make_node(op, inputs, ["y"], name=f"the_{op.lower()}", **attrs)
    graph = onnx.helper.make_graph(
        [node],
        f"single_{op}",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, input_shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, output_shape)],
        initializers,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def save_proto(proto: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path


def save_ir(model: ir.Model, path: Path, **kwargs: object) -> Path:
    from slimgraph.ir import save

    save(model, path, **kwargs)
    return path
