"""CPConv and `factorize --method cp`: CP decomposition of convolutions, on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.passes.lowrank import CPConv, TuckerConv, cp_als, exact_rank
from slimgraph.passes.lowrank._cp import cp_reconstruct
from slimgraph.passes.pipeline import run_pipeline
from tests.kit.asserts import assert_close, outputs_of
from tests.kit.graphs import conv_model, initializer_array


def _w(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_als_recovers_a_planted_cp_kernel_and_writes_the_exact_rank_down() -> None:
    rng = np.random.default_rng(3)
    planted = cp_reconstruct(tuple(rng.standard_normal((size, 5)) for size in (12, 7, 3, 3)))
    factors = cp_als(planted, 5)
    error = np.linalg.norm(planted - cp_reconstruct(factors)) / np.linalg.norm(planted)
    assert error < 1e-6
    weight = _w(6, 4, 3, 2).astype(np.float64)
    assert exact_rank(weight.shape) == 4 * 3 * 2
    exact = cp_reconstruct(cp_als(weight, exact_rank(weight.shape)))
    np.testing.assert_allclose(exact, weight, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("weight_shape", "x_shape", "attributes"),
    [
        ((16, 8, 3, 3), (2, 8, 12, 12), {"pads": [1, 1, 1, 1]}),
        ((12, 10, 3, 3), (1, 10, 13, 11), {"strides": [2, 2], "pads": [1, 0, 2, 1]}),
        ((8, 6, 3, 3), (1, 6, 14, 14), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
        ((8, 6, 5, 3), (1, 6, 11, 9), {"strides": [2, 1], "dilations": [1, 2],
                                        "auto_pad": "VALID"}),
    ],
)
@pytest.mark.parametrize("verify", [True, False])
def test_cp_at_the_exact_rank_reproduces_the_conv(
    weight_shape: tuple[int, ...], x_shape: tuple[int, ...], attributes: dict[str, object],
    verify: bool,
) -> None:
    weight = _w(*weight_shape)
    model = conv_model(weight, x_shape, bias=_w(weight_shape[0], seed=5), **attributes)
    x = _w(*x_shape, seed=1)
    reference = outputs_of(model, {"x": x})["y"]
    step = {"name": "cp-conv", "rank": 100_000, "allow_growth": True}
    result = run_pipeline(model, [step], verify=verify, feeds={"x": x})
    graph = result.model.graph
    assert [n.op_type for n in graph] == ["Conv"] * 4
    rank = exact_rank(weight_shape)
    first, height, width, last = graph
    assert initializer_array(result.model, ".cp_in").shape == (rank, weight_shape[1], 1, 1)
    assert height.attributes["group"].value == rank == width.attributes["group"].value
    assert list(height.attributes["kernel_shape"].value) == [weight_shape[2], 1]
    assert list(width.attributes["kernel_shape"].value) == [1, weight_shape[3]]
    assert len(last.inputs) == 3 and last.inputs[2].name == "b"  # the bias moves to the last
    assert_close(reference, outputs_of(result.model, {"x": x})["y"], rtol=1e-4, atol=1e-5)
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)


def test_low_rank_cp_is_approximate_and_reports_its_fidelity() -> None:
    weight = _w(32, 16, 3, 3)
    x = _w(2, 16, 10, 10, seed=1)
    model = conv_model(weight, (2, 16, 10, 10), pads=[1, 1, 1, 1], strides=[2, 2])
    result = CPConv(rank=8, feeds={"x": x})(model)
    (layer,) = result.layers
    assert layer.method == "cp" and layer.rank == (8,)
    assert layer.params_after == 8 * (16 + 3 + 3 + 32) < layer.params_before == 32 * 16 * 9
    # 1x1 at 10x10, Kx1 to 5 rows x 10 columns, 1xK and the last 1x1 at 5x5, for 2 samples
    assert layer.macs_after == 2 * (100 * 16 * 8 + 50 * 8 * 3 + 25 * 8 * (3 + 32))
    factors = [initializer_array(result.model, suffix).astype(np.float64)
               for suffix in (".cp_out", ".cp_in", ".cp_height", ".cp_width")]
    approx = np.einsum("or,ri,rh,rw->oihw", factors[0].reshape(32, 8),
                       factors[1].reshape(8, 16), factors[2].reshape(8, 3),
                       factors[3].reshape(8, 3))
    error = np.linalg.norm(weight - approx) / np.linalg.norm(weight)
    assert layer.weight_error == pytest.approx(error, rel=1e-4) and 0.1 < error < 1
    equivalent = conv_model(approx, (2, 16, 10, 10), pads=[1, 1, 1, 1], strides=[2, 2])
    assert_close(outputs_of(equivalent, {"x": x})["y"], outputs_of(result.model, {"x": x})["y"],
                 rtol=1e-4, atol=1e-5)
    assert result.fidelity is not None and 0 < result.fidelity.worst_cosine < 0.999
    assert layer.output_sqnr_db is not None


def test_convs_cp_cannot_split_are_skipped_with_the_reason() -> None:
    grouped = conv_model(_w(8, 2, 3, 3), (1, 8, 6, 6), group=4, pads=[1, 1, 1, 1])
    pointwise = conv_model(_w(8, 4, 1, 1), (1, 4, 6, 6))
    same = conv_model(_w(8, 4, 3, 3), (1, 4, 6, 6), auto_pad="SAME_UPPER")
    conv1d = conv_model(_w(8, 4, 3), (1, 4, 9))
    reasons = [CPConv(rank=2)(model).skipped[0].reason
               for model in (grouped, pointwise, same, conv1d)]
    assert reasons == [
        "grouped or depthwise conv (group=4): CP would mix the groups",
        "1x1 (pointwise) conv: no spatial kernel to split",
        "auto_pad SAME_UPPER: the pads depend on the input size",
        "1-D conv: CP splits 2-D kernels only",
    ]


def test_a_strided_conv_s_rank_ratio_is_of_its_macs_and_no_chain_costs_more_macs() -> None:
    # stride 2: the first 1x1 runs at the input's 16x16, the conv at 8x8
    def model() -> ir.Model:
        return conv_model(_w(16, 8, 3, 3), (1, 8, 16, 16), strides=[2, 2], pads=[1, 1, 1, 1])

    macs_before = 64 * 16 * 8 * 9
    per_rank = 256 * 8 + 8 * 16 * 3 + 64 * (3 + 16)  # 1x1, 3x1 to 8x16, 1x3 and 1x1 at 8x8
    (layer,) = CPConv(rank_ratio=0.5)(model()).layers
    assert layer.macs_before == macs_before
    assert layer.rank == (round(0.5 * macs_before / per_rank),)
    assert layer.macs_after == layer.rank[0] * per_rank
    assert 0.45 < layer.macs_after / macs_before < 0.55
    # rank 30 holds fewer parameters (900 < 1152) but costs more MACs: left whole, with why
    (skipped,) = CPConv(rank=30)(model()).skipped
    assert skipped.reason == f"factors would cost {30 * per_rank} MACs, not fewer than 73728"
    # Tucker-2's first 1x1 also runs at the input's size
    (tucker,) = TuckerConv(rank_ratio=0.5)(model()).layers
    r_in, r_out = tucker.rank
    assert tucker.macs_after == 256 * 8 * r_in + 64 * r_in * r_out * 9 + 64 * r_out * 16


def test_cp_refuses_rules_on_singular_values_and_models_without_kxk_convs() -> None:
    with pytest.raises(BadOptionError, match="^--method cp takes --rank-ratio or --rank"):
        CPConv(energy=0.9)
    pointwise = conv_model(_w(8, 4, 1, 1), (1, 4, 6, 6))
    with pytest.raises(UnsupportedModelError, match="^--method cp splits convolutions with a "
                       "KxK kernel: the model has none selected"):
        sg.factorize(pointwise, method="cp", rank=4)
    with pytest.raises(BadOptionError, match="^method must be one of tucker, cp, svd, got 'x'$"):
        sg.factorize(pointwise, method="x", rank=4)  # type: ignore[arg-type]


def test_method_svd_splits_the_output_channels() -> None:
    weight = _w(16, 8, 3, 3)
    x = _w(1, 8, 6, 6, seed=1)
    model = conv_model(weight, (1, 8, 6, 6), pads=[1, 1, 1, 1])
    small, report = sg.factorize_with_report(model, method="svd", rank_ratio=0.5)
    (layer,) = report.layers
    assert layer.method == "svd" and layer.rank == (8,)
    assert [n.op_type for n in small.graph] == ["Conv", "Conv"]
    u, s, vt = np.linalg.svd(weight.reshape(16, -1).astype(np.float64), full_matrices=False)
    best = np.sqrt(np.sum(s[8:] ** 2)) / np.linalg.norm(s)  # Eckart-Young: the best rank-8
    assert layer.weight_error == pytest.approx(best, rel=1e-4)
    approx = (u[:, :8] * s[:8]) @ vt[:8]
    equivalent = conv_model(approx.reshape(weight.shape), (1, 8, 6, 6), pads=[1, 1, 1, 1])
    assert_close(outputs_of(equivalent, {"x": x})["y"], outputs_of(small, {"x": x})["y"],
                 rtol=1e-4, atol=1e-5)


def test_the_torch_backend_lowers_the_cp_chain_as_onnxruntime_runs_it() -> None:
    """`finetune` trains what `factorize --method cp` writes: the torch backend lowers the four
    convs (groups, one-axis strides, dilations and pads) to the outputs onnxruntime gives."""
    pytest.importorskip("torch")
    from tests.runtime.torch_backend.backend_helpers import assert_matches_ort

    model = conv_model(_w(12, 10, 3, 3), (2, 10, 13, 11), bias=_w(12, seed=5),
                       strides=[2, 1], dilations=[1, 2], pads=[1, 0, 2, 1])
    small = sg.factorize(model, method="cp", rank=6)
    assert [n.op_type for n in small.graph] == ["Conv"] * 4
    assert_matches_ort(small, {"x": _w(2, 10, 13, 11, seed=1)})
