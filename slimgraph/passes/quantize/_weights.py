"""Graph helpers for the weight quantizers: constant weights, exclusion patterns, new initializers.

A dynamo export reads a Linear's weight through `Transpose(initializer)` (the exporter's optimizer
is off), so "constant weight" means a value computed from initializers by data-movement nodes
only; `traced_constant` follows such chains and returns the weight as the consumer sees it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from slimgraph.errors import UnsupportedModelError
from slimgraph.ir.select import matching_pattern
from slimgraph.passes._graph_utils import opset_version as _graph_opset_version
from slimgraph.passes._kit import constant_array

__all__ = [
    "traced_constant",
    "constant_node_array",
    "excluded_by",
    "add_initializer",
    "bias_add_after",
    "bias_of",
    "content_key",
    "is_float32",
    "opset_version",
    "upgrade_opset",
]

# Ops through which a constant weight may reach its consumer (all inputs constant).
_MOVERS = frozenset(
    {"Constant", "Identity", "Transpose", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape",
     "Split", "Gather", "Cast", "Flatten", "Expand", "Shape", "Mul", "Add", "Sub", "Div"}
)
_MAX_CHAIN = 8


def traced_constant(value: ir.Value | None, _depth: int = 0) -> np.ndarray | None:
    """The numpy value of `value` if it is computed from constants only, else None.

    Follows initializers, Constant nodes and chains of up to 8 data-movement ops over them
    (Transpose, Identity, Slice, Concat, ...; the dynamo exporter reorders LSTM gates that way),
    evaluated with onnx's reference implementation.
    """
    if value is None or _depth > _MAX_CHAIN:
        return None
    if value.const_value is not None:
        return constant_array(value)  # None for an overridable graph input's default
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _MOVERS:
        return None
    if node.op_type == "Constant":
        return constant_node_array(node)
    if node.op_type == "Shape" and node.inputs[0] is not None:
        shape = node.inputs[0].shape
        if shape is not None and shape.is_static():
            dims = np.asarray(shape.numpy(), np.int64)
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", len(dims))
            return dims[start:end]
    arrays = [traced_constant(v, _depth + 1) if v is not None else None for v in node.inputs]
    if any(a is None for a, v in zip(arrays, node.inputs, strict=True) if v is not None):
        return None
    if node.op_type == "Identity":
        return arrays[0]
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm")
        return np.transpose(arrays[0], perm)
    return _evaluate(node, arrays, value)


def constant_node_array(node: ir.Node) -> np.ndarray | None:
    """The value of a Constant node, read without touching the node (models may share tensors)."""
    for name, attr in node.attributes.items():
        if name == "value":
            return attr.as_tensor().numpy()
        if name in ("value_float", "value_floats"):
            return np.asarray(attr.value, np.float32)
        if name in ("value_int", "value_ints"):
            return np.asarray(attr.value, np.int64)
    return None


def _evaluate(node: ir.Node, arrays: list[np.ndarray | None], value: ir.Value) -> np.ndarray | None:
    from onnx.reference import ReferenceEvaluator

    names = [f"i{k}" if a is not None else "" for k, a in enumerate(arrays)]
    proto = onnx.helper.make_node(
        node.op_type, names, [f"o{k}" for k in range(len(node.outputs))],
        **{name: attr.value for name, attr in node.attributes.items()},
    )
    try:
        outputs = ReferenceEvaluator(proto).run(
            None, {n: a for n, a in zip(names, arrays, strict=True) if n}
        )
    except Exception:  # an op the reference cannot evaluate: not a constant we can use
        return None
    return np.asarray(outputs[value.index()])


def excluded_by(node: ir.Node, patterns: Sequence[str]) -> str | None:
    """The first pattern (fnmatch) matching the node's layer name or node name, else None."""
    return matching_pattern(node, patterns)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
    """Register a new initializer and return its value."""
    tensor = array if not isinstance(array, np.ndarray) else ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def bias_add_after(node: ir.Node, columns: int) -> ir.Node | None:
    """The Add right after `node` that adds a constant [N] bias (fused into the int8 kernel)."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    bias = traced_constant(other)
    if bias is None or bias.dtype != np.float32 or bias.shape != (columns,):
        return None
    if add.outputs[0].shape is not None and out.shape is not None:
        if add.outputs[0].shape != out.shape:  # the bias must not broadcast the result up
            return None
    return add


def bias_of(add: ir.Node, node: ir.Node) -> np.ndarray:
    """The constant bias operand of a bias Add found by `bias_add_after`."""
    other = add.inputs[0] if add.inputs[1] is node.outputs[0] else add.inputs[1]
    array = traced_constant(other)
    assert array is not None
    return array


def content_key(kind: str, array: np.ndarray) -> tuple[str, tuple[int, ...], str, bytes]:
    """A key equal for equal weights: tied weights (the same values reached through different
    nodes, e.g. two Transposes of one initializer) are quantized once and stored once."""
    data = np.ascontiguousarray(array)
    return kind, data.shape, str(data.dtype), hashlib.sha256(data.tobytes()).digest()


def is_float32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def opset_version(model: ir.Model) -> int:
    """The model's default-domain ONNX opset (0 when it imports none)."""
    return _graph_opset_version(model, default=0)


def upgrade_opset(model: ir.Model, version: int) -> ir.Model:
    """A copy of `model` converted to ONNX opset `version` (`ConvertOpsetPass`).

    The converted model must pass `onnx.checker` and produce the same outputs on onnxruntime
    (fp32, rtol 1e-4) as the original on random inputs; otherwise `UnsupportedModelError`.
    """
    from slimgraph.passes.opset import ConvertOpsetPass
    from slimgraph.runtime import create_session, random_feeds, run

    try:
        upgraded = ConvertOpsetPass(opset=version)(model).model
        onnx.checker.check_model(ir.to_proto(upgraded))
    except Exception as error:  # the converter raises bare RuntimeErrors; name the cause once
        raise UnsupportedModelError(
            f"cannot upgrade the model from opset {opset_version(model)} to {version}: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from error
    feeds = random_feeds(model)
    before = run(create_session(model), feeds)
    after = run(create_session(upgraded), feeds)
    for name, expected in before.items():
        got = after.get(name)
        scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
        if got is None or got.shape != expected.shape or not np.allclose(
            got, expected, rtol=1e-4, atol=1e-5 * scale, equal_nan=True
        ):
            raise UnsupportedModelError(
                f"upgrading the model to opset {version} changed output '{name}'"
            )
    return upgraded
