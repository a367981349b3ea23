"""The arithmetic of the folds, on numpy arrays, kept apart so property tests can hit it directly.

BatchNormalization is an affine map per channel: `BN(y) = s * y + t` with
`s = gamma / sqrt(var + eps)` and `t = beta - mean * s`. A layer `y = W x + b` followed by a
per-channel affine map `s * y + t` is the layer with `W' = s (per output channel) * W` and
`b' = s * b + t`. Where the output channels sit in W depends on the op:

- Conv: weight `(C_out, C_in / group, k...)`: axis 0.
- ConvTranspose: weight `(C_in, C_out / group, k...)`: output channel `g * (C_out/group) + j`
  is column `j` of the rows of group `g` (axis 1 within each group).
- Gemm: `Y = alpha * A' B' + beta * C` with `B' = B^T if transB`: axis 1 of B, or axis 0 of B when
  transB=1.
- MatMul (2-D, constant right operand B of shape (K, N)): axis 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "batchnorm_affine",
    "scale_output_channels",
    "pad_to_conv_pads",
    "compose_permutations",
]


def batchnorm_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel `(scale, shift)` with `BN(y) == scale * y + shift` (computed in float64)."""
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + float(eps))
    shift = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return scale, shift


def scale_output_channels(
    weight: np.ndarray, scale: np.ndarray, op_type: str, *, group: int = 1, trans_b: bool = False
) -> np.ndarray:
    """`weight` with output channel `c` multiplied by `scale[c]`, in the weight's dtype.

    Raises:
        ValueError: `scale` does not have one entry per output channel.
    """
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    w = weight.astype(np.float64)
    if op_type == "Conv":
        if scale.size != w.shape[0]:
            raise ValueError(f"{scale.size} scales for {w.shape[0]} output channels")
        out = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    elif op_type == "ConvTranspose":
        c_in, per_group = w.shape[0], w.shape[1]
        if group < 1 or c_in % group or scale.size != per_group * group:
            raise ValueError(
                f"{scale.size} scales for a ConvTranspose weight {list(w.shape)} with group {group}"
            )
        kernel = w.shape[2:]
        grouped = w.reshape((group, c_in // group, per_group) + kernel)
        factors = scale.reshape((group, 1, per_group) + (1,) * len(kernel))
        out = (grouped * factors).reshape(w.shape)
    elif op_type in ("Gemm", "MatMul"):
        axis = 0 if (op_type == "Gemm" and trans_b) else 1
        if w.ndim != 2 or scale.size != w.shape[axis]:
            raise ValueError(f"{scale.size} scales for a {op_type} weight {list(w.shape)}")
        out = w * (scale.reshape(-1, 1) if axis == 0 else scale.reshape(1, -1))
    else:
        raise ValueError(f"no output-channel layout known for {op_type}")
    return out.astype(weight.dtype)


def pad_to_conv_pads(
    pads: Sequence[int], axes: Sequence[int] | None, rank: int
) -> list[int] | None:
    """Spatial Conv `pads` equal to an ONNX Pad of a rank-`rank` tensor, or None if impossible.

    `pads` is in Pad's layout: all begins (one per axis in `axes`, default every axis), then all
    ends. The result is Conv's layout: begins of the spatial axes, then their ends. None when the
    batch or channel axis is padded, a pad is negative (a crop), or the lengths do not fit.
    """
    if axes is None:
        axes = list(range(rank))
    axes = [a + rank if a < 0 else a for a in axes]
    if len(pads) != 2 * len(axes) or len(set(axes)) != len(axes):
        return None
    if any(not 0 <= a < rank for a in axes):
        return None
    begins = [0] * rank
    ends = [0] * rank
    for index, axis in enumerate(axes):
        begins[axis] = int(pads[index])
        ends[axis] = int(pads[index + len(axes)])
    if any(p < 0 for p in begins + ends):
        return None
    if begins[0] or begins[1] or ends[0] or ends[1]:
        return None
    return begins[2:] + ends[2:]


def compose_permutations(first: Sequence[int], second: Sequence[int]) -> list[int]:
    """The single perm of `Transpose(Transpose(x, first), second)`: `first[second[i]]`."""
    return [int(first[p]) for p in second]
