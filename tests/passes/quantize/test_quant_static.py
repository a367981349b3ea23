"""Static QDQ quantization: accuracy, placement rules, onnxruntime fusion, exclusions."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import slimgraph as sg
from slimgraph.api.quantize import report_of
from slimgraph.errors import BadOptionError
from slimgraph.runtime import compare, random_feeds
from tests.kit.asserts import accuracy, ort_optimized_ops
from tests.kit.data import DIGITS_CALIB, bert_batches, digits, digits_test, linear_feeds
from tests.kit.exports import bert_model, exported_model
from tests.kit.graphs import const, dq_feeding, linear_model, make_model, ops


@pytest.fixture(scope="module")
def digits_int8():
    return sg.quantize(digits(), calibration=DIGITS_CALIB, report=True, progress=False)


def test_digits_int8_accuracy_within_0_3_points_of_fp32(digits_int8) -> None:
    images, labels = digits_test()
    fp32 = accuracy(digits(), images, labels)
    int8 = accuracy(digits_int8, images, labels)
    assert fp32 > 0.98
    assert int8 >= fp32 - 0.003, (fp32, int8)


def test_digits_qdq_fuses_into_integer_kernels(digits_int8) -> None:
    source = ops(digits())
    fused = ort_optimized_ops(digits_int8)
    assert fused["QLinearConv"] == source["Conv"] == 6
    assert fused["QLinearAdd"] == source["Add"] == 2  # residual adds of two quantized values
    assert "Conv" not in fused and "Relu" not in fused  # Relu absorbed into the int8 range


def test_digits_weights_int8_per_channel_axis_0_biases_int32(digits_int8) -> None:
    convs = [n for n in digits_int8.graph if n.op_type == "Conv"]
    for conv in convs:
        weight_dq = dq_feeding(digits_int8, conv, 1)
        assert weight_dq is not None and weight_dq.attributes["axis"].value == 0
        weights = const(weight_dq.inputs[0])
        scales = const(weight_dq.inputs[1])
        assert weights.dtype == np.int8 and np.abs(weights).max() == 127
        assert scales.shape == (weights.shape[0],)
        bias_dq = dq_feeding(digits_int8, conv, 2)
        assert bias_dq is not None and const(bias_dq.inputs[0]).dtype == np.int32
        act_dq = dq_feeding(digits_int8, conv, 0)
        np.testing.assert_allclose(
            const(bias_dq.inputs[1]), const(act_dq.inputs[1]) * scales, rtol=1e-6
        )
        assert const(act_dq.inputs[2]).dtype == np.uint8
        # Symmetric weights and biases have all-zero zero points: left out (the ONNX default).
        assert len(weight_dq.inputs) == 2 and len(bias_dq.inputs) == 2


def test_digits_symbolic_batch_still_works(digits_int8) -> None:
    images, _ = digits_test()
    for batch in (1, 37):
        fidelity = compare(digits(), digits_int8, {"image": images[:batch]})
        assert fidelity.outputs[0].shape == (batch, 10)
        assert fidelity.worst_cosine > 0.999


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse", "moving-average"])
def test_every_calibrator_keeps_digits_accuracy(method: str) -> None:
    images, labels = digits_test()
    model = sg.quantize(digits(), calibration=DIGITS_CALIB, method=method, progress=False)
    assert accuracy(model, images, labels) >= accuracy(digits(), images, labels) - 0.01


def test_matmul_and_gemm_weight_axes_follow_output_features() -> None:
    model = linear_model()
    quantized = sg.quantize(model, calibration=linear_feeds(count=32), progress=False)
    nodes = {n.name: n for n in quantized.graph}
    expected = {"mm0": (1, 8), "gemm1": (0, 4), "gemm2": (1, 3)}  # axis, output features
    for name, (axis, features) in expected.items():
        dq = dq_feeding(quantized, nodes[name], 1)
        assert dq.attributes["axis"].value == axis, name
        assert const(dq.inputs[1]).shape == (features,), name
    fidelity = compare(model, quantized, linear_feeds(count=2, seed=1))
    assert fidelity.worst_cosine > 0.998


def test_per_tensor_option_gives_scalar_weight_scales() -> None:
    quantized = sg.quantize(linear_model(), calibration=linear_feeds(), per_channel=False,
                            progress=False)
    for node in quantized.graph:
        if node.op_type in ("MatMul", "Gemm"):
            dq = dq_feeding(quantized, node, 1)
            assert const(dq.inputs[1]).shape == () and "axis" not in dq.attributes


def test_tied_weight_is_quantized_once() -> None:
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="second"),
    ]
    model = make_model(nodes, [("x", TensorProto.FLOAT, ["n", 8])],
                       [("y", TensorProto.FLOAT, ["n", 8])], {"w": w})
    feeds = [{"x": np.random.default_rng(i).standard_normal((4, 8)).astype(np.float32)}
             for i in range(3)]
    quantized = sg.quantize(model, calibration=feeds, progress=False)
    int8 = [v for v in quantized.graph.initializers.values()
            if v.const_value.dtype.name == "INT8" and v.const_value.size > 8]
    assert [v.name for v in int8] == ["w_quantized"]
    assert "w" not in quantized.graph.initializers
    assert compare(model, quantized, feeds).worst_cosine > 0.999


def test_convtranspose_weights_per_channel_on_axis_1() -> None:
    model = exported_model("convtranspose")
    feeds = [random_feeds(model, seed=i) for i in range(4)]
    quantized = sg.quantize(model, calibration=feeds, progress=False)
    (up,) = [n for n in quantized.graph if n.op_type == "ConvTranspose"]
    dq = dq_feeding(quantized, up, 1)
    weights = const(dq.inputs[0])
    assert dq.attributes["axis"].value == 1
    assert const(dq.inputs[1]).shape == (weights.shape[1],) == (8,)
    assert compare(model, quantized, random_feeds(model, seed=9)).worst_cosine > 0.99


def test_concat_inputs_and_output_share_one_scale() -> None:
    model = exported_model("densenet")
    feeds = [random_feeds(model, seed=i) for i in range(4)]
    quantized = sg.quantize(model, calibration=feeds, progress=False)
    # activation concats; the symbolic batch adds a Concat of int64 shape values (never quantized)
    concats = [n for n in quantized.graph
               if n.op_type == "Concat" and n.outputs[0].dtype != ir.DataType.INT64]  # fmt: skip
    assert len(concats) == 5
    for concat in concats:
        scales = set()
        for index in range(len(concat.inputs)):
            dq = dq_feeding(quantized, concat, index)
            assert dq is not None, concat.name
            scales.add((float(const(dq.inputs[1])), int(const(dq.inputs[2]))))
        (q,) = [u for u in concat.outputs[0].consumers() if u.op_type == "QuantizeLinear"]
        scales.add((float(const(q.inputs[1])), int(const(q.inputs[2]))))
        assert len(scales) == 1, (concat.name, scales)
    assert ort_optimized_ops(quantized)["QLinearConv"] > 0
    assert compare(model, quantized, random_feeds(model, seed=9)).worst_cosine > 0.99


def test_exclusion_by_layer_pattern_keeps_those_convs_float(digits_int8) -> None:
    model = sg.quantize(digits(), calibration=DIGITS_CALIB, exclude=["block1.*"], progress=False)
    for node in model.graph:
        if node.op_type == "Conv":
            weight = node.inputs[1]
            is_float = weight.const_value is not None and weight.dtype.name == "FLOAT"
            assert is_float == weight.name.startswith("block1."), weight.name


def test_exclusion_by_op_type_and_by_reported_node_name(digits_int8) -> None:
    model = sg.quantize(digits(), calibration=DIGITS_CALIB, exclude_ops=["Gemm"], progress=False)
    (gemm,) = [n for n in model.graph if n.op_type == "Gemm"]
    assert dq_feeding(model, gemm, 1) is None
    report = report_of(digits_int8)
    worst = next(r for r in report.rows if r.kind == "activation")
    again = sg.quantize(digits(), calibration=DIGITS_CALIB, exclude=[worst.node], report=True,
                        progress=False)
    assert worst.node not in {r.node for r in report_of(again).rows if r.kind == "weight"}


def test_report_lists_every_quantized_tensor_worst_first(digits_int8) -> None:
    report = report_of(digits_int8)
    weights = [r for r in report.rows if r.kind == "weight"]
    assert len(weights) == 7  # six convs and the classifier
    own = [r.own_sqnr_db for r in report.rows]
    assert own == sorted(own)
    assert all(20 < r.sqnr_db < 80 for r in report.rows if r.kind == "activation")
    assert report.outputs.worst_cosine > 0.999
    assert "worst tensors" in report.summary()


def test_report_runs_on_the_first_rows_only_and_matches_float64_sums() -> None:
    from slimgraph.passes.quantize import report as report_module

    feeds = linear_feeds(count=40)  # 320 rows in batches of 8
    quantized = sg.quantize(linear_model(), calibration=feeds, report=True, progress=False)
    report = report_of(quantized)
    assert report.outputs.samples == report_module.REPORT_SAMPLES  # rows
    assert report.outputs.batches == report_module.REPORT_SAMPLES // 8  # in batches of 8 rows
    assert f"errors measured on {report_module.REPORT_SAMPLES} calibration samples" in (
        report.summary())
    values = np.random.default_rng(0).standard_normal(3_000_000).astype(np.float32) * 7
    exact = float(np.sum(values.astype(np.float64) ** 2))
    assert report_module._square_sum(values) == pytest.approx(exact, rel=1e-5)
    masked = np.array([1.0, -3.4e38, 2.0], np.float32)  # a float32 square would overflow
    assert report_module._square_sum(masked) == pytest.approx(3.4e38**2 + 5.0, rel=1e-6)


@pytest.fixture(scope="module")
def bert_dynamic():
    """The small BERT-style encoder with symbolic batch and sequence (as real exports have).

    With fully static shapes onnxruntime's fp32 MatMul+Add->Gemm fusion runs before its QDQ
    fusion and the int8 MatMuls stay simulated (correct, not faster)."""
    return bert_model()


def test_bert_static_keeps_mask_path_float_and_cosine_high(bert_dynamic) -> None:
    model = ir.from_proto(ir.to_proto(bert_dynamic))
    calib = bert_batches(6)
    quantized = sg.quantize(model, calibration=calib, progress=False)
    float_ops = ("Where", "Greater", "Softmax", "LayerNormalization", "Cast", "Gelu", "Div")
    for node in quantized.graph:
        if node.op_type in float_ops:
            for index in range(len(node.inputs)):
                assert dq_feeding(quantized, node, index) is None, node.name
        if node.op_type in ("Where", "Greater"):
            assert not any(u.op_type == "QuantizeLinear" for u in node.outputs[0].consumers())
    assert ops(quantized)["DequantizeLinear"] > 0
    assert ort_optimized_ops(quantized)["MatMulIntegerToFloat"] >= 8
    # the token embedding is stored int8; its rows are dequantized after the Gather
    (table,) = [v for v in quantized.graph.initializers.values() if v.shape == (1000, 64)]
    assert table.dtype == ir.DataType.INT8
    gather = next(u for u in table.consumers() if u.op_type == "Gather")
    assert gather.outputs[0].consumers()[0].op_type == "DequantizeLinear"
    assert compare(model, quantized, bert_batches(3, seed=1)).worst_cosine >= 0.9995


def test_softmax_and_attention_matmuls_quantized_when_asked(bert_dynamic) -> None:
    model = ir.from_proto(ir.to_proto(bert_dynamic))
    quantized = sg.quantize(model, calibration=bert_batches(6), include_ops=["Softmax", "MatMul"],
                            progress=False)
    softmaxes = [n for n in quantized.graph if n.op_type == "Softmax"]
    assert len(softmaxes) == 2  # one per encoder layer
    for node in softmaxes:
        assert dq_feeding(quantized, node, 0) is not None
        assert node.outputs[0].consumers()[0].op_type == "QuantizeLinear"
    # the attention products (two activations) read DQ outputs on both sides
    dqs = {n.name: [dq_feeding(quantized, n, i) for i in (0, 1)]
           for n in quantized.graph if n.op_type == "MatMul"}
    attention = [name for name, (a, b) in dqs.items()
                 if a is not None and b is not None and b.inputs[0].const_value is None]
    assert len(attention) == 4
    assert ort_optimized_ops(quantized)["QLinearSoftmax"] == 2
    # the mask path itself stays float: only the ops asked for changed
    for node in quantized.graph:
        if node.op_type in ("Where", "Greater", "LayerNormalization"):
            assert dq_feeding(quantized, node, 0) is None, node.name
    assert compare(model, quantized, bert_batches(3, seed=1)).worst_cosine >= 0.997


def test_include_op_refuses_what_is_quantized_already_and_other_modes() -> None:
    with pytest.raises(BadOptionError, match="^--include-op Conv: quantized by default already"):
        sg.quantize(digits(), calibration=DIGITS_CALIB, include_ops=["Conv"])
    with pytest.raises(BadOptionError, match="applies to static quantization .* not to dynamic"):
        sg.quantize(digits(), include_ops=["Softmax"])
    with pytest.raises(BadOptionError, match="^--include-op Softmx: the model has no such node$"):
        sg.quantize(digits(), calibration=DIGITS_CALIB, include_ops=["Softmx"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["squeezenet", "shufflenet"])
def test_model_zoo_opset_9_models_quantize_and_fuse(name: str) -> None:
    from tests.kit.data import ZOO_DIR

    model = sg.load(ZOO_DIR / f"light_{name}.onnx")
    feeds = [random_feeds(model, seed=i) for i in range(2)]
    quantized = sg.quantize(model, calibration=feeds, progress=False)
    assert quantized.opset_imports[""] >= 13  # converted for per-channel QDQ
    fused = ort_optimized_ops(quantized)
    assert fused["QLinearConv"] >= ops(model)["Conv"] // 2
    assert compare(model, quantized, feeds).worst_cosine > 0.98
