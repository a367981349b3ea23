"""HQQ: half-quadratic optimization of each block's zero point and scale, without data.

Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine Learning Models". Round-to-
nearest takes a block's scale and zero point from its min and max; one outlier then stretches
the grid for the whole block. HQQ instead minimises a sparsity-promoting norm of the weight
error, ||W - (Q - z) s||_p with p < 1 (p = 0.7), which lets a few weights keep a large error
when that buys a better grid for the rest. The half-quadratic split introduces an error
variable E and alternates, per block of `block_size` rows of one column:

    Q = clip(round(W / s + z))                      codes for the current grid
    E = shrink_p(W - (Q - z) s, beta)               generalized soft-thresholding (the l_p prox)
    (s, z) = argmin ||(W - E) - (Q - z) s||^2       closed form: a 2-parameter least-squares fit
    beta = kappa * beta

The paper (and onnxruntime's `HQQWeightOnlyQuantizer`) updates only the zero point, as the mean
of `Q - (W - E) / s`, and keeps it as a float. Here both are fitted (the scale too, by the same
least squares), and the zero point is kept an integer of the grid: onnxruntime's MatMulNBits
runs float zero points about 85x slower than uint8 ones on this CPU (measured at M=1, K=N=2048,
accuracy level 4), and standard DequantizeLinear takes only integer zero points. Each block
keeps the grid with the lowest mean |W - (Q - z) s| seen over the iterations (round-to-nearest's
grid is the first candidate), so a block's error is never above round-to-nearest's.

Exactness: approximate (a quantization method). Data-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slimgraph.runtime.quant_math import (
    QuantizedTensor,
    QuantSpec,
    block_params,
    quantize_blocks,
    weight_blocks,
)

__all__ = ["HQQOptions", "hqq_quantize"]


@dataclass(frozen=True, kw_only=True)
class HQQOptions:
    """HQQ's solver settings (the paper's defaults).

    Attributes:
        iterations: alternating steps.
        p: the l_p norm of the weight error (p < 1 promotes a sparse error).
        beta, kappa: the half-quadratic penalty and its growth per step.
    """

    iterations: int = 20
    p: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01


def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """The proximal operator of the l_p norm (generalized soft-thresholding)."""
    magnitude = np.abs(x)
    return np.sign(x) * np.maximum(magnitude - np.power(magnitude + 1e-8, p - 1) / beta, 0.0)


def hqq_quantize(
    weight: np.ndarray, spec: QuantSpec, options: HQQOptions | None = None
) -> QuantizedTensor:
    """HQQ codes, scales and integer zero points of a [K, N] weight in blocks along K.

    Args:
        weight: float32 [K, N] (K is zero-padded to a multiple of `spec.block_size`).
        spec: a block-wise asymmetric spec (unsigned codes with zero points).
        options: solver settings.

    Returns:
        A `QuantizedTensor` (codes [K_padded, N], scale and zero point [blocks, N]).

    Raises:
        ValueError: a symmetric or non-block spec (HQQ optimizes the zero point).
    """
    if spec.symmetric or not spec.block_size:
        raise ValueError("HQQ needs a block-wise spec with zero points (symmetric=False)")
    options = options or HQQOptions()
    qmin, qmax = spec.qrange
    w = weight_blocks(np.asarray(weight, np.float32), spec.block_size).astype(np.float64)
    scale32, zero8 = block_params(w.min(axis=1), w.max(axis=1), spec)
    assert zero8 is not None
    scale = scale32.astype(np.float64)[:, None, :]
    zero = zero8.astype(np.float64)[:, None, :]
    best_scale, best_zero = scale.copy(), zero.copy()
    best_error = np.full(scale.shape, np.inf)
    beta = options.beta
    for _ in range(options.iterations + 1):
        codes = np.clip(np.rint(w / scale + zero), qmin, qmax)
        error = w - (codes - zero) * scale
        mean_error = np.abs(error).mean(axis=1, keepdims=True)
        better = mean_error < best_error
        best_error = np.where(better, mean_error, best_error)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
        target = w - _shrink(error, beta, options.p)
        scale, zero = _fit(codes, target, scale, zero, qmin, qmax)
        beta *= options.kappa
    zero_point = best_zero[:, 0, :].astype(spec.storage)
    return quantize_blocks(weight, best_scale[:, 0, :].astype(np.float32), zero_point, spec)


def _fit(
    codes: np.ndarray, target: np.ndarray, scale: np.ndarray, zero: np.ndarray,
    qmin: int, qmax: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The (scale, integer zero point) per block with (codes - z) * s closest to `target` in
    least squares: the line target = a * codes + b fitted per block, z = round(-b / a) on the
    grid, then s refitted for that z. Blocks whose fit is degenerate keep their grid."""
    mean_q = codes.mean(axis=1, keepdims=True)
    mean_t = target.mean(axis=1, keepdims=True)
    centred = codes - mean_q
    variance = (centred * centred).mean(axis=1, keepdims=True)
    covariance = (centred * (target - mean_t)).mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = covariance / variance
        fitted_zero = np.clip(np.rint(mean_q - mean_t / slope), qmin, qmax)
        shifted = codes - fitted_zero
        fitted_scale = (shifted * target).sum(axis=1, keepdims=True) / (
            (shifted * shifted).sum(axis=1, keepdims=True))
    usable = np.isfinite(fitted_scale) & (fitted_scale > 0) & (variance > 0)
    return np.where(usable, fitted_scale, scale), np.where(usable, fitted_zero, zero)
