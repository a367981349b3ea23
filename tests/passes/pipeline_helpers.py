"""Hand-built graphs and onnxruntime checks shared by the pipeline tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from slimgraph.runtime import create_session, run

__all__ = [
    "make_model",
    "initializer",
    "ops",
    "outputs_of",
    "assert_same_outputs",
    "feeds_for",
]


def initializer(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, Sequence[int | str]]],
    outputs: Sequence[str],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = 17,
    ir_version: int | None = None,
    initializers_as_inputs: bool = False,
    output_types: Mapping[str, int] | None = None,
) -> ir.Model:
    """A float32 model from onnx.helper nodes; output types are left to shape inference."""
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    if initializers_as_inputs:
        graph_inputs += [
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in initializers
        ]
    graph = helper.make_graph(
        list(nodes),
        "test",
        graph_inputs,
        [
            helper.make_tensor_value_info(n, (output_types or {}).get(n, TensorProto.FLOAT), None)
            for n in outputs
        ],
        list(initializers),
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = ir_version or min(onnx.IR_VERSION, 8 if opset <= 17 else 10)
    proto = onnx.shape_inference.infer_shapes(proto)
    return ir.from_proto(proto)


def ops(model: ir.Model) -> Counter[str]:
    return Counter(node.op_type for node in model.graph)


def feeds_for(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    from slimgraph.runtime import random_feeds

    return random_feeds(model, seed=seed)


def outputs_of(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run(create_session(model, optimization="disable"), feeds)


def assert_same_outputs(
    reference: ir.Model, candidate: ir.Model, feeds: Mapping[str, np.ndarray] | None = None
) -> None:
    """Exact-pass tolerance: rtol 1e-4, atol 1e-5 x max(1, max |ref|), per output name."""
    feeds = feeds if feeds is not None else feeds_for(reference)
    ref = outputs_of(reference, feeds)
    cand = outputs_of(candidate, feeds)
    assert ref.keys() == cand.keys()
    for name, expected in ref.items():
        atol = 1e-5 * max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(cand[name], expected, rtol=1e-4, atol=atol, err_msg=name)
