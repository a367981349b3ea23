"""The arithmetic of the folds, on numpy arrays, kept apart so property tests can hit it directly.

BatchNormalization is an affine map per channel: `BN(y) = s * y + t` with
`s = gamma / sqrt(var + eps)` and `t = beta - mean * s`. A layer `y = W x + b` followed by a
per-channel affine map `s * y + t` is the layer with `W' = s (per output channel) * W` and
`b' = s * b + t`. Where the output channels sit in W is the op's `OpLayout` (the one per-op table,
`slimgraph.ir.layout`): Conv axis 0; ConvTranspose axis 1 within each group; Gemm axis 1 of B
(axis 0 with transB=1); a 2-D MatMul's constant right operand axis 1.

Everything is computed in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from slimgraph.ir.layout import OpLayout

__all__ = [
    "batchnorm_affine",
    "channel_vector",
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


def channel_vector(
    const: np.ndarray, rank: int, channel_axis: int, channels: int
) -> np.ndarray | None:
    """`const` as one float64 value per channel, or None.

    None unless broadcasting `const` against a rank-`rank` output varies only along
    `channel_axis` (or not at all) and does not grow the output's shape.
    """
    if const.ndim > rank:
        return None
    shape = (1,) * (rank - const.ndim) + const.shape
    for axis, dim in enumerate(shape):
        if axis == channel_axis:
            if dim not in (1, channels):
                return None
        elif dim != 1:
            return None
    flat = const.reshape(-1)
    if flat.size not in (1, channels):
        return None
    return np.broadcast_to(flat, (channels,)).astype(np.float64)


def scale_output_channels(
    weight: np.ndarray, scale: np.ndarray, op_layout: OpLayout
) -> np.ndarray:
    """`weight` with output channel `c` multiplied by `scale[c]`, in the weight's dtype.

    Args:
        weight: the op's weight, laid out as `op_layout` says (group and transB resolved, as
            `slimgraph.ir.layout.layout(node)` returns it).
        scale: one factor per output channel.
        op_layout: where the output channels are.

    Raises:
        ValueError: the layout has no output-channel axis, or `scale` does not have one entry
            per output channel, or a grouped weight's rows do not split into the groups.
    """
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    axis, group = op_layout.out_axis, op_layout.group
    channels = op_layout.out_channels(weight.shape)
    if axis is None or channels is None or scale.size != channels:
        raise ValueError(
            f"{scale.size} scales for a {op_layout.op_type} weight {list(weight.shape)}"
            + (f" with group {group}" if group != 1 else "")
        )
    w = weight.astype(np.float64)
    if group > 1 and axis != 0:
        # ConvTranspose (C_in, C_out / group, k...): group g's rows own channels g * C_out/group...
        if w.shape[0] % group:
            raise ValueError(f"a {op_layout.op_type} weight {list(w.shape)} with group {group}")
        grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
        spread = tuple(-1 if a == axis else 1 for a in range(1, w.ndim))
        factors = scale.reshape((group, 1) + spread)
        out = (grouped * factors).reshape(w.shape)
    else:
        out = w * scale.reshape(tuple(-1 if a == axis else 1 for a in range(w.ndim)))
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
