"""Raw `ModelProto`s for the loader and session tests: valid ones and broken ones.

Nothing here runs the onnx checker or shape inference: a bad model must reach the loader as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.kit.files import write

__all__ = [
    "OPSET",
    "W",
    "external_tensor",
    "add_model",
    "constant_model",
    "if_model",
    "loop_model",
    "function_model",
    "graph_model",
    "external_add_mul",
]

OPSET = [helper.make_opsetid("", 18)]
W = np.arange(6, dtype=np.float32).reshape(2, 3)


def external_tensor(
    name: str,
    location: str | None,
    offset: str | None = None,
    length: str | None = None,
    array: np.ndarray = W,
) -> TensorProto:
    """A float tensor whose data is declared to be in an external file."""
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return tensor


def add_model(initializer: TensorProto, ir_version: int = 10) -> onnx.ModelProto:
    """y = x + w with `w` an initializer of shape (2, 3)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", initializer.name], ["y"], name="add0")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [initializer],
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=ir_version)


def constant_model(tensor: TensorProto) -> onnx.ModelProto:
    """y = x + Constant(value=tensor)."""
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], name="const0", value=tensor),
            helper.make_node("Add", ["x", "c"], ["y"], name="add0"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=10)


def if_model(tensor: TensorProto) -> onnx.ModelProto:
    """If(cond) then x + w (w an initializer of the then-branch, x from the outer scope) else x."""
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["x", tensor.name], ["t"], name="then_add")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])],
        [tensor],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"], name="else_id")],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])],
    )
    graph = helper.make_graph(
        [
            helper.make_node(
                "If", ["cond"], ["y"], name="if0", then_branch=then_graph, else_branch=else_graph
            )
        ],
        "g",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=10)


def loop_model(tensor: TensorProto) -> onnx.ModelProto:
    """Loop 2 times: acc = acc + w (w an initializer of the body)."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
            helper.make_node("Add", ["acc_in", tensor.name], ["acc_out"], name="body_add"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [2, 3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2, 3]),
        ],
        [tensor],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop0", body=body)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array(2, dtype=np.int64), "trips")],
    )
    return helper.make_model(graph, opset_imports=OPSET, ir_version=10)


def function_model(tensor: TensorProto) -> onnx.ModelProto:
    """y = AddConst(x), a local function whose body adds Constant(value=tensor)."""
    function = helper.make_function(
        "local",
        "AddConst",
        ["fx"],
        ["fy"],
        [
            helper.make_node("Constant", [], ["fc"], name="fconst", value=tensor),
            helper.make_node("Add", ["fx", "fc"], ["fy"], name="fadd"),
        ],
        OPSET,
    )
    graph = helper.make_graph(
        [helper.make_node("AddConst", ["x"], ["y"], name="call0", domain="local")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return helper.make_model(
        graph,
        opset_imports=[*OPSET, helper.make_opsetid("local", 1)],
        functions=[function],
        ir_version=10,
    )


def graph_model(
    nodes: list[onnx.NodeProto], inputs=("x",), outputs=("y",), **kwargs
) -> onnx.ModelProto:
    """A float model over [2, 3] values from a list of nodes (no checks)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in outputs],
    )
    kwargs.setdefault("opset_imports", OPSET)
    kwargs.setdefault("ir_version", 10)
    return helper.make_model(graph, **kwargs)


def external_add_mul(folder: Path, location: str, w: np.ndarray, c: np.ndarray) -> Path:
    """Write `folder/model.onnx`: y = (x + w) * Constant(c), x and y [2, 64] float32, with `w`
    (an initializer) then `c` (the Constant's value), both [2, 64] float32, stored back to back
    in the external-data file `folder/location`. Returns the model's path."""
    assert w.shape == c.shape == (2, 64) and w.dtype == c.dtype == np.float32
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    (folder / location).write_bytes(w.tobytes() + c.tobytes())
    size = str(w.nbytes)
    proto = graph_model(
        [
            helper.make_node(
                "Constant", [], ["c"], name="const0",
                value=external_tensor("c", location, size, size, c),
            ),
            helper.make_node("Add", ["x", "w"], ["t"], name="add0"),
            helper.make_node("Mul", ["t", "c"], ["y"], name="mul0"),
        ]
    )  # fmt: skip
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[1].dim_value = 64
    proto.graph.initializer.append(external_tensor("w", location, "0", size, w))
    return write(folder, proto)
