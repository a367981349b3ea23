"""Calibrators on known distributions: ranges, scales and zero points, streaming behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from slimgraph.runtime.histogram import (
    METHODS,
    TensorStats,
    calibrated_range,
)
from slimgraph.runtime.quant_math import quant_params


def _stats(values: np.ndarray, batches: int = 10) -> TensorStats:
    stats = TensorStats()
    for chunk in np.array_split(values.astype(np.float32), batches):
        stats.update(chunk)
    return stats


def _params(stats: TensorStats, method: str) -> tuple[float, int]:
    low, high = calibrated_range(stats, method)
    scale, zero_point = quant_params(low, high, qmin=0, qmax=255, symmetric=False)
    return float(scale), int(zero_point)


def test_minmax_uniform_positive_gives_scale_range_over_255_and_zero_point_0() -> None:
    values = np.random.default_rng(0).uniform(0.0, 2.0, 100_000)
    scale, zero_point = _params(_stats(values), "minmax")
    assert scale == pytest.approx(values.max() / 255, rel=1e-6)
    assert zero_point == 0


def test_minmax_symmetric_uniform_puts_zero_point_in_the_middle() -> None:
    values = np.random.default_rng(0).uniform(-1.0, 1.0, 100_000)
    values[:2] = [-1.0, 1.0]
    scale, zero_point = _params(_stats(values), "minmax")
    assert scale == pytest.approx(2.0 / 255, rel=1e-6)
    assert zero_point == 128  # 1 / scale = 127.5, rounded half to even


def test_range_always_contains_zero() -> None:
    values = np.random.default_rng(0).uniform(5.0, 6.0, 10_000)
    for method in METHODS:
        low, high = calibrated_range(_stats(values), method)
        assert low == 0.0 and high > 5.0, method


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_outliers_are_clipped_by_histogram_calibrators(method: str) -> None:
    rng = np.random.default_rng(1)
    values = rng.standard_normal(200_000)
    values[:10] = 60.0  # a few huge outliers
    stats = _stats(values)
    minmax_low, minmax_high = calibrated_range(stats, "minmax")
    low, high = calibrated_range(stats, method)
    assert minmax_high == pytest.approx(60.0)
    # The clean data's two-sided 99.99% range is [-3.95, 3.93]; the histogram's 2048 bins span
    # [-4.4, 60] (0.03 wide). Entropy keeps more of the tail but clips the outliers.
    expected = {"percentile": ((-3.95, 0.2), (3.93, 0.15)), "entropy": ((-4.07, 0.2), (7.9, 0.3))}
    (low_at, low_tol), (high_at, high_tol) = expected[method]
    assert high == pytest.approx(high_at, abs=high_tol), (method, high)
    assert low == pytest.approx(low_at, abs=low_tol), (method, low)


def _quantization_mse(values: np.ndarray, low: float, high: float) -> float:
    scale, zero_point = quant_params(low, high, qmin=0, qmax=255, symmetric=False)
    q = np.clip(np.rint(values / scale) + zero_point, 0, 255)
    return float(np.mean(((q - zero_point) * scale - values) ** 2))


def test_mse_calibrator_beats_minmax_on_heavy_tails() -> None:
    values = np.random.default_rng(7).laplace(size=200_000)
    stats = _stats(values)
    minmax = calibrated_range(stats, "minmax")
    mse = calibrated_range(stats, "mse")
    assert mse[1] < minmax[1] and mse[0] > minmax[0]
    assert _quantization_mse(values, *mse) < 0.9 * _quantization_mse(values, *minmax)


def test_percentile_matches_numpy_on_uniform_data() -> None:
    values = np.random.default_rng(2).uniform(-3.0, 7.0, 200_000)
    low, high = calibrated_range(_stats(values), "percentile", percentile=99.0)
    assert low == pytest.approx(np.quantile(values, 0.01), abs=0.02)
    assert high == pytest.approx(np.quantile(values, 0.99), abs=0.02)


@pytest.mark.parametrize("method", METHODS)
def test_constant_zero_tensor_gets_scale_1_and_zero_point_0(method: str) -> None:
    # onnxruntime's compute_scale_zp: a range below float32's tiny gives scale 1.0, zero point 0
    stats = _stats(np.zeros(1000))
    low, high = calibrated_range(stats, method)
    scale, zero_point = quant_params(low, high, qmin=0, qmax=255, symmetric=False)
    assert (low, high) == (0.0, 0.0)
    assert scale.dtype == np.float32 and float(scale) == 1.0
    assert int(zero_point) == 0


@pytest.mark.parametrize("method", METHODS)
def test_constant_nonzero_tensor_is_represented_exactly(method: str) -> None:
    stats = _stats(np.full(1000, 3.0))
    low, high = calibrated_range(stats, method)
    scale, zero_point = quant_params(low, high, qmin=0, qmax=255, symmetric=False)
    assert low == 0.0 and high == pytest.approx(3.0, rel=1e-3)
    q = np.clip(np.rint(3.0 / scale) + zero_point, 0, 255)
    assert (q - zero_point) * scale == pytest.approx(3.0, rel=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_tiny_range_keeps_resolution(method: str) -> None:
    values = np.random.default_rng(3).uniform(-1e-7, 1e-7, 10_000)
    low, high = calibrated_range(_stats(values), method)
    scale, zero_point = quant_params(low, high, qmin=0, qmax=255, symmetric=False)
    assert 1e-10 < float(scale) < 1e-9
    error = np.abs((np.clip(np.rint(values / scale) + zero_point, 0, 255) - zero_point) * scale
                   - values)
    assert error.mean() < float(scale)


def test_histogram_memory_is_fixed_and_growth_keeps_counts() -> None:
    rng = np.random.default_rng(4)
    stats = TensorStats()
    chunks = [rng.standard_normal(5000) * (1 + i) for i in range(50)]  # the range keeps growing
    for chunk in chunks:
        stats.update(chunk)
    values = np.concatenate(chunks)
    assert stats.counts.shape == (2048,)
    assert stats.counts.sum() == pytest.approx(values.size)
    assert stats.min == pytest.approx(values.min()) and stats.max == pytest.approx(values.max())
    for q in (0.01, 0.5, 0.99):
        assert stats.quantile(q) == pytest.approx(np.quantile(values, q), abs=0.1)


def test_minmax_does_not_depend_on_batching() -> None:
    values = np.random.default_rng(5).standard_normal(10_000)
    assert calibrated_range(_stats(values, 1), "minmax") == calibrated_range(
        _stats(values, 37), "minmax"
    )


def test_entropy_on_relu_output_keeps_most_of_the_range() -> None:
    values = np.maximum(np.random.default_rng(6).standard_normal(100_000), 0.0)
    low, high = calibrated_range(_stats(values), "entropy")
    assert low == 0.0 and 2.0 < high <= values.max()


def test_symmetric_int8_weights_use_zero_point_0() -> None:
    scale, zero_point = quant_params(np.array([-2.0, -0.5]), np.array([1.0, 0.5]), qmin=-127,
                                     qmax=127, symmetric=True)
    np.testing.assert_allclose(scale, [2.0 / 127, 0.5 / 127], rtol=1e-6)
    assert zero_point.tolist() == [0, 0]
