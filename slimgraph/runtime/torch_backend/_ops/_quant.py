"""Quantization kernels of the op table: fake quantization that trains, and the int8 ops.

QuantizeLinear/DequantizeLinear and the dynamic int8 ops (DynamicQuantizeLinear, MatMulInteger,
ConvInteger and onnxruntime's MatMulIntegerToFloat, DynamicQuantizeMatMul and
GatherBlockQuantized).

Training semantics: fake quantization with a straight-through estimator (Bengio et al., 2013).
QuantizeLinear is `q = clamp(round(x / s) + zp, qmin, qmax)` on the grid of
`slimgraph.runtime.quant_math` (`type_grid`: the whole integer type, as ONNX saturates) with its
rounding, half to even (torch's `round`, numpy's `rint`), gradient 1 through the rounding and 0
where the value saturates, so a quantized value is a float tensor holding integers and
DequantizeLinear computes `(q - zp) * s`. The quotient `x / s` is computed in the input's float
type, as onnxruntime's kernel does (`quant_math.quantize_values` computes offline codes in
float64). When a scale is a
parameter the composition gives the LSQ gradient of Esser et al. (2020), "Learned Step Size
Quantization", scaled by `1 / sqrt(numel * qmax)`.

An integer weight (int8 codes with a constant scale) is a float parameter holding its dequantized
value; the op that reads it re-quantizes it with the same scale and zero point (straight-through),
so eval mode computes with exactly the stored codes and training moves the float value.
DynamicQuantizeLinear measures the range of its input as onnxruntime does (`scale = (max(x, 0) -
min(x, 0)) / 255`, `zero_point = round(clamp(-min / scale, 0, 255))`, float32 arithmetic); the
measured scale and zero point carry no gradient, the codes are straight-through. Integer matrix
products are exact: computed in float64 in eval mode (an int32 accumulator holds the same
integer), in float32 in training.
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir
import torch

from slimgraph.runtime.quant_math import QuantSpec, type_grid
from slimgraph.runtime.torch_backend._ops._conv import conv_kernel
from slimgraph.runtime.torch_backend._ops._index import nonnegative
from slimgraph.runtime.torch_backend._ops._registry import (
    MS_DOMAIN,
    Kernel,
    LowerContext,
    QuantizedWeight,
    Tensor,
    attr,
    op,
    optional,
    unsupported,
)

__all__ = [
    "q_dtype",
    "quantize_values",
    "dequantize_values",
    "fake_quantize",
    "dynamic_quantize",
    "integer_codes",
    "integer_matmul",
    "quantized_weight",
]

# DynamicQuantizeLinear's and GatherBlockQuantized's codes
_UINT8 = QuantSpec(ir.DataType.UINT8, symmetric=False)


def q_dtype(node: ir.Node) -> ir.DataType:
    """The integer type a QuantizeLinear produces or a DequantizeLinear reads."""
    if node.op_type == "DequantizeLinear" and node.inputs[0] is not None:
        if node.inputs[0].dtype is not None:
            return node.inputs[0].dtype
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    if zp is not None and zp.dtype is not None:
        return zp.dtype
    output_dtype = attr(node, "output_dtype", 0)
    if output_dtype:
        return ir.DataType(output_dtype)
    return ir.DataType.UINT8


def _broadcast_param(p: Tensor, x: Tensor, axis: int, block: int) -> Tensor:
    """A scale or zero point shaped to broadcast against `x`: per tensor (one element), per
    channel along `axis` (its values in any shape of another rank, e.g. [M, 1, 1] for a 4-D
    weight), or blocked (`block` elements of `axis` share one value; `p` has x's rank)."""
    if p.numel() == 1:
        return p.reshape(())
    a = axis % x.dim()
    if block:
        return p.repeat_interleave(block, dim=a).narrow(a, 0, x.shape[a])
    if p.dim() != x.dim():
        shape = [1] * x.dim()
        shape[a] = -1
        return p.reshape(shape)
    return p


def _grad_scale(s: Tensor, factor: float) -> Tensor:
    """`s` in the forward pass, gradient times `factor` (LSQ's step-size gradient scale)."""
    return (s - s * factor).detach() + s * factor


def quantize_values(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, spec: QuantSpec, axis: int = 1,
    block: int = 0,
) -> Tensor:
    """ONNX QuantizeLinear as a float tensor of integers, straight-through in its gradient.

    `clamp(round_half_even(x / scale) + zp, qmin, qmax)` with `(qmin, qmax) = spec.qrange` (the
    codes `quant_math.quantize_values` gives where `x / scale` is exact in x's type); the
    gradient is 1 through the rounding and 0 where the value saturates (the clamp's gradient).
    """
    s = _broadcast_param(scale.to(x.dtype), x, axis, block)
    v = x / s
    v = v + (torch.round(v) - v).detach()
    if zero_point is not None:
        v = v + _broadcast_param(zero_point.to(x.dtype), x, axis, block)
    qmin, qmax = spec.qrange
    return torch.clamp(v, qmin, qmax)


def dequantize_values(
    q: Tensor, scale: Tensor, zero_point: Tensor | None, axis: int = 1, block: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """ONNX DequantizeLinear: `(q - zp) * scale`."""
    s = _broadcast_param(scale.to(dtype), q, axis, block)
    q = q.to(dtype)
    if zero_point is not None:
        q = q - _broadcast_param(zero_point.to(dtype), q, axis, block)
    return q * s


def fake_quantize(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, spec: QuantSpec, axis: int = 1,
    block: int = 0,
) -> Tensor:
    """QuantizeLinear then DequantizeLinear with the same parameters (straight-through)."""
    q = quantize_values(x, scale, zero_point, spec, axis, block)
    return dequantize_values(q, scale, zero_point, axis, block, x.dtype)


def _lsq_factor(x: Tensor, scale: Tensor, spec: QuantSpec) -> float:
    per_step = x.numel() / max(scale.numel(), 1)
    qmin, qmax = spec.qrange
    positive_levels = max((qmax - qmin) // 2, 1)  # Q_P of the paper: 127 for 8 bits
    return 1.0 / math.sqrt(per_step * positive_levels)


@op("QuantizeLinear", "DequantizeLinear")
def _quantize_or_dequantize(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """QuantizeLinear: `quantize_values`; DequantizeLinear: `dequantize_values`, or fake
    quantization when it reads a weight lowered to a float parameter. A learned scale (LSQ)
    gets its gradient scaled in training."""
    quantize = node.op_type == "QuantizeLinear"
    r = type_grid(q_dtype(node))
    if r is None:
        what = "quantization to" if quantize else "dequantization of"
        raise unsupported(node, f"{what} {q_dtype(node).name}")
    axis, block = attr(node, "axis", 1), attr(node, "block_size", 0)
    source = node.inputs[0]
    weight = not quantize and source is not None and source.name in ctx.weight_values
    learned = node.inputs[1] is not None and node.inputs[1].name in ctx.learned_scales

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, scale = xs[0], xs[1]
        zp = xs[2] if len(xs) > 2 else None
        if learned and m.training:
            scale = _grad_scale(scale, _lsq_factor(x, scale, r))
        if quantize:
            return [quantize_values(x, scale, zp, r, axis, block)]
        if weight:  # a float parameter holding the dequantized weight: fake-quantize it
            return [fake_quantize(x, scale, zp, r, axis, block)]
        return [dequantize_values(x, scale, zp, axis, block)]

    return run


# --- the dynamic int8 ops ----------------------------------------------------------------------


def dynamic_quantize(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DynamicQuantizeLinear: uint8 codes (a float tensor, straight-through), scale and zero
    point of `x`, computed as onnxruntime does in float32 (no gradient through them)."""
    with torch.no_grad():
        flat = x.detach().reshape(-1)
        zero = torch.zeros((), dtype=x.dtype)
        low = torch.minimum(flat.min(), zero) if flat.numel() else zero
        high = torch.maximum(flat.max(), zero) if flat.numel() else zero
        qmin, qmax = _UINT8.qrange
        steps = float(qmax - qmin)
        scale = (high - low) / steps if bool(high != low) else torch.ones((), dtype=x.dtype)
        zero_point = torch.round(torch.clamp(float(qmin) - low / scale, float(qmin), float(qmax)))
    return quantize_values(x, scale, zero_point, _UINT8, 0, 0), scale, zero_point


def integer_codes(m: Any, x: Tensor, weight: QuantizedWeight | None) -> Tensor:
    """An integer input as float codes: a trained weight's parameter re-quantized with its own
    scale and zero point (straight-through), any other value converted."""
    if weight is None:
        return x if x.is_floating_point() else x.to(torch.float32)
    r = type_grid(weight.dtype)
    assert r is not None  # checked when the weight was lowered
    return quantize_values(x, m.value(weight.scale), _zero_point(m, weight), r, weight.axis,
                           weight.block)


def _zero_point(m: Any, weight: QuantizedWeight) -> Tensor | None:
    if weight.zero_point is not None:
        return m.value(weight.zero_point)
    return torch.tensor(float(weight.zero_point_default)) if weight.zero_point_default else None


def _shifted(codes: Tensor, zero_point: Tensor | None, axis: int, dtype: torch.dtype) -> Tensor:
    """codes - zero_point in `dtype` (a zero point per tensor, or per channel of `axis`)."""
    codes = codes.to(dtype)
    if zero_point is None:
        return codes
    return codes - _broadcast_param(zero_point.to(dtype), codes, axis, 0)


def _exact_dtype(m: Any) -> torch.dtype:
    """float64 in eval mode (integer products exact), float32 in training."""
    return torch.float32 if m.training else torch.float64


def integer_matmul(
    m: Any, a: Tensor, b: Tensor, a_zero: Tensor | None, b_zero: Tensor | None
) -> Tensor:
    """(a - a_zero) @ (b - b_zero) of float codes: a's zero point per tensor (or per row), b's
    per tensor or per column."""
    dtype = _exact_dtype(m)
    left = a.to(dtype) if a_zero is None else a.to(dtype) - _row_zero(a_zero.to(dtype), a)
    return torch.matmul(left, _shifted(b, b_zero, -1, dtype))


def _row_zero(zero: Tensor, a: Tensor) -> Tensor:
    """MatMulInteger's a_zero_point: a scalar, or one per row of A (shape [M] -> [M, 1])."""
    return zero.reshape(()) if zero.numel() == 1 else zero.reshape(-1, 1)


def quantized_weight(ctx: LowerContext, node: ir.Node, index: int) -> QuantizedWeight | None:
    """The trained integer weight read at input `index` of `node`, or None."""
    value = node.inputs[index] if len(node.inputs) > index else None
    return None if value is None else ctx.quantized_weights.get(value.name or "")


@op("DynamicQuantizeLinear")
def _dynamic_quantize_linear(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: list(dynamic_quantize(xs[0]))


@op("MatMulInteger")
def _matmul_integer(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """int32 (a - a_zero_point) @ (b - b_zero_point), as a float tensor of integers."""
    weight = quantized_weight(ctx, node, 1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        b = integer_codes(m, xs[1], weight)
        return [integer_matmul(m, integer_codes(m, xs[0], None), b, optional(xs, 2),
                               optional(xs, 3))]

    return run


@op("MatMulIntegerToFloat", domain=MS_DOMAIN)
def _matmul_integer_to_float(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """(A - a_zero_point) @ (B - b_zero_point) * a_scale * b_scale (+ bias)."""
    weight = quantized_weight(ctx, node, 1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        a_scale, b_scale = xs[2], xs[3]
        b = integer_codes(m, xs[1], weight)
        acc = integer_matmul(m, integer_codes(m, xs[0], None), b, optional(xs, 4),
                             optional(xs, 5))
        return [_scaled(acc, a_scale * b_scale, optional(xs, 6), a_scale.dtype)]

    return run


def _scaled(acc: Tensor, scale: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    y = (acc * scale.to(acc.dtype)).to(dtype)
    return y if bias is None else y + bias


@op("DynamicQuantizeMatMul", domain=MS_DOMAIN)
def _dynamic_quantize_matmul(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """A quantized to uint8 as DynamicQuantizeLinear does, then MatMulIntegerToFloat with B."""
    weight = quantized_weight(ctx, node, 1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        a, a_scale, a_zero = dynamic_quantize(xs[0])
        b = integer_codes(m, xs[1], weight)
        acc = integer_matmul(m, a, b, a_zero, optional(xs, 3))
        return [_scaled(acc, a_scale * xs[2], optional(xs, 4), xs[0].dtype)]

    return run


@op("ConvInteger")
def _conv_integer(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """int32 Conv of (x - x_zero_point) with (w - w_zero_point), padding with the zero point."""
    weight = quantized_weight(ctx, node, 1)
    conv = conv_kernel(node, opset, ctx)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        dtype = _exact_dtype(m)
        x = _shifted(integer_codes(m, xs[0], None), optional(xs, 2), 0, dtype)
        w = _shifted(integer_codes(m, xs[1], weight), optional(xs, 3), 0, dtype)
        return conv(m, [x, w])

    return run


@op("GatherBlockQuantized", domain=MS_DOMAIN)
def _gather_block_quantized(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """Rows of a block-quantized uint8 table (8 bits; zero point 128 unless given) gathered on
    axis 0 and dequantized; an index out of range gives zeros."""
    bits, block = attr(node, "bits", 4), attr(node, "block_size", 128)
    gather_axis, quantize_axis = attr(node, "gather_axis", 0), attr(node, "quantize_axis", 1)
    data = node.inputs[0]
    if bits != 8 or data is None or data.dtype != ir.DataType.UINT8 or gather_axis != 0:
        raise unsupported(node, "data other than 8-bit uint8 codes gathered on axis 0")
    weight = quantized_weight(ctx, node, 0)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        table, indices, scales, zero = xs[0], xs[1].to(torch.int64), xs[2], optional(xs, 3)
        rows = table.shape[0]
        valid = (indices >= -rows) & (indices < rows)
        picks = nonnegative(indices, rows).clamp(0, rows - 1)
        zero_rows = zero[picks] if zero is not None else torch.tensor(128.0)
        axis = quantize_axis % table.dim() - 1 + indices.dim()
        if weight is not None:  # the rows of a trained table, fake-quantized
            out = fake_quantize(table[picks], scales[picks], zero_rows, _UINT8, axis, block)
        else:
            out = dequantize_values(table[picks], scales[picks], zero_rows, axis, block,
                                    scales.dtype)
        keep = valid.reshape(*valid.shape, *[1] * (table.dim() - 1))
        return [torch.where(keep, out, torch.zeros((), dtype=out.dtype))]

    return run
