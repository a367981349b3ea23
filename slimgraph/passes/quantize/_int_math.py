"""Integer weight math for dynamic and weight-only quantization: scales, rounding, 4-bit packing.

Uniform affine quantization (seed 000): q = clip(round(w / s) + z, qmin, qmax), w' = (q - z) * s.
Symmetric ranges use z = 0 and s = max|w| / qmax with qmax = 2^(bits-1) - 1 (127 for int8, 7 for
int4), so the grid is centred on zero and -qmax..qmax are used (the extra negative code is left
unused, as onnxruntime's own quantizer does for weights). Asymmetric ranges use unsigned codes
0..2^bits - 1 over [min(w, 0), max(w, 0)] (zero stays exactly representable). Either way every
weight is within half a step (s / 2) of its dequantized value.

4-bit packing follows the ONNX spec for INT4/UINT4 (and onnxruntime's MatMulNBits blobs): two
elements per byte, the first in the low nibble.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "QuantizedWeight",
    "quantize_per_channel",
    "quantize_blockwise",
    "pack_4bit",
    "unpack_4bit",
]


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes with their scales (and zero points when asymmetric).

    `codes` has the weight's shape (padded along the block axis for block-wise quantization);
    `scale` and `zero_point` have the weight's shape with the quantized axis (per-channel: every
    axis but the channel axis) reduced to one entry per group.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bits: int
    block_size: int = 0  # rows per block along axis 0 (block-wise), 0 otherwise

    def dequantize(self) -> np.ndarray:
        """Float values of the codes (padded rows included for block-wise weights)."""
        scale, zero = self.scale, self.zero_point
        if self.block_size:
            scale = np.repeat(scale, self.block_size, axis=0)
            zero = None if zero is None else np.repeat(zero, self.block_size, axis=0)
        offset = 0 if zero is None else zero.astype(np.float32)
        return (self.codes.astype(np.float32) - offset) * scale


def _scale_and_zero(
    lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero point) from each group's range; empty ranges get scale 1 (codes are 0)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float32) / np.float32(qmax)
        return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32), None
    levels = 2**bits - 1
    lo = np.minimum(lo, 0).astype(np.float32)
    hi = np.maximum(hi, 0).astype(np.float32)
    scale = (hi - lo) / np.float32(levels)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 0, levels)
    return scale, zero.astype(np.uint8)


def _codes(
    w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int
) -> np.ndarray:
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        return np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8)
    return np.clip(np.round(w / scale) + zero, 0, 2**bits - 1).astype(np.uint8)


def quantize_per_channel(
    weight: np.ndarray,
    axis: int | tuple[int, ...] | None,
    *,
    bits: int = 8,
    symmetric: bool = True,
) -> QuantizedWeight:
    """Quantize with one scale per index of `axis` (several axes: per index tuple; None: one
    scale for the whole tensor).

    The scale keeps the weight's rank (size 1 on reduced axes) so it broadcasts against it.
    Symmetric codes are int8 values; asymmetric codes are uint8 values (also for 4 bits).
    """
    w = np.asarray(weight, dtype=np.float32)
    axes = () if axis is None else (axis,) if isinstance(axis, int) else axis
    kept = {a % w.ndim for a in axes}
    reduce = tuple(i for i in range(w.ndim) if i not in kept)
    lo = w.min(axis=reduce, keepdims=True) if w.size else np.zeros([1] * w.ndim, np.float32)
    hi = w.max(axis=reduce, keepdims=True) if w.size else np.zeros([1] * w.ndim, np.float32)
    scale, zero = _scale_and_zero(lo, hi, bits, symmetric)
    return QuantizedWeight(_codes(w, scale, zero, bits), scale, zero, bits)


def quantize_blockwise(
    weight: np.ndarray, *, block_size: int, bits: int, symmetric: bool = True
) -> QuantizedWeight:
    """Quantize a [K, N] weight in blocks of `block_size` rows along K (the reduction axis).

    K is zero-padded to a multiple of `block_size`; `codes` has shape [K_padded, N], `scale`
    (and `zero_point`) shape [K_padded / block_size, N].
    """
    w = np.asarray(weight, dtype=np.float32)
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = w
    grouped = padded.reshape(blocks, block_size, n)
    scale, zero = _scale_and_zero(grouped.min(axis=1), grouped.max(axis=1), bits, symmetric)
    codes = _codes(
        grouped,
        scale[:, None, :],
        None if zero is None else zero[:, None, :],
        bits,
    ).reshape(blocks * block_size, n)
    return QuantizedWeight(codes, scale, zero, bits, block_size)


def pack_4bit(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit values (int or uint, any shape) along the last axis: first in the low nibble.

    An odd last axis is padded with a zero nibble. Returns uint8 of shape [..., ceil(n / 2)].
    """
    nibbles = np.asarray(values).astype(np.int16) & 0x0F
    if nibbles.shape[-1] % 2:
        pad = [(0, 0)] * (nibbles.ndim - 1) + [(0, 1)]
        nibbles = np.pad(nibbles, pad)
    low = nibbles[..., 0::2]
    high = nibbles[..., 1::2]
    return (low | (high << 4)).astype(np.uint8)


def unpack_4bit(packed: np.ndarray, count: int, *, signed: bool) -> np.ndarray:
    """Inverse of `pack_4bit`: `count` values along the last axis, int8 (signed) or uint8."""
    packed = np.asarray(packed, dtype=np.uint8)
    nibbles = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    nibbles[..., 0::2] = packed & 0x0F
    nibbles[..., 1::2] = packed >> 4
    nibbles = nibbles[..., :count]
    if signed:
        return ((nibbles.astype(np.int8) ^ 8) - 8).astype(np.int8)
    return nibbles
