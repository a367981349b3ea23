"""QOperator output: QLinearConv, QLinearMatMul, MatMulIntegerToFloat, ConvInteger in the graph."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

import slimgraph as sg
from slimgraph.passes.quantize.qoperator import QOperatorPass
from slimgraph.runtime import compare
from tests.kit.asserts import accuracy
from tests.kit.data import DIGITS_CALIB, bert_batches, digits, digits_test, linear_feeds
from tests.kit.exports import bert_model
from tests.kit.graphs import linear_model, make_model, ops


def test_digits_qoperator_has_qlinearconv_and_matches_qdq() -> None:
    qdq = sg.quantize(digits(), calibration=DIGITS_CALIB, progress=False)
    qop = sg.quantize(digits(), calibration=DIGITS_CALIB, fmt="qoperator", progress=False)
    counts = ops(qop)
    assert counts["QLinearConv"] == 6 and "Conv" not in counts
    assert counts["MatMulIntegerToFloat"] == 1 and "Gemm" not in counts
    images, labels = digits_test()
    assert compare(qdq, qop, {"image": images}).worst_cosine > 0.9999
    assert accuracy(qop, images, labels) >= accuracy(digits(), images, labels) - 0.003


def test_linear_model_gets_qlinearmatmul_and_matmulinteger() -> None:
    model = linear_model()
    calib = linear_feeds(count=16)
    qdq = sg.quantize(model, calibration=calib, progress=False)
    qop = QOperatorPass()(qdq).model
    counts = ops(qop)
    # mm0 -> Relu -> Q: QLinearMatMul; the Gemms (float outputs) become MatMulIntegerToFloat
    assert counts["QLinearMatMul"] == 1 and counts["MatMulIntegerToFloat"] == 2
    assert not {"MatMul", "Gemm", "Relu"} & set(counts)
    feeds = linear_feeds(count=2, seed=3)
    np.testing.assert_array_less(0.9999, compare(qdq, qop, feeds).worst_cosine)


def test_conv_with_float_output_becomes_convinteger() -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = make_model(
        nodes,
        [("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [("y", TensorProto.FLOAT, ["n", 4, 8, 8])],
        {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
         "b": rng.standard_normal(4).astype(np.float32)},
    )
    feeds = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    qop = sg.quantize(model, calibration=feeds, fmt="qoperator", progress=False)
    counts = ops(qop)
    assert counts["ConvInteger"] == 1 and "Conv" not in counts  # the output is a graph output
    assert compare(model, qop, feeds[:2]).worst_cosine > 0.999


def test_relu6_clip_is_absorbed_into_qlinearconv() -> None:
    # MobileNetV2's Conv -> Clip(0, 6) -> Q: the quantized range [0, r <= 6] makes the Clip
    # redundant, so every conv becomes QLinearConv (ConvInteger would run several times slower
    # than float32), and the result matches the QDQ model.
    from tests.kit.exports import exported_model

    model = exported_model("mobilenetv2")
    feeds = [sg.runtime.random_feeds(model, batch=4, seed=s) for s in range(4)]
    qdq = sg.quantize(model, calibration=feeds, progress=False)
    qop = QOperatorPass()(qdq).model
    counts = ops(qop)
    assert counts["QLinearConv"] == ops(model)["Conv"]
    assert not {"ConvInteger", "Clip", "Conv"} & set(counts)
    assert compare(qdq, qop, feeds[:2]).worst_cosine > 0.9999


def test_clip_below_the_quantized_range_stays() -> None:
    # Clip(0, 1) in front of a QuantizeLinear whose range reaches 6 is not redundant: the
    # QOperator form must keep it (a float-output ConvInteger path), not drop it.
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="clip"),
        helper.make_node("Conv", ["y", "w2"], ["z"], name="conv2"),
    ]
    model = make_model(
        nodes,
        [("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [("z", TensorProto.FLOAT, ["n", 4, 6, 6])],
        {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
         "w2": rng.standard_normal((4, 4, 3, 3)).astype(np.float32),
         "lo": np.array(0.0, np.float32), "hi": np.array(1.0, np.float32)},
    )
    feeds = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    qdq = sg.quantize(model, calibration=feeds, progress=False)
    # Widen the Clip's output range as a coarser calibration would: scale * 255 = 6 > 1.
    (q,) = [n for n in qdq.graph if n.op_type == "QuantizeLinear"
            and n.inputs[0].producer() is not None and n.inputs[0].producer().op_type == "Clip"]
    q.inputs[1].const_value = ir.tensor(np.array(6.0 / 255, np.float32))
    qop = QOperatorPass()(qdq).model
    assert ops(qop)["Clip"] == 1
    assert compare(qdq, qop, feeds[:2]).worst_cosine > 0.9999


def test_transformer_linears_become_matmulintegertofloat_with_their_bias() -> None:
    qdq = sg.quantize(bert_model(), calibration=bert_batches(6), progress=False)
    qop = QOperatorPass()(qdq).model
    linears = [n for n in qdq.graph if n.op_type == "MatMul"
               and n.inputs[1].producer() is not None
               and n.inputs[1].producer().op_type == "DequantizeLinear"]
    fused = [n for n in qop.graph if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == len(linears) == 12  # 2 layers x (q, k, v, out, ffn1, ffn2)
    assert all(n.domain == "com.microsoft" and len(n.inputs) == 7 for n in fused)  # + bias
    assert ops(qop)["Add"] == ops(qdq)["Add"] - 12  # every bias Add went into its kernel
    assert compare(qdq, qop, bert_batches(2, seed=1)).worst_cosine > 0.9999
