"""Differential fuzzing of the lossless preset (issue 10): hypothesis builds random valid graphs
from the ops the exact passes rewrite (Conv, BN, per-channel Mul/Add, Pad, Dropout, Identity,
one- and two-input Sum, Transpose and Reshape round trips, duplicated nodes for CSE, MatMul+Add
heads) with 1-3 outputs that may share values, then `sg.optimize` must keep every output name
and every output within the pipeline's exactness tolerance on fresh random inputs.

Bounded for CI: 120 graphs, derandomized (about 25 s here; a minute on a loaded machine)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import slimgraph as sg
from slimgraph.runtime import create_session, run
from slimgraph.runtime.exact import DEFAULT_ATOL, DEFAULT_RTOL

C, H, W = 4, 5, 5
SHAPE = [1, C, H, W]
OPS = (
    "conv", "bn", "relu", "identity", "dropout", "sum1", "add_const", "mul_const", "add", "sum2",
    "transpose_pair", "reshape_pair", "pad_conv", "duplicate_relu",
)


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def const(self, array: np.ndarray, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(array.astype(array.dtype), name))
        return name

    def rand(self, *shape: int, low: float | None = None) -> np.ndarray:
        if low is not None:
            return self.rng.uniform(low, low + 1.0, shape).astype(np.float32)
        return (self.rng.standard_normal(shape) * 0.5).astype(np.float32)

    def node(self, op: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def apply(self, op: str, a: str, b: str) -> list[str]:  # noqa: PLR0911
        if op == "conv":
            w, bias = self.const(self.rand(C, C, 3, 3)), self.const(self.rand(C))
            return [self.node("Conv", [a, w, bias], pads=[1, 1, 1, 1])]
        if op == "bn":
            params = [self.const(self.rand(C)), self.const(self.rand(C)),
                      self.const(self.rand(C)), self.const(self.rand(C, low=0.5))]
            return [self.node("BatchNormalization", [a, *params])]
        if op in ("relu", "identity"):
            return [self.node(op.capitalize(), [a])]
        if op == "dropout":
            return [self.node("Dropout", [a])]
        if op == "sum1":
            return [self.node("Sum", [a])]
        if op == "add_const":
            return [self.node("Add", [a, self.const(self.rand(1, C, 1, 1))])]
        if op == "mul_const":
            return [self.node("Mul", [self.const(self.rand(C, 1, 1)), a])]
        if op == "add":
            return [self.node("Add", [a, b])]
        if op == "sum2":
            return [self.node("Sum", [a, b])]
        if op == "transpose_pair":
            inner = self.node("Transpose", [a], perm=[0, 2, 3, 1])
            return [inner, self.node("Transpose", [inner], perm=[0, 3, 1, 2])]
        if op == "reshape_pair":
            flat = self.node("Reshape", [a, self.const(np.array([1, -1], np.int64), "s")])
            return [flat, self.node("Reshape", [flat, self.const(np.array(SHAPE, np.int64), "s")])]
        if op == "pad_conv":
            pads = self.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "p")
            padded = self.node("Pad", [a, pads])
            w = self.const(self.rand(C, C, 3, 3))
            return [self.node("Conv", [padded, w])]
        if op == "duplicate_relu":
            return [self.node("Relu", [a]), self.node("Relu", [a])]
        raise AssertionError(op)


@st.composite
def random_models(draw: st.DrawFn) -> ir.Model:
    builder = _Builder(draw(st.integers(0, 2**32 - 1)))
    values = ["x"]
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(OPS))
        a = draw(st.sampled_from(values))
        b = draw(st.sampled_from(values))
        made = builder.apply(op, a, b)
        # the inner value of a round trip has another shape: only the end joins the pool
        values += made[-1:] if op in ("transpose_pair", "reshape_pair") else made
    outputs = draw(st.lists(st.sampled_from(values[1:] or values), min_size=1, max_size=3,
                            unique=True))
    if draw(st.booleans()):  # a MatMul+Add head (a Gemm candidate) on a flattened value
        flat = builder.node("Flatten", [draw(st.sampled_from(values))])
        mm = builder.node("MatMul", [flat, builder.const(builder.rand(C * H * W, 6))])
        outputs.append(builder.node("Add", [mm, builder.const(builder.rand(6))]))
    graph = helper.make_graph(
        builder.nodes, "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        builder.inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


@settings(
    max_examples=120, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(model=random_models(), seed=st.integers(0, 1000))
def test_lossless_preset_keeps_outputs_of_random_graphs(model: ir.Model, seed: int) -> None:
    names = [value.name for value in model.graph.outputs]
    optimized = sg.optimize(model, verify=False)
    assert [value.name for value in optimized.graph.outputs] == names
    onnx.checker.check_model(ir.to_proto(optimized))
    feeds = {"x": np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)}
    expected = run(create_session(model, optimization="disable"), feeds)
    got = run(create_session(optimized, optimization="disable"), feeds)
    assert list(got) == list(expected)
    for name, ref in expected.items():
        atol = DEFAULT_ATOL * max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got[name], ref, rtol=DEFAULT_RTOL, atol=atol, err_msg=name)
