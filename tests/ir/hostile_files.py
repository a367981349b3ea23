"""A corpus of hostile ONNX files, generated on demand (nothing binary is committed).

Each builder writes one small file (plus its external data, when it has some) into a folder and
returns the model's path. The kinds come from issue 10: bad external-data offsets, sparse
initializers declaring huge sizes, huge or negative input dimensions, recursive functions, an
empty graph, an enormous op type, a weight backed by a 1 TiB sparse file, NaN/Inf weights,
unknown external-data keys.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["HOSTILE", "build"]

OPSET = [helper.make_opsetid("", 17)]


def _save(proto: onnx.ModelProto, folder: Path, name: str) -> Path:
    path = folder / f"{name}.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def _linear(
    weight: np.ndarray | None = None, dims: list[int | str] | None = None
) -> onnx.ModelProto:
    """x[N, 4] -> MatMul(W[4, 4]) -> y."""
    w = weight if weight is not None else np.ones((4, 4), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims or ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    return model


def _external(folder: Path, name: str, offset: str, data: bytes = b"\0" * 64) -> onnx.ModelProto:
    (folder / f"{name}.bin").write_bytes(data)
    model = _linear()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", f"{name}.bin"), ("offset", offset), ("length", "64")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return model


def non_ascii_offset(folder: Path) -> Path:
    """An external-data offset written with a superscript digit ('²': isdigit() accepts it)."""
    return _save(_external(folder, "non_ascii_offset", "²"), folder, "non_ascii_offset")


def arabic_offset(folder: Path) -> Path:
    """A relative: an offset in Arabic-Indic digits ('٠', which int() would even accept)."""
    return _save(_external(folder, "arabic_offset", "٠"), folder, "arabic_offset")


def unknown_external_key(folder: Path) -> Path:
    """A valid external tensor with an extra key onnx does not know (it warns from Python)."""
    model = _external(folder, "unknown_key", "0", np.ones(16, np.float32).tobytes())
    entry = model.graph.initializer[0].external_data.add()
    entry.key, entry.value = "sha256", "abc"
    return _save(model, folder, "unknown_external_key")


def huge_sparse_initializer(folder: Path) -> Path:
    """A sparse initializer with one value that declares 2^29 elements (2 GiB once dense)."""
    model = _linear()
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.ones(1, np.float32), "S"),
        numpy_helper.from_array(np.array([0], np.int64), "S_indices"),
        [1 << 29],
    )
    model.graph.sparse_initializer.append(sparse)
    return _save(model, folder, "huge_sparse_initializer")


def huge_sparse_2d(folder: Path) -> Path:
    """A relative: a 2-D sparse initializer of [2^16, 2^16] (16 GiB once dense)."""
    model = _linear()
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.ones(1, np.float32), "S"),
        numpy_helper.from_array(np.array([[0, 0]], np.int64), "S_indices"),
        [1 << 16, 1 << 16],
    )
    model.graph.sparse_initializer.append(sparse)
    return _save(model, folder, "huge_sparse_2d")


def huge_input(folder: Path) -> Path:
    """Graph input declared [2^40, 2^40]."""
    return _save(_linear(dims=[1 << 40, 1 << 40]), folder, "huge_input")


def huge_batch(folder: Path) -> Path:
    """A relative: input [2^40, 4] (4 TiB per feed)."""
    return _save(_linear(dims=[1 << 40, 4]), folder, "huge_batch")


def negative_dim(folder: Path) -> Path:
    """Graph input with a negative dimension."""
    return _save(_linear(dims=[-3, 4]), folder, "negative_dim")


def negative_output_dim(folder: Path) -> Path:
    """A relative: a graph output declared with a negative dimension."""
    model = _linear()
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, -1]))
    return _save(model, folder, "negative_output_dim")


def _function(name: str, calls: str) -> onnx.FunctionProto:
    return helper.make_function(
        "local", name, ["a"], ["b"], [helper.make_node(calls, ["a"], ["b"], domain="local")],
        OPSET + [helper.make_opsetid("local", 1)],
    )


def _with_functions(functions: list[onnx.FunctionProto], entry: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node(entry, ["x"], ["y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph, opset_imports=OPSET + [helper.make_opsetid("local", 1)], functions=functions
    )
    model.ir_version = 8
    return model


def recursive_function(folder: Path) -> Path:
    """A function that calls itself."""
    return _save(_with_functions([_function("F", "F")], "F"), folder, "recursive_function")


def mutually_recursive_functions(folder: Path) -> Path:
    """A relative: F calls G, G calls F."""
    model = _with_functions([_function("F", "G"), _function("G", "F")], "F")
    return _save(model, folder, "mutually_recursive_functions")


def empty_graph(folder: Path) -> Path:
    """A graph with no nodes, no inputs and no outputs."""
    model = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=OPSET)
    model.ir_version = 8
    return _save(model, folder, "empty_graph")


def no_outputs(folder: Path) -> Path:
    """A relative: nodes, but no graph output."""
    model = _linear()
    del model.graph.output[:]
    return _save(model, folder, "no_outputs")


def huge_op_type(folder: Path) -> Path:
    """A node whose (unregistered) op type is 1 MiB long."""
    model = _linear()
    model.graph.node.append(helper.make_node("X" * (1 << 20), ["y"], ["z"], domain="big"))
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("big", 1))
    return _save(model, folder, "huge_op_type")


def huge_name(folder: Path) -> Path:
    """A relative: a 1 MiB value name."""
    model = _linear()
    long = "v" * (1 << 20)
    model.graph.node[0].output[0] = long
    model.graph.output[0].name = long
    return _save(model, folder, "huge_name")


def terabyte_sparse_file(folder: Path) -> Path:
    """A weight [2^38] float32 backed by a 1 TiB sparse file (a hole: no disk used)."""
    data = folder / "terabyte.bin"
    with open(data, "wb") as handle:
        handle.truncate(1 << 40)
    model = _linear()
    model.graph.node[0].input[1] = "B"
    tensor = TensorProto(name="B", data_type=TensorProto.FLOAT, dims=[1 << 38])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "terabyte.bin"), ("offset", "0"), ("length", str(1 << 40))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    model.graph.initializer.append(tensor)
    model.graph.node[0].op_type = "Add"
    return _save(model, folder, "terabyte_sparse_file")


def nan_weight(folder: Path) -> Path:
    """A MatMul weight with one NaN."""
    w = np.ones((4, 4), np.float32)
    w[1, 2] = np.nan
    return _save(_linear(w), folder, "nan_weight")


def inf_weight(folder: Path) -> Path:
    """A relative: a MatMul weight with one -Inf."""
    w = np.ones((4, 4), np.float32)
    w[3, 0] = -np.inf
    return _save(_linear(w), folder, "inf_weight")


HOSTILE: dict[str, Callable[[Path], Path]] = {
    f.__name__: f
    for f in (
        non_ascii_offset, arabic_offset, unknown_external_key, huge_sparse_initializer,
        huge_sparse_2d, huge_input, huge_batch, negative_dim, negative_output_dim,
        recursive_function, mutually_recursive_functions, empty_graph, no_outputs, huge_op_type,
        huge_name, terabyte_sparse_file, nan_weight, inf_weight,
    )
}


def build(name: str, folder: Path) -> Path:
    """Write the hostile file `name` (a key of `HOSTILE`) into `folder`; returns its path."""
    return HOSTILE[name](folder)
