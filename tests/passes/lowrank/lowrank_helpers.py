"""Hand-built one-layer models for the low-rank tests, and running them on onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from slimgraph.runtime import create_session, run


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: Mapping[str, np.ndarray],
    opset: int,
) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        outputs,
        [numpy_helper.from_array(np.asarray(a), name) for name, a in initializers.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 7 if opset < 15 else 8
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def matmul_model(weight: np.ndarray, x_shape: Sequence[int], *, opset: int = 17) -> ir.Model:
    """y = x @ W, x of any rank."""
    out_shape = [*x_shape[:-1], weight.shape[1]]
    return _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        {"W": weight.astype(np.float32)},
        opset,
    )


def gemm_model(
    weight: np.ndarray,
    x_shape: Sequence[int],
    *,
    trans_a: int = 0,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
    bias: np.ndarray | None = None,
    opset: int = 17,
) -> ir.Model:
    """y = alpha * op(x) @ op(W) + beta * C, W stored transposed when trans_b."""
    rows = x_shape[1] if trans_a else x_shape[0]
    cols = weight.shape[0] if trans_b else weight.shape[1]
    inputs = ["x", "W"] + (["C"] if bias is not None else [])
    initializers = {"W": weight.astype(np.float32)}
    if bias is not None:
        initializers["C"] = bias.astype(np.float32)
    node = helper.make_node(
        "Gemm", inputs, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta
    )
    return _model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, cols])],
        initializers,
        opset,
    )


def conv_model(
    weight: np.ndarray,
    x_shape: Sequence[int],
    *,
    bias: np.ndarray | None = None,
    group: int = 1,
    opset: int = 17,
    **attributes: object,
) -> ir.Model:
    """y = Conv(x, W, b) with the given attributes (strides, pads, dilations, auto_pad)."""
    inputs = ["x", "W"] + (["b"] if bias is not None else [])
    initializers = {"W": weight.astype(np.float32)}
    if bias is not None:
        initializers["b"] = bias.astype(np.float32)
    node = helper.make_node(
        "Conv", inputs, ["y"], name="conv", kernel_shape=list(weight.shape[2:]), group=group,
        **attributes,
    )  # fmt: skip
    return _model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(x_shape))],
        initializers,
        opset,
    )


def outputs(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run(create_session(model, threads=1), feeds)


def assert_same(reference: np.ndarray, actual: np.ndarray) -> None:
    """The exact-pass tolerance of the project: rtol 1e-4, atol 1e-5 of the output's scale."""
    scale = max(1.0, float(np.abs(reference).max()))
    np.testing.assert_allclose(actual, reference, rtol=1e-4, atol=1e-5 * scale)


def initializer(model: ir.Model, suffix: str) -> np.ndarray:
    """The one initializer whose name ends with `suffix`."""
    found = [v for name, v in model.graph.initializers.items() if name.endswith(suffix)]
    assert len(found) == 1, (suffix, list(model.graph.initializers))
    return found[0].const_value.numpy()
