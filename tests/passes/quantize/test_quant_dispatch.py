"""sg.quantize routes each mode to its pass with the measured-fastest default format."""

from __future__ import annotations

import pytest

import slimgraph as sg
from slimgraph import runtime
from tests.kit.exports import exported_model


def _ops(model) -> set[str]:
    return {node.op_type for node in model.graph}


def test_weight_only_defaults_to_matmulnbits_and_qdq_gives_standard_dequantize() -> None:
    model = exported_model("mlp")
    feeds = runtime.random_feeds(model, seed=1)
    nbits = sg.quantize(model, mode="weight-only", block_size=16)
    standard = sg.quantize(model, mode="weight-only", fmt="qdq", block_size=16)
    assert "MatMulNBits" in _ops(nbits) and "MatMul" not in _ops(nbits)
    assert "DequantizeLinear" in _ops(standard) and "MatMulNBits" not in _ops(standard)
    for candidate in (nbits, standard):
        assert sg.compare(model, candidate, feeds).worst_cosine > 0.99
    # the same int4 blocks through two kernels: far closer to each other than to fp32
    assert sg.compare(nbits, standard, feeds).worst_sqnr_db > 35


def test_dynamic_honours_exclude_ops() -> None:
    model = exported_model("mlp")
    assert _ops(sg.quantize(model, mode="dynamic")) & {"MatMulInteger", "DynamicQuantizeMatMul"}
    with pytest.raises(sg.UnsupportedModelError, match="op type MatMul excluded"):
        sg.quantize(model, mode="dynamic", exclude_ops=["MatMul"])


def test_dynamic_folds_weights_built_at_run_time() -> None:
    """Old exports build weights with ConstantOfShape; dynamic mode folds them, then quantizes."""
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper

    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25])
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["w_shape"], ["w"], value=value),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="fc"),
        ],
        "run_time_weight",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor("w_shape", TensorProto.INT64, [2], [16, 32])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    model = ir.from_proto(proto)
    onnx.checker.check_model(ir.to_proto(model))
    quantized = sg.quantize(model, mode="dynamic")
    assert _ops(quantized) & {"MatMulInteger", "DynamicQuantizeMatMul"}
    assert "ConstantOfShape" not in _ops(quantized)
    feeds = runtime.random_feeds(model)
    assert sg.compare(model, quantized, feeds).worst_cosine > 0.999
