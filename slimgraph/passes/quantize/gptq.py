"""GPTQ: quantize a MatMul weight column by column, correcting the rest for each column's error.

Frantar, Ashkboos, Hoefler & Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (after Optimal Brain Quantization, Frantar & Alistarh 2022).
For a MatMul Y = X W with W [K, N], the layer's output error on calibration inputs X [n, K] is

    ||X W - X Q||^2 = sum_j (w_j - q_j)^T H (w_j - q_j),    H = 2 X^T X  (the same for every
                                                           output column j)

so the K input rows of W can be quantized one at a time: after row k is rounded, the rows not yet
quantized absorb its error through the inverse Hessian, dW[k+1:] = -(w_k - q_k) [H^-1]_{k,k+1:}
/ [H^-1]_{k,k} (the optimal update of OBS), which is exact for the quadratic objective. GPTQ's
three changes make it fast and stable: every column uses the same row order, so the updates are
shared by all N columns; the rows are processed in lazy blocks (the update inside a block of
`LAZY` rows is applied right away, to the rest of W once per block as one matrix product); and
the inverse Hessian is taken through the upper Cholesky factor U of H^-1 (H^-1 = U^T U), whose
row k holds exactly the coefficients of step k, after dampening H with `damp` times the mean of
its diagonal.

Blocks of `block_size` rows share one scale and zero point per column (MatMulNBits' layout, the
"groups" of the paper's group-wise variant). A block's grid is taken from the rows as they are
when its first row is reached (already corrected by the rows before it), by min-max on the
spec's grid. With `act_order` the rows are processed in order of decreasing diag(H) (the most
active input channels first); the grids are then fixed up front from the original weights
("static groups"), so the stored layout is unchanged and needs no permutation index.

The Hessian comes from the MatMul's calibration inputs (`passes.quantize._inputs`, streamed:
H is [K, K] whatever the number of samples). Rows whose input never varies (diag(H) = 0) are
zeroed: no input reads them. Exactness: approximate (a quantization method).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slimgraph.errors import UnsupportedModelError
from slimgraph.runtime.quant_math import (
    QuantizedTensor,
    QuantSpec,
    block_params,
    dequantize_values,
    quantize_values,
    weight_blocks,
)

__all__ = ["GPTQOptions", "gptq_quantize", "LAZY"]

LAZY = 128  # rows per lazy block (rounded up to a multiple of the block size)


@dataclass(frozen=True, kw_only=True)
class GPTQOptions:
    """GPTQ's settings.

    Attributes:
        damp: dampening added to H's diagonal, as a fraction of its mean (the paper's 1%).
        act_order: process rows in order of decreasing diag(H), with the blocks' grids fixed
            from the original weights (the default: the paper's authors' setting for small
            models; the stored layout is the same, so it costs nothing at run time).
    """

    damp: float = 0.01
    act_order: bool = True


def gptq_quantize(
    weight: np.ndarray,
    hessian: np.ndarray,
    spec: QuantSpec,
    options: GPTQOptions | None = None,
) -> QuantizedTensor:
    """GPTQ codes, scales (and zero points) of a [K, N] weight in blocks along K.

    Args:
        weight: float32 [K, N].
        hessian: [K, K], proportional to X^T X over the layer's calibration inputs.
        spec: a block-wise spec (`block_size` > 0), symmetric or with zero points.
        options: dampening and row order.

    Returns:
        A `QuantizedTensor`: codes [K_padded, N], scale (and zero point) [blocks, N].

    Raises:
        ValueError: a spec without blocks, or shapes that do not match.
        UnsupportedModelError: the dampened Hessian is not positive definite even with 100x
            the dampening (inputs with NaN or Inf).
    """
    options = options or GPTQOptions()
    size = spec.block_size
    k, n = weight.shape
    if not size or hessian.shape != (k, k):
        raise ValueError(f"GPTQ needs a block spec and a [{k}, {k}] Hessian")
    blocks = -(-k // size)
    padded = blocks * size
    w = np.zeros((n, padded), np.float64)
    w[:, :k] = weight.T
    h = np.eye(padded, dtype=np.float64)
    h[:k, :k] = hessian
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale = np.zeros((blocks, n), np.float32)
    zero = None if spec.symmetric else np.zeros((blocks, n), spec.storage)
    order = np.arange(padded)
    if options.act_order:
        order = np.argsort(-np.diag(h), kind="stable")
        _set_grids(w, spec, scale, zero, range(blocks))
    w, h = w[:, order], h[np.ix_(order, order)]
    upper = _inverse_cholesky(h, options.damp)
    codes = np.zeros((n, padded), spec.storage)
    lazy = size * -(-LAZY // size)
    for start in range(0, padded, lazy):
        stop = min(start + lazy, padded)
        block = w[:, start:stop].copy()
        errors = np.zeros_like(block)
        coefficients = upper[start:stop, start:stop]
        for i in range(stop - start):
            column = int(order[start + i])
            group = column // size
            if not options.act_order and column % size == 0:
                _set_grid(block[:, i : i + size], spec, scale, zero, group)
            z = None if zero is None else zero[group]
            q = quantize_values(block[:, i], scale[group], z, spec)
            codes[:, column] = q
            error = (block[:, i] - dequantize_values(q, scale[group], z)) / coefficients[i, i]
            block[:, i:] -= np.outer(error, coefficients[i, i:])
            errors[:, i] = error
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    return QuantizedTensor(np.ascontiguousarray(codes.T), scale, zero, spec)


def _set_grid(
    rows: np.ndarray, spec: QuantSpec, scale: np.ndarray, zero: np.ndarray | None, group: int
) -> None:
    """The grid of block `group` from its rows [N, block_size] (min-max on the spec's grid)."""
    s, z = block_params(rows.min(axis=1), rows.max(axis=1), spec)
    scale[group] = s
    if zero is not None and z is not None:
        zero[group] = z


def _set_grids(
    w: np.ndarray, spec: QuantSpec, scale: np.ndarray, zero: np.ndarray | None,
    groups: range,
) -> None:
    """Every block's grid from the weights [N, K_padded] as they are (static groups)."""
    blocks = weight_blocks(np.ascontiguousarray(w.T), spec.block_size)
    for group in groups:
        _set_grid(blocks[group].T, spec, scale, zero, group)


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """U with (H + damp * mean(diag H) I)^-1 = U^T U, upper triangular; the dampening grows
    tenfold (up to 100x) until H is positive definite."""
    mean = float(np.mean(np.diag(h)))
    for factor in (1.0, 10.0, 100.0):
        damped = h + np.eye(len(h)) * damp * factor * mean
        try:
            lower = np.linalg.cholesky(damped)
            inverse_lower = np.linalg.solve(lower, np.eye(len(h)))
            inverse = inverse_lower.T @ inverse_lower
            return np.linalg.cholesky(inverse).T
        except np.linalg.LinAlgError:
            continue
    raise UnsupportedModelError(
        "GPTQ: the calibration inputs' Hessian is not positive definite (NaN or Inf inputs?)"
    )
