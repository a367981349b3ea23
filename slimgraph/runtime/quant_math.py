"""The one quantization vocabulary (`QuantSpec`) and the one integer-math module of slimgraph.

Uniform affine quantization (seed 000): q = clip(round(x / s) + z, qmin, qmax), x' = (q - z) * s,
rounding half to even (numpy's `rint`, ONNX QuantizeLinear's rule). Every planner (static,
dynamic, weight-only) describes a tensor with a frozen `QuantSpec`; every materializer turns
ranges into scales and zero points with `quant_params` and values into codes with
`quantize_values`, so the passes and calibration agree on every edge case:

- Zero is always exactly representable: a range is widened to contain 0 first.
- Symmetric signed grids use zero point 0 and s = max|r| / qmax, with qmax = 2^(b-1) - 1 (127 for
  int8, 7 for int4): the most negative code is left unused, as onnxruntime's quantizer does for
  weights. Symmetric unsigned grids put the zero point in the middle of the grid.
- A zero range (an all-zero tensor, or a range whose scale would be below float32's smallest
  normal number) gets scale 1 and zero point 0, as onnxruntime's `quant_utils.compute_scale_zp`
  does (`scale < numpy.finfo(float32).tiny -> 1.0, zero_point 0`). A tiny scale such as 1e-30
  would saturate any non-zero run-time value and make the int32 bias scale s_x * s_w underflow.
- Scales are computed in float64 and stored as float32; codes are computed from the float64
  quotient x / s.

4-bit packing follows the ONNX spec for INT4/UINT4 (and onnxruntime's MatMulNBits blobs): two
elements per byte, the first in the low nibble.

This module imports only numpy and onnx_ir: calibration (`runtime`), the quantization passes
and a training backend's fake quantization can all import it (ir <- runtime <- passes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = [
    "RANGE_METHODS",
    "integer_range",
    "QuantSpec",
    "type_grid",
    "QuantizedTensor",
    "quant_params",
    "quantize_values",
    "dequantize_values",
    "quantize_tensor",
    "weight_blocks",
    "block_params",
    "quantize_blocks",
    "valid_scale",
    "weight_spec",
    "pack_4bit",
    "unpack_4bit",
    "sqnr_db",
]

# How a range is chosen: the calibrators of `runtime.histogram` (weights always use minmax).
RANGE_METHODS = ("minmax", "moving-average", "percentile", "entropy", "mse")

_TINY = float(np.finfo(np.float32).tiny)
_SIGNED_GRIDS = {ir.DataType.INT8: 8, ir.DataType.INT4: 4}
_UNSIGNED_GRIDS = {ir.DataType.UINT8: 8, ir.DataType.UINT4: 4}
# Every integer type a quantized value can have: (bits, signed).
_INTEGER_TYPES = {
    ir.DataType.INT4: (4, True), ir.DataType.UINT4: (4, False),
    ir.DataType.INT8: (8, True), ir.DataType.UINT8: (8, False),
    ir.DataType.INT16: (16, True), ir.DataType.UINT16: (16, False),
    ir.DataType.INT32: (32, True),
}


def integer_range(dtype: ir.DataType) -> tuple[int, int] | None:
    """(min, max) of integer type `dtype`, the whole type (-128..127 for INT8, 0..255 for
    UINT8): where ONNX QuantizeLinear saturates. None for a type that is not a quantized
    integer type."""
    found = _INTEGER_TYPES.get(dtype)
    if found is None:
        return None
    bits, signed = found
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
        dtype: the integer type (INT8, UINT8, INT4, UINT4 or INT32 for biases).
        symmetric: zero point 0 (signed) / mid-grid (unsigned), range symmetric around 0.
        axis: per-channel axis (one scale per index along it); None: per tensor.
        block_size: consecutive elements along `axis` sharing one scale (block-wise); 0: none.
        dynamic: the range is measured at run time (DynamicQuantizeLinear), not calibrated.
        method: how a calibrated range is chosen (`RANGE_METHODS`).
    """

    dtype: ir.DataType
    symmetric: bool
    axis: int | None = None
    block_size: int = 0
    dynamic: bool = False
    method: str = "minmax"

    @property
    def bits(self) -> int:
        """Bits per code (32 for INT32)."""
        return _INTEGER_TYPES[self.dtype][0]

    @property
    def qrange(self) -> tuple[int, int]:
        """(qmin, qmax) of the integer grid: the whole type, except that symmetric signed grids
        leave the lowest code out."""
        found = integer_range(self.dtype)
        assert found is not None, self.dtype
        low, top = found
        return (-top, top) if self.symmetric and low < 0 else (low, top)

    @property
    def storage(self) -> np.dtype:
        """The numpy type codes are held in (4-bit codes: one per int8/uint8 before packing)."""
        if self.dtype in _UNSIGNED_GRIDS:
            return np.dtype(np.uint8)
        return np.dtype(np.int8 if self.dtype in _SIGNED_GRIDS else np.int32)


def type_grid(dtype: ir.DataType) -> QuantSpec | None:
    """The grid ONNX QuantizeLinear rounds to for integer type `dtype`: the whole type
    (`integer_range`) as a spec that is not symmetric; None for a type that is not a quantized
    integer type. The torch backend's fake quantization computes on it."""
    return QuantSpec(dtype, symmetric=False) if dtype in _INTEGER_TYPES else None


def weight_spec(
    bits: int, symmetric: bool = True, *, axis: int | None = None, block_size: int = 0,
    dynamic: bool = False,
) -> QuantSpec:
    """The spec of a constant quantized to `bits` (4 or 8) by min-max: signed codes without
    zero point when symmetric, unsigned codes with zero points otherwise.

    Raises:
        ValueError: `bits` other than 4 or 8.
    """
    grids = _SIGNED_GRIDS if symmetric else _UNSIGNED_GRIDS
    dtype = next((t for t, b in grids.items() if b == bits), None)
    if dtype is None:
        raise ValueError(f"no {bits}-bit integer grid (4 or 8)")
    return QuantSpec(dtype, symmetric, axis, block_size, dynamic)


@dataclass(frozen=True)
class QuantizedTensor:
    """Integer codes with their scales (and zero points when asymmetric).

    `codes` has the tensor's shape (padded along axis 0 for block-wise quantization); `scale`
    and `zero_point` keep its rank with the reduced axes of size 1 (block-wise: shape
    [K_padded / block_size, ...]). `zero_point` is None for a symmetric signed spec.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    spec: QuantSpec

    def dequantize(self) -> np.ndarray:
        """Float values of the codes (padded rows included for block-wise tensors)."""
        scale, zero = self.scale, self.zero_point
        if self.spec.block_size:
            scale = np.repeat(scale, self.spec.block_size, axis=0)
            zero = None if zero is None else np.repeat(zero, self.spec.block_size, axis=0)
        offset = 0 if zero is None else zero.astype(np.float32)
        return (self.codes.astype(np.float32) - offset) * scale


def quant_params(
    rmin: np.ndarray | float,
    rmax: np.ndarray | float,
    *,
    qmin: int,
    qmax: int,
    symmetric: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int64) mapping [rmin, rmax] onto [qmin, qmax].

    Args:
        rmin, rmax: the range, scalars or arrays of one shape (one range per channel/block).
        qmin, qmax: the integer grid (`QuantSpec.qrange`).
        symmetric: zero point 0 on signed grids (mid-grid on unsigned ones), s = max|r| / qmax.

    Returns:
        (scale, zero_point) of the ranges' shape. A zero range gets scale 1 and zero point 0
        (onnxruntime's rule), so the result is always valid.
    """
    low = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    high = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if symmetric:
        bound = np.maximum(-low, high)
        if qmin < 0:
            scale = bound / qmax
            zero_point = np.zeros(scale.shape, np.int64)
        else:
            scale = bound / ((qmax - qmin) / 2)
            zero_point = np.full(scale.shape, math.ceil((qmin + qmax) / 2), np.int64)
    else:
        scale = (high - low) / (qmax - qmin)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_point = np.clip(np.round(qmin - low / scale), qmin, qmax)
    empty = scale < _TINY
    return valid_scale(scale), np.where(empty, 0, zero_point).astype(np.int64)


def valid_scale(scale: np.ndarray | float) -> np.ndarray:
    """float32 scales with the zero-range rule applied: below float32's smallest normal number
    (zero range, or an underflowed product such as an int32 bias's s_x * s_w) -> 1."""
    scale = np.asarray(scale, dtype=np.float64)
    return np.where(scale < _TINY, 1.0, scale).astype(np.float32)


def quantize_values(
    values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, spec: QuantSpec
) -> np.ndarray:
    """Codes round(x / scale) + zero_point saturated to the spec's grid, in `spec.storage`.

    `scale` and `zero_point` must broadcast against `values` (keep the reduced axes).
    """
    qmin, qmax = spec.qrange
    q = np.rint(np.asarray(values) / np.asarray(scale).astype(np.float64))
    if zero_point is not None:
        q = q + zero_point
    return np.clip(q, qmin, qmax).astype(spec.storage)


def dequantize_values(
    codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None
) -> np.ndarray:
    """(codes - zero_point) * scale in float64 (`scale`/`zero_point` broadcast against codes)."""
    shifted = codes.astype(np.float64)
    if zero_point is not None:
        shifted = shifted - zero_point
    return shifted * scale


def quantize_tensor(tensor: np.ndarray, spec: QuantSpec) -> QuantizedTensor:
    """Min-max quantization of a constant by `spec`: per tensor, per `axis`, or in blocks.

    Per-axis: one scale per index of `spec.axis` (scale shape keeps the rank, size 1 on the
    other axes). Block-wise (`spec.block_size > 0`, a [K, N] matrix): blocks of `block_size`
    rows along K per column; K is zero-padded to a multiple of the block size, `codes` has
    shape [K_padded, N] and `scale` [K_padded / block_size, N].

    Symmetric specs give int8-held codes and no zero point; asymmetric ones uint8-held codes and
    a uint8 zero point per group.
    """
    w = np.asarray(tensor, dtype=np.float32)
    if spec.block_size:
        grouped = weight_blocks(w, spec.block_size)
        scale, zero = block_params(grouped.min(axis=1), grouped.max(axis=1), spec)
        return quantize_blocks(w, scale, zero, spec)
    kept = set() if spec.axis is None else {spec.axis % w.ndim}
    reduce = tuple(i for i in range(w.ndim) if i not in kept)
    if w.size:
        lo, hi = w.min(axis=reduce, keepdims=True), w.max(axis=reduce, keepdims=True)
    else:
        lo = hi = np.zeros([1] * w.ndim, np.float32)
    scale, zero = _params(lo, hi, spec)
    return QuantizedTensor(quantize_values(w, scale, zero, spec), scale, zero, spec)


def weight_blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    """A [K, N] matrix as [blocks, block_size, N]: blocks of `block_size` consecutive rows
    along K per column, K zero-padded to a multiple of `block_size` (the layout of block-wise
    `QuantSpec`s, MatMulNBits and DequantizeLinear with `block_size`)."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), weight.dtype)
    padded[:k] = weight
    return padded.reshape(blocks, block_size, n)


def block_params(
    lo: np.ndarray, hi: np.ndarray, spec: QuantSpec
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale and zero point (None for symmetric signed specs) of each group from its range
    (`quant_params` on `spec`'s grid); zero points in `spec.storage`."""
    return _params(lo, hi, spec)


def quantize_blocks(
    weight: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    spec: QuantSpec,
) -> QuantizedTensor:
    """Codes of a [K, N] matrix in blocks of `spec.block_size` rows along K with the given
    per-block scale [blocks, N] and zero point ([blocks, N], or None): what a method that chose
    its own scales (GPTQ, AWQ's clipping, HQQ) stores. Codes have shape [K_padded, N]."""
    grouped = weight_blocks(np.asarray(weight, dtype=np.float32), spec.block_size)
    blocks, size, n = grouped.shape
    codes = quantize_values(
        grouped, scale[:, None, :], None if zero_point is None else zero_point[:, None, :], spec
    ).reshape(blocks * size, n)
    return QuantizedTensor(codes, np.asarray(scale, np.float32), zero_point, spec)


def _params(
    lo: np.ndarray, hi: np.ndarray, spec: QuantSpec
) -> tuple[np.ndarray, np.ndarray | None]:
    qmin, qmax = spec.qrange
    scale, zero = quant_params(lo, hi, qmin=qmin, qmax=qmax, symmetric=spec.symmetric)
    if spec.symmetric and qmin < 0:
        return scale, None
    return scale, zero.astype(spec.storage)


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


def sqnr_db(signal: float, noise: float) -> float:
    """Signal-to-quantization-noise ratio 10 log10(signal / noise) in dB, from powers (sums of
    squares): +inf without noise, -inf for noise on a zero signal."""
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)
