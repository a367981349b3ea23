"""Weight-only methods on hand-built graphs: HQQ's grids, GPTQ's error feedback, AWQ's folds."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from slimgraph.errors import BadOptionError
from slimgraph.passes._kit import set_constant
from slimgraph.passes.quantize._inputs import InputStats, collect_inputs
from slimgraph.passes.quantize.awq import AWQOptions, AWQTarget, awq_scale
from slimgraph.passes.quantize.gptq import GPTQOptions, gptq_quantize
from slimgraph.passes.quantize.hqq import hqq_quantize
from slimgraph.passes.quantize.weight_only import quantize_weight_only
from slimgraph.runtime import create_session, run
from slimgraph.runtime.quant_math import quantize_tensor, weight_spec

H = onnx.helper
F = onnx.TensorProto.FLOAT


def _model(nodes: list, inputs: list, outputs: list, inits: dict[str, np.ndarray]) -> ir.Model:
    graph = H.make_graph(nodes, "g", inputs, outputs,
                         [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = H.make_model(graph, opset_imports=[H.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(proto)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def _correlated(rows: int, k: int, seed: int, draw: int = 0) -> np.ndarray:
    """Inputs whose channels are mixed and unevenly scaled (what a Hessian is for): the
    distribution is fixed by `seed`, the rows by `draw`."""
    rng = np.random.default_rng(seed)
    mix = (rng.standard_normal((k, k)) * 0.4 + np.eye(k)) * np.exp(rng.standard_normal(k))
    rows_rng = np.random.default_rng([seed, draw])
    return (rows_rng.standard_normal((rows, k)) @ mix).astype(np.float32)


# --------------------------------------------------------------------------------------- HQQ


@settings(max_examples=25, deadline=None)
@given(
    weight=hnp.arrays(np.float32, st.tuples(st.sampled_from([16, 32, 48]), st.integers(1, 5)),
                      elements=st.floats(-4, 4, width=32)),
    bits=st.sampled_from([4, 8]),
)
def test_hqq_block_error_never_above_round_to_nearest(weight: np.ndarray, bits: int) -> None:
    spec = weight_spec(bits, False, axis=0, block_size=16)
    k = weight.shape[0]
    hqq = np.abs(hqq_quantize(weight, spec).dequantize()[:k] - weight)
    rtn = np.abs(quantize_tensor(weight, spec).dequantize()[:k] - weight)
    per_block = lambda e: e.reshape(-1, 16, e.shape[1]).mean(axis=1)  # noqa: E731
    assert np.all(per_block(hqq) <= per_block(rtn) * (1 + 1e-5) + 1e-7)


def test_hqq_lowers_the_error_of_heavy_tailed_weights_and_keeps_integer_zero_points() -> None:
    rng = np.random.default_rng(0)
    weight = (rng.standard_t(3, (256, 64)) * 0.02).astype(np.float32)
    spec = weight_spec(4, False, axis=0, block_size=64)
    q = hqq_quantize(weight, spec)
    assert q.zero_point is not None and q.zero_point.dtype == np.uint8
    assert q.codes.min() >= 0 and q.codes.max() <= 15
    hqq = np.abs(q.dequantize() - weight).mean()
    rtn = np.abs(quantize_tensor(weight, spec).dequantize() - weight).mean()
    assert hqq < 0.97 * rtn
    with pytest.raises(ValueError, match="HQQ needs a block-wise spec with zero points"):
        hqq_quantize(weight, weight_spec(4, True, axis=0, block_size=64))


# -------------------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_on_correlated_inputs(symmetric: bool,
                                                           act_order: bool) -> None:
    k, n = 128, 48
    x = _correlated(1024, k, seed=1)
    weight = (np.random.default_rng(2).standard_normal((k, n)) * 0.05).astype(np.float32)
    spec = weight_spec(4, symmetric, axis=0, block_size=32)
    gptq = gptq_quantize(weight, x.astype(np.float64).T @ x, spec,
                         GPTQOptions(act_order=act_order))
    held_out = _correlated(512, k, seed=1, draw=1)  # same distribution, other rows

    def error(q: np.ndarray) -> float:
        return float(np.mean((held_out @ q[:k] - held_out @ weight) ** 2))

    assert gptq.scale.shape == (k // 32, n) and gptq.codes.shape == (k, n)
    assert error(gptq.dequantize()) < 0.8 * error(quantize_tensor(weight, spec).dequantize())


def test_gptq_rows_no_input_reaches_are_zero_and_k_is_padded() -> None:
    k, n = 40, 8
    x = _correlated(256, k, seed=3)
    x[:, 5] = 0.0  # a dead input channel
    weight = np.random.default_rng(4).standard_normal((k, n)).astype(np.float32)
    q = gptq_quantize(weight, x.astype(np.float64).T @ x, weight_spec(4, False, axis=0,
                                                                     block_size=32))
    assert q.codes.shape == (64, n) and q.scale.shape == (2, n)
    np.testing.assert_array_equal(q.dequantize()[5], 0.0)


def _one_matmul(weight: np.ndarray) -> ir.Model:
    k, n = weight.shape
    return _model([H.make_node("MatMul", ["x", "w"], ["y"])],
                  [H.make_tensor_value_info("x", F, ["batch", k])],
                  [H.make_tensor_value_info("y", F, ["batch", n])], {"w": weight})


def test_gptq_through_the_pass_beats_round_to_nearest_on_onnxruntime() -> None:
    k, n = 128, 64
    weight = (np.random.default_rng(5).standard_normal((k, n)) * 0.05).astype(np.float32)
    model = _one_matmul(weight)
    calib = {"x": _correlated(512, k, seed=6)}
    held_out = {"x": _correlated(256, k, seed=6, draw=1)}
    reference = run(create_session(model), held_out)["y"]
    options = {"block_size": 32, "head_bits": None, "accuracy_level": 0}
    rtn = quantize_weight_only(model, **options)
    gptq = quantize_weight_only(model, method="gptq", calibration=calib, **options)
    errors = {name: float(np.mean((run(create_session(m), held_out)["y"] - reference) ** 2))
              for name, m in (("rtn", rtn), ("gptq", gptq))}
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_data_methods_need_calibration_data(method: str) -> None:
    with pytest.raises(BadOptionError, match=f"^method= {method} needs calibration data "
                       r"\(calibration=\)$"):
        quantize_weight_only(_one_matmul(np.ones((32, 4), np.float32)), method=method)


def test_unknown_method_and_symmetric_hqq_are_refused() -> None:
    model = _one_matmul(np.ones((32, 4), np.float32))
    with pytest.raises(BadOptionError, match="^unknown weight-only method 'gptz' "
                       r"\(choose rtn, hqq, gptq, awq\)$"):
        quantize_weight_only(model, method="gptz")
    with pytest.raises(BadOptionError, match="HQQ fits each block's zero point"):
        quantize_weight_only(model, method="hqq", symmetric=True)


# ------------------------------------------------------------------------------ input stats


def test_input_stats_stream_the_gram_and_keep_a_bounded_uniform_sample() -> None:
    k = 16
    model = _one_matmul(np.ones((k, 4), np.float32))
    data = _correlated(600, k, seed=7)
    batches = [{"x": data[i : i + 50]} for i in range(0, 600, 50)]
    stats = collect_inputs(model, ["x"], batches, gram=True, keep=100)["x"]
    assert stats.rows == 600 and stats.sample is not None and stats.sample.shape == (100, k)
    np.testing.assert_allclose(stats.gram, data.astype(np.float64).T @ data, rtol=1e-10)
    np.testing.assert_allclose(stats.mean_abs, np.abs(data).mean(axis=0), rtol=1e-6)
    rows = {row.tobytes() for row in data}
    assert all(row.tobytes() in rows for row in stats.sample)
    # rows from the whole stream, not just the first batches
    positions = [next(i for i, row in enumerate(data) if np.array_equal(row, s))
                 for s in stats.sample]
    assert max(positions) > 300


# --------------------------------------------------------------------------------------- AWQ


def _block(rng: np.random.Generator, d: int = 32, hidden: int = 64) -> ir.Model:
    """A decoder-style block with every kind of producer AWQ folds into:

    x -> LayerNorm -> {MatMul a, MatMul b};  silu(a) * b -> MatMul down;  r = x + down;
    RMSNorm(r) (decomposed, Mul by a constant gain) -> MatMul head;  x -> MatMul side (x is a
    graph input, also read by the residual Add: an inserted Mul).
    """
    w = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)  # noqa: E731
    nodes = [
        H.make_node("LayerNormalization", ["x", "ln_g", "ln_b"], ["ln"], axis=-1),
        H.make_node("MatMul", ["ln", "wa"], ["a"], name="a"),
        H.make_node("MatMul", ["ln", "wb"], ["b0"], name="b"),
        H.make_node("Add", ["b0", "bb"], ["b"]),
        H.make_node("Sigmoid", ["a"], ["sa"]),
        H.make_node("Mul", ["a", "sa"], ["silu"]),
        H.make_node("Mul", ["silu", "b"], ["h"]),
        H.make_node("MatMul", ["h", "wd"], ["down"], name="down"),
        H.make_node("Add", ["x", "down"], ["r"]),
        H.make_node("Mul", ["r", "r"], ["r2"]),
        H.make_node("ReduceMean", ["r2", "axes"], ["ms"], keepdims=1),
        H.make_node("Add", ["ms", "eps"], ["mse"]),
        H.make_node("Sqrt", ["mse"], ["rms"]),
        H.make_node("Div", ["r", "rms"], ["normed"]),
        H.make_node("Mul", ["rms_g", "normed"], ["rn"]),
        H.make_node("MatMul", ["rn", "wh"], ["logits"], name="head"),
        H.make_node("MatMul", ["x", "ws"], ["side"], name="side"),
    ]
    gain = (1 + rng.standard_normal(d) * 0.3).astype(np.float32)
    gain[:3] *= 12  # outlier channels: what AWQ's scales are for
    inits = {"ln_g": gain, "ln_b": w(d), "wa": w(d, hidden), "wb": w(d, hidden),
             "bb": w(hidden), "wd": w(hidden, d), "axes": np.array([-1], np.int64),
             "eps": np.array(1e-5, np.float32), "rms_g": gain[::-1].copy(), "wh": w(d, 48),
             "ws": w(d, 16)}
    return _model(nodes, [H.make_tensor_value_info("x", F, ["batch", d])],
                  [H.make_tensor_value_info("logits", F, ["batch", 48]),
                   H.make_tensor_value_info("side", F, ["batch", 16]),
                   H.make_tensor_value_info("r", F, ["batch", d])], inits)


def test_awq_folds_are_exact_in_float_and_land_where_expected() -> None:
    rng = np.random.default_rng(8)
    model = _block(rng)
    feeds = {"x": (rng.standard_normal((256, 32)) * np.exp(rng.standard_normal(32))).astype(
        np.float32)}
    before = run(create_session(model), feeds)
    matmuls = {n.name: n for n in model.graph if n.op_type == "MatMul"}
    spec = weight_spec(4, False, axis=0, block_size=16)
    targets = [AWQTarget(node, node.inputs[1].const_value.numpy(), spec)
               for node in matmuls.values()]
    names = list(dict.fromkeys(t.node.inputs[0].name for t in targets))
    stats = collect_inputs(model, names, [feeds], gram=False, keep=256)
    result = awq_scale(model.graph, targets, stats, AWQOptions(clip=False))
    folds = {group.nodes: (group.alpha, group.fold) for group in result.groups}
    assert all(alpha > 0 for alpha, _ in folds.values()), folds
    assert folds[("a", "b")][1].startswith("gain of LayerNormalization")
    assert folds[("down",)][1] == "output columns of MatMul 'b'"
    assert folds[("head",)][1].startswith("constant of Mul")
    assert folds[("side",)][1] == "inserted Mul"
    for group in result.groups:
        assert group.error_awq <= group.error_rtn
    # the scaled float weights in place of the originals: the same outputs as before
    for node, weight in result.weights.items():
        set_constant(node, 1, weight.astype(np.float32))
    after = run(create_session(model), feeds)
    for name, value in before.items():
        scale = np.abs(value).max()
        np.testing.assert_allclose(after[name], value, rtol=1e-4, atol=1e-5 * scale)


def test_awq_through_the_pass_beats_round_to_nearest_on_outlier_channels() -> None:
    rng = np.random.default_rng(9)
    model = _block(rng)
    x = (rng.standard_normal((512, 32)) * np.exp(rng.standard_normal(32))).astype(np.float32)
    calib, held_out = {"x": x[:256]}, {"x": x[256:]}
    reference = run(create_session(model), held_out)
    options = {"block_size": 16, "head_bits": None, "accuracy_level": 0}
    rtn = quantize_weight_only(model, **options)
    awq = quantize_weight_only(model, method="awq", calibration=calib, **options)
    assert "Mul" in [n.op_type for n in awq.graph]  # the inserted one (side)

    def error(m: ir.Model) -> float:
        got = run(create_session(m), held_out)
        return sum(float(np.mean((got[k] - v) ** 2)) for k, v in reference.items())

    assert error(awq) < 0.9 * error(rtn)


def test_clipping_never_raises_the_sampled_output_error() -> None:
    from slimgraph.passes.quantize.awq import clipped

    rng = np.random.default_rng(10)
    weight = (rng.standard_t(3, (64, 24)) * 0.05).astype(np.float32)
    x = _correlated(200, 64, seed=11).astype(np.float64)
    spec = weight_spec(4, False, axis=0, block_size=32)
    clip = clipped(weight, x, spec, AWQOptions())
    plain = quantize_tensor(weight, spec)
    err = lambda q: float(((x @ (q.dequantize().astype(np.float64) - weight)) ** 2).sum())  # noqa: E731
    assert err(clip) <= err(plain) * (1 + 1e-9)
    assert err(clip) < 0.95 * err(plain)


def test_input_stats_mean_abs_of_an_empty_record_is_guarded() -> None:
    record = InputStats()
    record.add(np.ones((3, 4), np.float32), gram=False, keep=0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(record.mean_abs, np.ones(4))
