"""LowRankLinear: SVD split of MatMul/Gemm, checked structurally and on onnxruntime."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimgraph.api.factorize import factorize_with_report
from slimgraph.passes.lowrank import LowRankLinear
from tests.kit.asserts import assert_close, outputs_of
from tests.kit.graphs import gemm_model, initializer_array, matmul_model


def _weight(n: int, m: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, m)).astype(np.float32)


def _x(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_matmul_becomes_two_matmuls_with_the_svd_factors() -> None:
    weight = _weight(24, 40)
    model = matmul_model(weight, (2, 5, 24))
    result = LowRankLinear(rank=6)(model)
    assert result.modified
    ops = [node.op_type for node in result.model.graph]
    assert ops == ["MatMul", "MatMul"]
    a = initializer_array(result.model, ".lowrank_a")
    b = initializer_array(result.model, ".lowrank_b")
    assert a.shape == (24, 6) and b.shape == (6, 40)
    assert "W" not in result.model.graph.initializers  # the dense weight is gone
    # A = U_k sqrt(S_k), B = sqrt(S_k) V_k^T: A^T A = B B^T = S_k
    s = np.linalg.svd(weight.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(np.diag(a.T.astype(np.float64) @ a), s[:6], rtol=1e-5)
    np.testing.assert_allclose(np.diag(b.astype(np.float64) @ b.T), s[:6], rtol=1e-5)
    (layer,) = result.layers
    assert (layer.rank, layer.params_before, layer.params_after) == ((6,), 24 * 40, 6 * 64)
    assert (layer.macs_before, layer.macs_after) == (10 * 24 * 40, 10 * 6 * 64)
    assert result.model.graph.outputs[0].name == "y"
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)


@pytest.mark.parametrize("x_shape", [(24,), (7, 24), (2, 3, 24), (2, 2, 3, 24)])
def test_full_rank_matmul_reproduces_the_model_for_any_batch_shape(
    x_shape: tuple[int, ...],
) -> None:
    weight = _weight(24, 16)
    model = matmul_model(weight, x_shape)
    x = _x(x_shape)
    reference = outputs_of(model, {"x": x})["y"]
    result = LowRankLinear(rank_ratio=1.0, allow_growth=True)(model)
    assert result.layers[0].rank == (16,)
    assert_close(reference, outputs_of(result.model, {"x": x})["y"])


@pytest.mark.parametrize(
    ("trans_a", "trans_b", "alpha", "beta", "bias_shape"),
    [
        (0, 0, 1.0, 1.0, None),
        (0, 1, 1.0, 1.0, (12,)),
        (1, 0, 0.5, 2.0, (1, 12)),
        (1, 1, 2.0, 0.25, (6, 12)),
        (0, 1, 1.5, 1.0, (6, 1)),
        (0, 0, 1.0, 3.0, ()),
    ],
)
@pytest.mark.parametrize("opset", [9, 17])
def test_full_rank_gemm_reproduces_transposes_scales_and_any_bias(
    trans_a: int,
    trans_b: int,
    alpha: float,
    beta: float,
    bias_shape: tuple[int, ...] | None,
    opset: int,
) -> None:
    if opset < 11 and bias_shape is None:
        pytest.skip("Gemm before opset 11 requires C")
    n, m, rows = 20, 12, 6
    weight = _weight(m, n) if trans_b else _weight(n, m)
    bias = None if bias_shape is None else _x(bias_shape, seed=3)
    x_shape = (n, rows) if trans_a else (rows, n)
    model = gemm_model(
        weight, x_shape, trans_a=trans_a, trans_b=trans_b, alpha=alpha, beta=beta, bias=bias,
        opset=opset,
    )  # fmt: skip
    x = _x(x_shape)
    reference = outputs_of(model, {"x": x})["y"]
    result = LowRankLinear(rank_ratio=1.0, allow_growth=True)(model)
    assert len(result.layers) == 1
    assert_close(reference, outputs_of(result.model, {"x": x})["y"])
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    bias_params = 0 if bias is None else bias.size
    assert result.layers[0].params_after == 12 * (20 + 12) + bias_params


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 20),
    m=st.integers(2, 20),
    batch=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    rows=st.integers(1, 6),
    data=st.data(),
)
def test_output_error_is_bounded_by_the_dropped_singular_values(
    n: int, m: int, batch: list[int], rows: int, data: st.DataObject
) -> None:
    """For y = x W and y_k = x A B: ||y - y_k||_F <= ||X||_2 sqrt(sum_{i>k} s_i^2) and
    ||y - y_k||_F <= ||X||_F s_{k+1}, X being x with its leading dimensions flattened."""
    k = data.draw(st.integers(1, min(n, m)), label="k")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    weight = _weight(n, m, seed)
    x_shape = (*batch, rows, n)
    x = _x(x_shape, seed + 1)
    model = matmul_model(weight, x_shape)
    result = LowRankLinear(rank=k, allow_growth=True)(model)
    (layer,) = result.layers
    assert layer.rank == (k,)
    assert layer.params_after == k * (n + m)  # exactly k(n+m)
    y = outputs_of(model, {"x": x})["y"].astype(np.float64)
    y_k = outputs_of(result.model, {"x": x})["y"].astype(np.float64)
    s = np.linalg.svd(weight.astype(np.float64), compute_uv=False)
    tail = float(np.sqrt(np.sum(s[k:] ** 2)))
    # the reported weight error is the Eckart-Young optimum
    assert layer.weight_error == pytest.approx(tail / np.linalg.norm(s), rel=1e-4, abs=1e-6)
    flat = x.reshape(-1, n).astype(np.float64)
    error = float(np.linalg.norm(y - y_k))
    slack = 1e-5 * float(np.linalg.norm(flat)) * float(np.linalg.norm(s))  # fp32 rounding
    next_s = float(s[k]) if k < len(s) else 0.0
    assert error <= np.linalg.norm(flat, 2) * tail + slack
    assert error <= np.linalg.norm(flat) * next_s + slack


def test_rank_rules_pick_the_documented_k() -> None:
    # singular values 8, 4, 2, 1 (squares 64, 16, 4, 1; total 85)
    u = np.linalg.qr(np.random.default_rng(0).standard_normal((16, 4)))[0]
    v = np.linalg.qr(np.random.default_rng(1).standard_normal((12, 4)))[0]
    weight = (u * np.array([8.0, 4.0, 2.0, 1.0])) @ v.T
    model = matmul_model(weight, (3, 16))

    def rank_of(**options: object) -> int:
        result = LowRankLinear(allow_growth=True, **options)(matmul_model(weight, (3, 16)))
        return result.layers[0].rank[0]

    assert rank_of(rank_ratio=0.25) == 3  # round(0.25 * 12)
    assert rank_of(rank_ratio=0.01) == 1  # at least 1
    assert rank_of(energy=80 / 85) == 2  # 64 + 16 = 80 of 85
    assert rank_of(energy=0.95) == 3  # 80/85 < 0.95 <= 84/85
    assert rank_of(error_budget=math.sqrt(5 / 85)) == 2  # dropped 4 + 1 = 5
    assert rank_of(error_budget=math.sqrt(5 / 85) * 0.99) == 3
    assert rank_of(rank=20) == 12  # clipped to min(n, m)
    result = LowRankLinear(energy=80 / 85)(model)
    assert result.layers[0].weight_error == pytest.approx(math.sqrt(5 / 85), rel=1e-5)


def test_layers_that_would_not_shrink_are_skipped_and_counted() -> None:
    weight = _weight(16, 16)
    model = matmul_model(weight, (4, 16))
    result = LowRankLinear(rank_ratio=0.5)(model)  # k = 8: 8 * 32 = 256 = 16 * 16
    assert not result.modified and not result.layers
    (skip,) = result.skipped
    assert skip.node == "mm" and "not fewer than 256" in skip.reason
    assert [node.op_type for node in result.model.graph] == ["MatMul"]


def test_tied_weight_is_factorized_once_and_its_factors_shared() -> None:
    weight = _weight(32, 24)
    model = matmul_model(weight, (4, 32))
    graph = model.graph
    first = next(iter(graph))
    x, w = first.inputs
    second = ir.node("MatMul", [x, w], name="mm2")
    second.outputs[0].name = "y2"
    graph.append(second)
    graph.outputs.append(second.outputs[0])
    feeds = {"x": _x((4, 32))}
    reference = outputs_of(model, feeds)
    result = LowRankLinear(rank=4)(model)
    assert [layer.shared_with for layer in result.layers] == [None, "mm"]
    factors = [n for n in result.model.graph.initializers if ".lowrank_" in n]
    assert len(factors) == 2 and "W" not in result.model.graph.initializers
    got = outputs_of(result.model, feeds)
    np.testing.assert_allclose(got["y"], got["y2"], rtol=0, atol=0)
    assert np.linalg.norm(got["y"] - reference["y"]) > 0  # rank 4 of 24 is approximate


def test_measures_layer_sqnr_and_model_fidelity_with_feeds() -> None:
    weight = _weight(32, 24)
    model = matmul_model(weight, (4, 32))
    feeds = [{"x": _x((4, 32), seed)} for seed in range(3)]
    result = LowRankLinear(rank=8, feeds=feeds)(model.clone())  # in place: keep the original
    (layer,) = result.layers
    assert result.fidelity is not None and result.fidelity.batches == 3  # runs of 4 rows
    assert result.fidelity.samples == 12
    # the layer output is the model output here: both SQNRs are the same measurement
    assert layer.output_sqnr_db == pytest.approx(result.fidelity.worst_sqnr_db)
    ref = np.concatenate([outputs_of(model, f)["y"].ravel() for f in feeds]).astype(np.float64)
    got = np.concatenate([outputs_of(result.model, f)["y"].ravel() for f in feeds])
    sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2))
    assert layer.output_sqnr_db == pytest.approx(sqnr, abs=0.01)


def test_auto_keeps_only_layers_that_save_enough_macs() -> None:
    big = matmul_model(_weight(256, 256), (64, 256))
    result = LowRankLinear(rank="auto")(big)
    (layer,) = result.layers
    # the largest multiple of 16 under 0.8 * nm / (n + m) = 102.4
    assert layer.rank == (96,)
    assert layer.macs_after <= 0.8 * layer.macs_before
    # round(0.45 * 256) = 115, aligned to 112: 112 * 512 / 256^2 = 0.875x the MACs
    gated = LowRankLinear(rank="auto", rank_ratio=0.45)(matmul_model(_weight(256, 256), (64, 256)))
    assert not gated.layers and "MACs fall only to 0.88x" in gated.skipped[0].reason
    aligned = LowRankLinear(rank="auto", rank_ratio=0.2)(matmul_model(_weight(256, 256), (64, 256)))
    assert aligned.layers[0].rank == (48,)  # round(51.2) = 51 -> 48
    tiny = LowRankLinear(rank="auto", rank_ratio=0.25)(matmul_model(_weight(64, 64), (1, 64)))
    assert not tiny.layers and "too few to be faster" in tiny.skipped[0].reason
    small = LowRankLinear(rank="auto")(matmul_model(_weight(16, 16), (1, 16)))
    assert not small.layers and "multiple of 16" in small.skipped[0].reason


def test_factorize_leaves_the_input_model_untouched() -> None:
    weight = _weight(32, 24)
    model = matmul_model(weight, (4, 32))
    before = ir.to_proto(model).SerializeToString()
    factorized, report = factorize_with_report(model, rank_ratio=0.25)
    assert ir.to_proto(model).SerializeToString() == before
    assert [node.op_type for node in factorized.graph] == ["MatMul", "MatMul"]
    assert report.params_before == 32 * 24 and report.params_after == 6 * (32 + 24)


def test_symbolic_dimensions_take_their_size_from_the_feeds() -> None:
    weight = _weight(32, 24)
    model = matmul_model(weight, ("batch", 32))  # type: ignore[arg-type]
    feeds = {"x": _x((5, 32))}
    result = LowRankLinear(rank=4, feeds=feeds)(model.clone())
    (layer,) = result.layers
    assert (layer.macs_before, layer.macs_after) == (5 * 32 * 24, 5 * 4 * (32 + 24))
    without = LowRankLinear(rank=4)(model.clone()).layers[0]
    assert without.macs_before == 32 * 24  # symbolic dimensions count as 1


def test_a_bias_cast_at_run_time_is_folded_into_a_constant() -> None:
    # torch exports may give a Gemm a float64 bias through CastLike(bias, x); onnxscript's folder
    # turns the CastLike into a new Cast node, which must still fold.
    from onnx import TensorProto, numpy_helper
    from onnx import helper as h

    from slimgraph.passes.lowrank import fold_weights

    rng = np.random.default_rng(0)
    graph = h.make_graph(
        [h.make_node("CastLike", ["b64", "x"], ["b"]),
         h.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
        "g", [h.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(3), "b64")],
    )
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]))
    assert fold_weights(model) == 1
    (gemm,) = list(model.graph)
    assert gemm.inputs[2].const_value.dtype == ir.DataType.FLOAT
