"""Models built by hand from `onnx.helper` nodes, and look-ups into IR models.

Every builder returns a checked `onnx_ir.Model` (the onnx checker ran on it) unless it says
otherwise; intermediate shapes and dtypes come from onnx shape inference.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "initializer",
    "batchnorm",
    "batchnorm_params",
    "make_model",
    "matmul_model",
    "gemm_model",
    "conv_model",
    "single_op_model",
    "linear_model",
    "ops",
    "node_named",
    "only_node",
    "const",
    "initializer_array",
    "dq_feeding",
]

Dims = Sequence[Any]  # ints, symbolic names or None
# (name, shape) of a float32 input, or (name, TensorProto dtype, shape)
InputSpec = tuple[str, Dims] | tuple[str, int, Dims]
OutputSpec = str | tuple[str, int, Dims | None]  # name (float32, shape inferred) or typed


def initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    """A `TensorProto` named `name` holding `array` (its dtype kept)."""
    return numpy_helper.from_array(np.asarray(array), name)


def batchnorm_params(
    prefix: str, channels: int, rng: np.random.Generator
) -> list[onnx.TensorProto]:
    """The four parameters `<prefix>_{g,b,m,v}` of an inference BatchNormalization (float32
    [channels]: scale and variance uniform in [0.5, 1.5), bias and mean standard normal)."""
    return [
        initializer(f"{prefix}_g", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
        initializer(f"{prefix}_b", rng.standard_normal(channels).astype(np.float32)),
        initializer(f"{prefix}_m", rng.standard_normal(channels).astype(np.float32)),
        initializer(f"{prefix}_v", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
    ]


def batchnorm(
    x: str, y: str, prefix: str, channels: int, rng: np.random.Generator, *, epsilon: float = 1e-5
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """An inference BatchNormalization `y = BN(x)` named `prefix` and its four parameters
    `<prefix>_{g,b,m,v}` (float32 [channels]: scale and variance uniform in [0.5, 1.5), bias and
    mean standard normal)."""
    params = batchnorm_params(prefix, channels, rng)
    node = helper.make_node(
        "BatchNormalization", [x, *(t.name for t in params)], [y], name=prefix, epsilon=epsilon
    )
    return node, params


def _input(spec: InputSpec) -> onnx.ValueInfoProto:
    if len(spec) == 2:
        return helper.make_tensor_value_info(spec[0], TensorProto.FLOAT, spec[1])
    return helper.make_tensor_value_info(*spec)


def _output(spec: OutputSpec, output_types: Mapping[str, int]) -> onnx.ValueInfoProto:
    if isinstance(spec, str):
        return helper.make_tensor_value_info(spec, output_types.get(spec, TensorProto.FLOAT), None)
    return helper.make_tensor_value_info(*spec)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[InputSpec],
    outputs: Sequence[OutputSpec],
    initializers: Sequence[onnx.TensorProto] | Mapping[str, np.ndarray] = (),
    *,
    opset: int = 17,
    ir_version: int | None = None,
    initializers_as_inputs: bool = False,
    output_types: Mapping[str, int] | None = None,
    check: bool = True,
) -> ir.Model:
    """A model from `onnx.helper` nodes, shape-inferred, checked by the onnx checker.

    Args:
        nodes: the graph's nodes, in order.
        inputs: `(name, shape)` for a float32 input, or `(name, TensorProto dtype, shape)`.
        outputs: a name (float32 unless `output_types` says otherwise; shape left to inference),
            or `(name, TensorProto dtype, shape)`.
        initializers: `TensorProto`s (see `initializer`) or arrays by name.
        opset: the default-domain opset.
        ir_version: defaults to 8 up to opset 17 and 10 after (capped by the installed onnx).
        initializers_as_inputs: also list every initializer as a graph input (IR < 4 style).
        output_types: dtypes of outputs given by name.
        check: run `onnx.checker.check_model` (off for models a test makes invalid on purpose).
    """
    if isinstance(initializers, Mapping):
        initializers = [initializer(name, array) for name, array in initializers.items()]
    graph_inputs = [_input(spec) for spec in inputs]
    if initializers_as_inputs:
        graph_inputs += [
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in initializers
        ]
    graph = helper.make_graph(
        list(nodes),
        "test",
        graph_inputs,
        [_output(spec, output_types or {}) for spec in outputs],
        list(initializers),
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = ir_version or min(onnx.IR_VERSION, 8 if opset <= 17 else 10)
    proto = onnx.shape_inference.infer_shapes(proto)
    if check:
        onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def matmul_model(weight: np.ndarray, x_shape: Sequence[int], *, opset: int = 17) -> ir.Model:
    """y = x @ W with W [k, n] an initializer, x [..., k] of any rank."""
    out_shape = [*x_shape[:-1], weight.shape[1]]
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [("x", list(x_shape))],
        [("y", TensorProto.FLOAT, out_shape)],
        {"W": weight.astype(np.float32)},
        opset=opset,
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
    """y = alpha * op(x) @ op(W) + beta * C, W stored transposed ([n, k]) when trans_b."""
    rows = x_shape[1] if trans_a else x_shape[0]
    cols = weight.shape[0] if trans_b else weight.shape[1]
    initializers = {"W": weight.astype(np.float32)}
    if bias is not None:
        initializers["C"] = bias.astype(np.float32)
    node = helper.make_node(
        "Gemm", ["x", *initializers], ["y"], name="gemm",
        transA=trans_a, transB=trans_b, alpha=alpha, beta=beta,
    )  # fmt: skip
    return make_model(
        [node], [("x", list(x_shape))], [("y", TensorProto.FLOAT, [rows, cols])], initializers,
        opset=opset,
    )  # fmt: skip


def conv_model(
    weight: np.ndarray,
    x_shape: Sequence[int],
    *,
    bias: np.ndarray | None = None,
    group: int = 1,
    opset: int = 17,
    **attributes: Any,
) -> ir.Model:
    """y = Conv(x, W [c_out, c_in / group, *kernel], b) with the given attributes (strides,
    pads, dilations, auto_pad)."""
    initializers = {"W": weight.astype(np.float32)}
    if bias is not None:
        initializers["b"] = bias.astype(np.float32)
    node = helper.make_node(
        "Conv", ["x", *initializers], ["y"], name="conv", kernel_shape=list(weight.shape[2:]),
        group=group, **attributes,
    )  # fmt: skip
    return make_model(
        [node], [("x", list(x_shape))], [("y", TensorProto.FLOAT, [None] * len(x_shape))],
        initializers, opset=opset,
    )  # fmt: skip


def single_op_model(
    op: str,
    input_shape: list[int | str],
    weight_shape: list[int] | None,
    output_shape: list[int | str] | None = None,
    opset: int = 17,
    **attrs: Any,
) -> onnx.ModelProto:
    """A one-node `ModelProto` `y = op(x, W)` named `the_<op>`, W a random float32 initializer
    (seed 0); no shape inference, no check (the command-line tests save it as it is)."""
    rng = np.random.default_rng(0)
    inputs = ["x"]
    initializers = []
    if weight_shape is not None:
        weight = rng.standard_normal(weight_shape).astype(np.float32)
        initializers.append(initializer("W", weight))
        inputs.append("W")
    node = helper.make_node(op, inputs, ["y"], name=f"the_{op.lower()}", **attrs)
    graph = helper.make_graph(
        [node],
        f"single_{op}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def linear_model() -> ir.Model:
    """x[batch, 16] -> MatMul(W0 [16, 8]) -> Relu -> Gemm(W1 [4, 8], transB) -> Gemm(W2 [4, 3])."""
    rng = np.random.default_rng(0)
    inits = {
        "w0": rng.standard_normal((16, 8)).astype(np.float32),
        "w1": rng.standard_normal((4, 8)).astype(np.float32),
        "b1": rng.standard_normal(4).astype(np.float32),
        "w2": rng.standard_normal((4, 3)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="mm0"),
        helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
        helper.make_node("Gemm", ["r0", "w1", "b1"], ["h1"], name="gemm1", transB=1),
        helper.make_node("Gemm", ["h1", "w2"], ["y"], name="gemm2"),
    ]
    return make_model(nodes, [("x", TensorProto.FLOAT, ["batch", 16])],
                      [("y", TensorProto.FLOAT, ["batch", 3])], inits)  # fmt: skip


def ops(model: ir.Model) -> collections.Counter[str]:
    """How many nodes of each op type the main graph has."""
    return collections.Counter(node.op_type for node in model.graph)


def node_named(model: ir.Model, name: str) -> ir.Node:
    """The one node of the main graph called `name`."""
    found = [node for node in model.graph if node.name == name]
    assert len(found) == 1, (name, [node.name for node in model.graph])
    return found[0]


def only_node(model: ir.Model, op_type: str) -> ir.Node:
    """The one node of the main graph whose op type is `op_type`."""
    found = [node for node in model.graph if node.op_type == op_type]
    assert len(found) == 1, (op_type, ops(model))
    return found[0]


def const(value: ir.Value) -> np.ndarray:
    """The constant array of an initializer value."""
    assert value.const_value is not None, value
    return value.const_value.numpy()


def initializer_array(model: ir.Model, suffix: str) -> np.ndarray:
    """The array of the one initializer whose name ends with `suffix`."""
    found = [v for name, v in model.graph.initializers.items() if name.endswith(suffix)]
    assert len(found) == 1, (suffix, list(model.graph.initializers))
    return const(found[0])


def dq_feeding(model: ir.Model, node: ir.Node, index: int) -> ir.Node | None:
    """The DequantizeLinear that produces input `index` of `node`, if any."""
    value = node.inputs[index]
    source = value.producer() if value is not None else None
    return source if source is not None and source.op_type == "DequantizeLinear" else None
