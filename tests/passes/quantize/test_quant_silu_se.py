"""Static int8 placement on SiLU and squeeze-excitation blocks (EfficientNet-style)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

import slimgraph as sg
from tests.kit.asserts import ort_optimized_ops
from tests.kit.graphs import make_model, ops

CHANNELS, SQUEEZE, SIZE = 16, 4, 8


def _silu(x: str, y: str, name: str) -> list:
    return [helper.make_node("Sigmoid", [x], [f"{name}_sig"], name=f"{name}_sigmoid"),
            helper.make_node("Mul", [x, f"{name}_sig"], [y], name=f"{name}_mul")]


def silu_se_net() -> ir.Model:
    """stem 3x3 conv + SiLU -> depthwise 3x3 + SiLU -> SE (global mean, 1x1 + SiLU, 1x1 +
    Sigmoid, gate Mul) -> 1x1 projection -> output."""
    rng = np.random.default_rng(0)
    c, s = CHANNELS, SQUEEZE
    weights = {
        "stem_w": rng.normal(0, 0.3, (c, 3, 3, 3)), "stem_b": rng.normal(0, 0.1, c),
        "dw_w": rng.normal(0, 0.3, (c, 1, 3, 3)), "dw_b": rng.normal(0, 0.1, c),
        "fc1_w": rng.normal(0, 0.3, (s, c, 1, 1)), "fc1_b": rng.normal(0, 0.1, s),
        "fc2_w": rng.normal(0, 0.3, (c, s, 1, 1)), "fc2_b": rng.normal(0, 0.1, c),
        "proj_w": rng.normal(0, 0.3, (8, c, 1, 1)), "proj_b": rng.normal(0, 0.1, 8),
        "axes": np.array([2, 3], np.int64),
    }
    weights = {k: v if v.dtype == np.int64 else v.astype(np.float32) for k, v in weights.items()}
    nodes = [
        helper.make_node("Conv", ["x", "stem_w", "stem_b"], ["stem"], name="stem", pads=[1] * 4),
        *_silu("stem", "stem_act", "stem"),
        helper.make_node("Conv", ["stem_act", "dw_w", "dw_b"], ["dw"], name="dw", pads=[1] * 4,
                         group=c),
        *_silu("dw", "dw_act", "dw"),
        helper.make_node("ReduceMean", ["dw_act", "axes"], ["pooled"], name="se_mean",
                         keepdims=1),
        helper.make_node("Conv", ["pooled", "fc1_w", "fc1_b"], ["fc1"], name="fc1"),
        *_silu("fc1", "fc1_act", "fc1"),
        helper.make_node("Conv", ["fc1_act", "fc2_w", "fc2_b"], ["fc2"], name="fc2"),
        helper.make_node("Sigmoid", ["fc2"], ["gate"], name="se_sigmoid"),
        helper.make_node("Mul", ["dw_act", "gate"], ["excited"], name="se_mul"),
        helper.make_node("Conv", ["excited", "proj_w", "proj_b"], ["y"], name="proj"),
    ]
    return make_model(nodes, [("x", [None, 3, SIZE, SIZE])], ["y"], weights, opset=18)


def _rows(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (n, 3, SIZE, SIZE)).astype(np.float32)}


@pytest.fixture(scope="module")
def silu_se_int8() -> tuple[ir.Model, ir.Model]:
    model = silu_se_net()
    return model, sg.quantize(model, calibration=_rows(64, 0), progress=False,
                              activation_dtype="uint8")


def _reads_dq(node: ir.Node, index: int) -> bool:
    value = node.inputs[index]
    source = value.producer() if value is not None else None
    return source is not None and source.op_type == "DequantizeLinear"


def _feeds_q(node: ir.Node) -> bool:
    users = node.outputs[0].consumers()
    return bool(users) and all(u.op_type == "QuantizeLinear" for u in users)


def test_silu_and_se_gate_are_quantized_between_dq_and_q(silu_se_int8) -> None:
    _, q = silu_se_int8
    named = {node.name: node for node in q.graph}
    for name in ("stem_sigmoid", "dw_sigmoid", "fc1_sigmoid", "se_sigmoid"):
        assert _reads_dq(named[name], 0) and _feeds_q(named[name]), name
    for name in ("stem_mul", "dw_mul", "fc1_mul", "se_mul"):  # two quantized activations
        node = named[name]
        assert _reads_dq(node, 0) and _reads_dq(node, 1) and _feeds_q(node), name
    # the squeeze (ReduceMean over H, W with keepdims) is the GlobalAveragePool it is, in int8
    pool = named["se_mean"]
    assert pool.op_type == "GlobalAveragePool" and _reads_dq(pool, 0) and _feeds_q(pool)
    assert "ReduceMean" not in ops(q)
    assert not _feeds_q(named["proj"])  # the graph output stays float


def test_onnxruntime_runs_silu_and_se_in_integer_kernels(silu_se_int8) -> None:
    _, q = silu_se_int8
    fused = ort_optimized_ops(q)
    assert fused["QLinearConv"] == 4  # and the output projection, whose output is float
    assert fused["QLinearSigmoid"] == 4 and fused["QLinearMul"] == 4
    assert fused["QLinearGlobalAveragePool"] == 1
    assert "Sigmoid" not in fused and "ReduceMean" not in fused


def test_silu_se_int8_output_cosine_against_fp32(silu_se_int8) -> None:
    import onnxruntime as ort

    from slimgraph.runtime import model_bytes

    model, q = silu_se_int8
    feed = _rows(32, 1)
    ref = ort.InferenceSession(model_bytes(model), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(model_bytes(q), providers=["CPUExecutionProvider"])
    a = ref.run(None, feed)[0].reshape(32, -1)
    b = got.run(None, feed)[0].reshape(32, -1)
    cosine = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.998, cosine.min()


def test_gated_matmuls_without_a_convolution_stay_float() -> None:
    """The element-wise rule follows convolutions' feature maps: a transformer-style gated
    MLP (MatMul -> SiLU -> MatMul) keeps its Sigmoid and Mul float, as before."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.normal(0, 0.3, (8, 16)).astype(np.float32),
               "w2": rng.normal(0, 0.3, (16, 8)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             *_silu("h", "h_act", "act"),
             helper.make_node("MatMul", ["h_act", "w2"], ["y"], name="down")]
    model = make_model(nodes, [("x", [None, 4, 8])], ["y"], weights)
    calib = {"x": rng.normal(0, 1, (16, 4, 8)).astype(np.float32)}
    q = sg.quantize(model, calibration=calib, progress=False)
    named = {node.name: node for node in q.graph}
    assert not _feeds_q(named["act_sigmoid"])
    assert not _reads_dq(named["act_mul"], 1)


def test_int8_activations_keep_the_element_wise_ops_float() -> None:
    """The Sigmoid/Mul rule is for uint8 activations (onnxruntime fuses them into QLinearSigmoid
    and QLinearMul on x86); with int8 activations they stay float as before."""
    q = sg.quantize(silu_se_net(), calibration=_rows(16, 0), progress=False,
                    activation_dtype="int8")
    named = {node.name: node for node in q.graph}
    for name in ("stem_sigmoid", "se_sigmoid"):
        assert not _feeds_q(named[name]), name
    assert not _reads_dq(named["se_mul"], 1)
    assert named["se_mean"].op_type == "ReduceMean"  # its input is float: left as it was
