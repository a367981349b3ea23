"""Shared helpers of the quantization tests: bundled digits data, hand-built graphs, ORT checks."""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import slimgraph as sg
from slimgraph.runtime import model_bytes

DATA = Path(sg.__file__).parent / "data"
DIGITS = DATA / "digits_cnn.onnx"
DIGITS_CALIB = DATA / "digits_calib.npz"
DIGITS_TEST = DATA / "digits_test.npz"


def digits() -> ir.Model:
    return sg.load(DIGITS)


def digits_test() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DIGITS_TEST) as archive:
        return archive["image"], archive["labels"]


def accuracy(model: ir.Model, images: np.ndarray, labels: np.ndarray) -> float:
    session = sg.runtime.create_session(model)
    scores = next(iter(sg.runtime.run(session, {"image": images}).values()))
    return float((scores.argmax(axis=1) == labels).mean())


def ops(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph)


def ort_optimized_ops(model: ir.Model) -> collections.Counter[str]:
    """Op types of the graph onnxruntime actually runs (its optimized model, extended level)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = path
        ort.InferenceSession(model_bytes(model), options, providers=["CPUExecutionProvider"])
        return collections.Counter(node.op_type for node in onnx.load(path).graph.node)


def dq_feeding(model: ir.Model, node: ir.Node, index: int) -> ir.Node | None:
    """The DequantizeLinear that produces input `index` of `node`, if any."""
    value = node.inputs[index]
    source = value.producer() if value is not None else None
    return source if source is not None and source.op_type == "DequantizeLinear" else None


def const(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, int, list]],
    outputs: Sequence[tuple[str, int, list]],
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 17,
) -> ir.Model:
    graph = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(a, name) for name, a in (initializers or {}).items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


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
                      [("y", TensorProto.FLOAT, ["batch", 3])], inits)


def linear_feeds(count: int = 4, batch: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 16)).astype(np.float32)} for _ in range(count)]


def bert_model() -> ir.Model:
    """The small BERT-style encoder with symbolic batch and sequence (as real exports have)."""
    from tests import models as test_models

    ids, mask = test_models.example_input("bert", batch=2)
    dims = {0: "batch", 1: "seq"}
    return sg.from_torch(test_models.build("bert"), (ids, mask), dynamic_shapes=(dims, dims))


def bert_batches(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` feeds of 4 sentences of 16 tokens, each padded after a random length."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        ids = rng.integers(0, 1000, (4, 16)).astype(np.int64)
        mask = np.ones((4, 16), np.int64)
        mask[:, rng.integers(6, 16):] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches
