"""Graph helpers for the weight quantizers: constant weights, exclusion patterns, new initializers.

A dynamo export reads a Linear's weight through `Transpose(initializer)` (the exporter's optimizer
is off), so "constant weight" means a value computed from initializers by data-movement nodes
only; `traced_constant` follows such chains and returns the weight as the consumer sees it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_ir as ir

from slimgraph.errors import UnsupportedModelError
from slimgraph.passes._graph_utils import opset_version as _graph_opset_version
from slimgraph.passes._kit import Names, add_initializer, traced_constant

__all__ = [
    "new_constant",
    "bias_add_after",
    "bias_of",
    "content_key",
    "is_float32",
    "opset_version",
    "upgrade_opset",
]

def new_constant(
    graph: ir.Graph, base: str, array: np.ndarray | ir.TensorProtocol, names: Names
) -> ir.Value:
    """`_kit.add_initializer` for quantization parameters, which are often 0-d (a per-tensor
    scale): the array is wrapped as a tensor as it is (the kit's own copy through
    `np.ascontiguousarray` turns a 0-d array into shape [1], which changes the model)."""
    tensor = ir.tensor(array) if isinstance(array, np.ndarray) else array
    return add_initializer(graph, base, tensor, names=names)


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
