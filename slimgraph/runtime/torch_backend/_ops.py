"""The op table: one torch kernel builder per ONNX op, keyed by (domain, op_type).

A builder receives the node, the opset version of its domain and the lowering context, reads the
node's attributes once (honouring the opset's semantics: axes as attribute or input, Softmax's
2-D coercion before opset 13, ...) and returns a kernel: a function of the module (for
`training`) and the node's input tensors (None for a missing optional input) that returns the
node's output tensors. Semantics follow the ONNX operator specification (onnx.ai/onnx/operators)
and, where the specification leaves room, onnxruntime's CPU kernels.

Quantization: QuantizeLinear/DequantizeLinear are fake quantization with a straight-through
estimator (Bengio et al., 2013): `q = clamp(round(x / s) + zp, qmin, qmax)` with torch's
round-half-to-even rounding, gradient 1 through the rounding and 0 where the value saturates, so a
QuantizeLinear output is a float tensor holding integers and DequantizeLinear computes
`(q - zp) * s`. When the scale is a parameter the composition gives the LSQ gradient of Esser et al.
(2020), "Learned Step Size Quantization", scaled by `1 / sqrt(numel * qmax)`.

This module imports torch; it is only imported by `_lower` (lazily).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch.nn import functional as F

from slimgraph.errors import UnsupportedModelError

__all__ = [
    "Kernel",
    "Builder",
    "LowerContext",
    "QRange",
    "lookup",
    "known_ops",
    "QOPERATOR_OPS",
    "TORCH_DTYPES",
    "qrange",
    "q_dtype",
    "fake_quantize",
    "quantize_values",
]

Tensor = torch.Tensor
Kernel = Callable[[torch.nn.Module, list[Any]], list[Any]]


@dataclass
class LowerContext:
    """What a builder may know beyond its node: which values are trained weights or scales."""

    weight_values: set[str] = field(default_factory=set)  # integer weights lowered to floats
    learned_scales: set[str] = field(default_factory=set)


Builder = Callable[[ir.Node, int, LowerContext], Kernel]

_OPS: dict[tuple[str, str], Builder] = {}

QOPERATOR_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QLinearAdd", "QLinearMul",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid",
    "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "QGemm",
    "QAttention", "DynamicQuantizeMatMul", "DynamicQuantizeLinear", "MatMulIntegerToFloat",
    "QLinearConvTranspose", "MatMulNBits", "QOrderedMatMul",
})

TORCH_DTYPES: dict[ir.DataType, torch.dtype] = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.INT16: torch.int16,
    ir.DataType.UINT16: torch.int32,  # widened: torch's uint16 lacks most kernels
    ir.DataType.INT32: torch.int32,
    ir.DataType.UINT32: torch.int64,
    ir.DataType.INT64: torch.int64,
    ir.DataType.BOOL: torch.bool,
    ir.DataType.INT4: torch.int8,
    ir.DataType.UINT4: torch.uint8,
}


def _domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def op(*op_types: str, domain: str = "") -> Callable[[Builder], Builder]:
    """Register a builder for `op_types` of `domain`."""

    def register(builder: Builder) -> Builder:
        for op_type in op_types:
            _OPS[(domain, op_type)] = builder
        return builder

    return register


def lookup(domain: str, op_type: str) -> Builder | None:
    return _OPS.get((_domain(domain), op_type))


def known_ops() -> list[tuple[str, str]]:
    return sorted(_OPS)


# --- attribute helpers -------------------------------------------------------------------------


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    found = node.attributes.get(name)
    if found is None:
        return default
    value = found.value
    if isinstance(value, ir.TensorProtocol):
        return value.numpy()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return value


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else _list(t)


def _list(t: Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _unsupported(node: ir.Node, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"the torch backend does not support {what} in {node.op_type} node '{node.name}'"
    )


def _single(fn: Callable[..., Tensor]) -> Kernel:
    return lambda m, xs: [fn(*xs)]


# --- elementwise -------------------------------------------------------------------------------

_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
    "Log": torch.log, "Sqrt": torch.sqrt, "Abs": torch.abs, "Neg": torch.neg,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil,
    "Round": torch.round, "Erf": torch.erf, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan,
    "Not": torch.logical_not, "Sign": torch.sign, "Softsign": F.softsign, "Mish": F.mish,
    "IsNaN": torch.isnan, "Identity": lambda x: x, "Softplus": F.softplus,
    "HardSwish": F.hardswish, "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan,
    "Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh,
    "Atanh": torch.atanh,
}


@op(*_UNARY)
def _unary(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    fn = _UNARY[node.op_type]
    return lambda m, xs: [fn(xs[0])]


def _div(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div,
    "Equal": torch.eq, "Greater": torch.gt, "Less": torch.lt, "GreaterOrEqual": torch.ge,
    "LessOrEqual": torch.le, "And": torch.logical_and, "Or": torch.logical_or,
    "Xor": torch.logical_xor, "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
}


@op(*_BINARY)
def _binary(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    fn = _BINARY[node.op_type]
    if opset < 7 and attr(node, "broadcast", 0) and attr(node, "axis") is not None:
        raise _unsupported(node, "legacy broadcast with an axis")
    return lambda m, xs: [fn(xs[0], xs[1])]


@op("Pow")
def _pow(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [torch.pow(xs[0], xs[1]).to(xs[0].dtype)]


@op("Mod")
def _mod(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    fmod = attr(node, "fmod", 0)
    return lambda m, xs: [torch.fmod(xs[0], xs[1]) if fmod else torch.remainder(xs[0], xs[1])]


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[list[Tensor]], Tensor]:
    def run(xs: list[Tensor]) -> Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out

    return run


@op("Sum", "Max", "Min", "Mean")
def _nary(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    fns: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "Sum": torch.add, "Max": torch.maximum, "Min": torch.minimum, "Mean": torch.add,
    }
    fn = fns[node.op_type]
    run = _variadic(fn)
    if node.op_type == "Mean":
        return lambda m, xs: [run(xs) / len(xs)]
    return lambda m, xs: [run(xs)]


# Activations with one `alpha` attribute: op type -> (torch function, ONNX default alpha).
_ALPHA_ACTIVATIONS: dict[str, tuple[Callable[..., Any], float]] = {
    "LeakyRelu": (F.leaky_relu, 0.01), "Elu": (F.elu, 1.0), "Celu": (F.celu, 1.0),
}


@op(*_ALPHA_ACTIVATIONS)
def _alpha_activation(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    fn, default = _ALPHA_ACTIVATIONS[node.op_type]
    alpha = attr(node, "alpha", default)
    return lambda m, xs: [fn(xs[0], alpha)]


@op("Selu")
def _selu(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    alpha = attr(node, "alpha", 1.67326319217681884765625)
    gamma = attr(node, "gamma", 1.05070102214813232421875)
    return lambda m, xs: [gamma * torch.where(xs[0] > 0, xs[0], alpha * torch.expm1(xs[0]))]


@op("HardSigmoid")
def _hard_sigmoid(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    alpha, beta = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
    return lambda m, xs: [torch.clamp(alpha * xs[0] + beta, 0.0, 1.0)]


@op("PRelu")
def _prelu(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [torch.where(xs[0] >= 0, xs[0], xs[0] * xs[1])]


@op("ThresholdedRelu")
def _thresholded_relu(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    alpha = attr(node, "alpha", 1.0)
    return lambda m, xs: [torch.where(xs[0] > alpha, xs[0], torch.zeros_like(xs[0]))]


@op("Gelu")
def _gelu(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    approximate = attr(node, "approximate", "none")
    return lambda m, xs: [F.gelu(xs[0], approximate=approximate)]


@op("IsInf")
def _isinf(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    pos, neg = attr(node, "detect_positive", 1), attr(node, "detect_negative", 1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        return [(torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))]

    return run


@op("Clip")
def _clip(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    if opset < 11:
        lo, hi = attr(node, "min", -math.inf), attr(node, "max", math.inf)
        return lambda m, xs: [torch.clamp(xs[0], lo, hi)]

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        lo = xs[1].item() if len(xs) > 1 and xs[1] is not None else None
        hi = xs[2].item() if len(xs) > 2 and xs[2] is not None else None
        if lo is None and hi is None:
            return [x]
        return [torch.clamp(x, lo, hi)]

    return run


@op("Where")
def _where(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [torch.where(xs[0], xs[1], xs[2])]


@op("Cast")
def _cast(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    to = TORCH_DTYPES.get(ir.DataType(attr(node, "to")))
    if to is None:
        raise _unsupported(node, f"a cast to {ir.DataType(attr(node, 'to')).name}")
    return lambda m, xs: [xs[0].to(to)]


@op("CastLike")
def _cast_like(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [xs[0].to(xs[1].dtype)]


# --- shapes and indexing -----------------------------------------------------------------------


@op("Shape")
def _shape(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    start, end = attr(node, "start", 0), attr(node, "end")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        return [torch.tensor(list(xs[0].shape)[start:end], dtype=torch.int64)]

    return run


@op("Size")
def _size(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [torch.tensor(xs[0].numel(), dtype=torch.int64)]


@op("Constant")
def _constant(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    (name, found), = node.attributes.items()
    value = found.value
    if name == "value":
        array = value.numpy()
    elif name == "value_float":
        array = np.array(value, np.float32)
    elif name == "value_floats":
        array = np.array(list(value), np.float32)
    elif name == "value_int":
        array = np.array(value, np.int64)
    elif name == "value_ints":
        array = np.array(list(value), np.int64)
    else:
        raise _unsupported(node, f"attribute {name}")
    tensor = to_torch(array)
    return lambda m, xs: [tensor]


@op("ConstantOfShape")
def _constant_of_shape(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    value = attr(node, "value")
    fill = to_torch(np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(1))

    def run(m: Any, xs: list[Any]) -> list[Any]:
        return [fill.expand(_list(xs[0])).clone()]

    return run


@op("Range")
def _range(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    def run(m: Any, xs: list[Any]) -> list[Any]:
        start, limit, delta = (x.item() for x in xs)
        return [torch.arange(start, limit, delta, dtype=xs[0].dtype)]

    return run


@op("Reshape")
def _reshape(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    allowzero = attr(node, "allowzero", 0)
    fixed = attr(node, "shape") if opset < 5 else None

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        shape = list(fixed) if fixed is not None else _list(xs[1])
        if not allowzero:
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [x.reshape(shape)]

    return run


@op("Flatten")
def _flatten(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axis = attr(node, "axis", 1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        a = axis + x.dim() if axis < 0 else axis
        return [x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))]

    return run


def _axes_source(node: ir.Node, opset: int, since: int, index: int) -> Callable[[list], Any]:
    """Axes as an attribute before opset `since`, as input `index` from then on."""
    if opset < since:
        axes = attr(node, "axes")
        return lambda xs: axes
    return lambda xs: _ints(xs[index]) if len(xs) > index and xs[index] is not None else None


@op("Squeeze")
def _squeeze(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axes_of = _axes_source(node, opset, 13, 1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, axes = xs[0], axes_of(xs)
        if axes is None:
            return [x.squeeze()] if x.dim() else [x]
        dims = sorted({a % x.dim() for a in axes}, reverse=True)
        for d in dims:
            x = x.squeeze(d)
        return [x]

    return run


@op("Unsqueeze")
def _unsqueeze(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axes_of = _axes_source(node, opset, 13, 1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, axes = xs[0], axes_of(xs)
        rank = x.dim() + len(axes)
        for d in sorted(a % rank for a in axes):
            x = x.unsqueeze(d)
        return [x]

    return run


@op("Transpose")
def _transpose(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    perm = attr(node, "perm")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        return [x.permute(perm if perm is not None else list(range(x.dim() - 1, -1, -1)))]

    return run


@op("Concat")
def _concat(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axis = attr(node, "axis", 1 if opset < 4 else None)
    return lambda m, xs: [torch.cat([x for x in xs if x is not None], axis)]


@op("Split")
def _split(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axis = attr(node, "axis", 0)
    count = len(node.outputs)
    sizes_attr = attr(node, "split") if opset < 13 else None

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        sizes = sizes_attr
        if opset >= 13 and len(xs) > 1 and xs[1] is not None:
            sizes = _ints(xs[1])
        if sizes is None:
            dim = x.shape[axis]
            chunk = -(-dim // count)
            sizes = [min(chunk, dim - i * chunk) for i in range(count)]
        return list(torch.split(x, list(sizes), axis))

    return run


def _onnx_slice(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    dim = x.shape[axis]
    if step > 0:
        index = [slice(None)] * x.dim()
        index[axis] = slice(start, end, step)
        return x[tuple(index)]
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    start = min(max(start, 0), dim - 1)
    end = min(max(end, -1), dim - 1)
    picks = torch.tensor(list(range(start, end, step)), dtype=torch.int64)
    return x.index_select(axis, picks)


@op("Slice")
def _slice(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    if opset < 10:
        starts, ends, axes = attr(node, "starts"), attr(node, "ends"), attr(node, "axes")

        def params(xs: list[Any]) -> tuple[list[int], list[int], Any, Any]:
            return starts, ends, axes, None
    else:

        def params(xs: list[Any]) -> tuple[list[int], list[int], Any, Any]:
            get = lambda i: _ints(xs[i]) if len(xs) > i and xs[i] is not None else None  # noqa: E731
            return _list(xs[1]), _list(xs[2]), get(3), get(4)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        starts_, ends_, axes_, steps_ = params(xs)
        axes_ = axes_ if axes_ is not None else list(range(len(starts_)))
        steps_ = steps_ if steps_ is not None else [1] * len(starts_)
        for s, e, a, st in zip(starts_, ends_, axes_, steps_, strict=True):
            x = _onnx_slice(x, a % x.dim(), s, e, st)
        return [x]

    return run


def _nonnegative(indices: Tensor, size: int) -> Tensor:
    """Gather-style int64 indices with the negative ones counted from the end of the axis."""
    indices = indices.to(torch.int64)
    return torch.where(indices < 0, indices + size, indices)


@op("Gather")
def _gather(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axis = attr(node, "axis", 0)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, idx = xs
        a = axis % x.dim()
        idx = _nonnegative(idx, x.shape[a])
        out = x.index_select(a, idx.reshape(-1))
        return [out.reshape(*x.shape[:a], *idx.shape, *x.shape[a + 1:])]

    return run


@op("GatherElements")
def _gather_elements(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axis = attr(node, "axis", 0)
    return lambda m, xs: [torch.gather(xs[0], axis, _nonnegative(xs[1], xs[0].shape[axis]))]


@op("Expand")
def _expand(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, shape = xs[0], _list(xs[1])
        return [x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape)))]

    return run


@op("Tile")
def _tile(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [xs[0].repeat(_list(xs[1]))]


@op("Pad")
def _pad(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    mode = attr(node, "mode", "constant")
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    if mode not in modes:
        raise _unsupported(node, f"mode '{mode}'")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        axes = None
        if opset < 11:
            pads, value = attr(node, "pads", attr(node, "paddings")), attr(node, "value", 0.0)
        else:
            pads = _list(xs[1])
            value = xs[2].item() if len(xs) > 2 and xs[2] is not None and xs[2].numel() else 0
            axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else None
        axes = [a % x.dim() for a in axes] if axes is not None else list(range(x.dim()))
        n = len(axes)
        begin = dict(zip(axes, pads[:n], strict=True))
        end = dict(zip(axes, pads[n:], strict=True))
        first = min([a for a in axes if begin[a] or end[a]], default=x.dim() - 1)
        torch_pads: list[int] = []
        for d in range(x.dim() - 1, first - 1, -1):
            torch_pads += [begin.get(d, 0), end.get(d, 0)]
        if mode == "constant":
            return [F.pad(x, torch_pads, value=value)]
        if x.dim() - first > 3 or first == 0:
            raise _unsupported(node, f"mode '{mode}' on a leading axis")
        return [F.pad(x, torch_pads, mode=modes[mode])]

    return run


@op("Einsum")
def _einsum(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    equation = attr(node, "equation")
    return lambda m, xs: [torch.einsum(equation, *xs)]


@op("MatMul")
def _matmul(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [torch.matmul(xs[0], xs[1])]


@op("Gemm")
def _gemm(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    trans_a, trans_b = attr(node, "transA", 0), attr(node, "transB", 0)
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        a, b = xs[0], xs[1]
        c = xs[2] if len(xs) > 2 else None
        a = a.t() if trans_a else a
        b = b.t() if trans_b else b
        y = a @ b
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return [y]

    return run


@op("CumSum")
def _cumsum(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    exclusive, reverse = attr(node, "exclusive", 0), attr(node, "reverse", 0)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, axis = xs[0], int(xs[1].item())
        if reverse:
            x = x.flip(axis)
        y = torch.cumsum(x, axis)
        if exclusive:
            y = y - x
        return [y.flip(axis) if reverse else y]

    return run


@op("Trilu")
def _trilu(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    upper = attr(node, "upper", 1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        k = int(xs[1].item()) if len(xs) > 1 and xs[1] is not None else 0
        return [torch.triu(xs[0], k) if upper else torch.tril(xs[0], k)]

    return run


@op("DepthToSpace", "SpaceToDepth")
def _depth_space(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """Blocks of `blocksize` x `blocksize` pixels moved into channels (SpaceToDepth, in the
    depth-column-row order) or back (DepthToSpace, DCR or CRD order)."""
    b, mode = attr(node, "blocksize"), attr(node, "mode", "DCR")
    to_depth = node.op_type == "SpaceToDepth"

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        n, c, h, w = x.shape
        if to_depth:
            y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
            return [y.reshape(n, c * b * b, h // b, w // b)]
        if mode == "DCR":
            y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        return [y.reshape(n, c // (b * b), h * b, w * b)]

    return run


@op("TopK")
def _topk(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axis, largest = attr(node, "axis", -1), attr(node, "largest", 1)
    k_attr = attr(node, "k") if opset < 10 else None

    def run(m: Any, xs: list[Any]) -> list[Any]:
        k = k_attr if k_attr is not None else int(xs[1].reshape(-1)[0].item())
        values, indices = torch.topk(xs[0], k, axis, largest=bool(largest), sorted=True)
        return [values, indices]

    return run


@op("ArgMax", "ArgMin")
def _argmax(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axis, keepdims = attr(node, "axis", 0), attr(node, "keepdims", 1)
    last = attr(node, "select_last_index", 0)
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        if last:
            idx = x.shape[axis] - 1 - fn(x.flip(axis), axis, keepdim=bool(keepdims))
        else:
            idx = fn(x, axis, keepdim=bool(keepdims))
        return [idx]

    return run


# --- reductions --------------------------------------------------------------------------------

_REDUCE_SINCE = {"ReduceSum": 13}  # the others take axes as an input from opset 18


_REDUCERS: dict[str, Callable[[Tensor, list[int], bool], Tensor]] = {
    "ReduceSum": lambda x, d, k: torch.sum(x, d, keepdim=k),
    "ReduceMean": lambda x, d, k: torch.mean(x, d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, d, keepdim=k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k),
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


def _prod(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


@op(*_REDUCERS)
def _reduce(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    fn = _REDUCERS[node.op_type]
    keepdims = bool(attr(node, "keepdims", 1))
    noop = attr(node, "noop_with_empty_axes", 0)
    axes_of = _axes_source(node, opset, _REDUCE_SINCE.get(node.op_type, 18), 1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, axes = xs[0], axes_of(xs)
        if not axes:
            if noop:
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, [a % max(x.dim(), 1) for a in axes], keepdims)]

    return run


# --- normalization and activation over axes ----------------------------------------------------


def _softmax_family(fn: Callable[[Tensor, int], Tensor]) -> Builder:
    def build(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
        axis = attr(node, "axis", -1 if opset >= 13 else 1)
        if opset >= 13:
            return lambda m, xs: [fn(xs[0], axis)]

        def coerced(m: Any, xs: list[Any]) -> list[Any]:  # 2-D coercion before opset 13
            x = xs[0]
            a = axis % x.dim()
            flat = x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))
            return [fn(flat, 1).reshape(x.shape)]

        return coerced

    return build


def _hardmax(x: Tensor, axis: int) -> Tensor:
    return F.one_hot(torch.argmax(x, axis), x.shape[axis]).movedim(-1, axis).to(x.dtype)


op("Softmax")(_softmax_family(lambda x, a: torch.softmax(x, a)))
op("LogSoftmax")(_softmax_family(lambda x, a: torch.log_softmax(x, a)))
op("Hardmax")(_softmax_family(_hardmax))


@op("BatchNormalization")
def _batch_norm(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    eps = attr(node, "epsilon", 1e-5)
    momentum = attr(node, "momentum", 0.9)
    if opset < 7 and not attr(node, "spatial", 1):
        raise _unsupported(node, "spatial=0")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, scale, bias, mean, var = xs[:5]
        y = F.batch_norm(x, mean, var, scale, bias, m.training, 1.0 - momentum, eps)
        return [y, mean, var][: len(node.outputs)]

    return run


@op("InstanceNormalization")
def _instance_norm(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    eps = attr(node, "epsilon", 1e-5)
    return lambda m, xs: [F.instance_norm(xs[0], weight=xs[1], bias=xs[2], eps=eps)]


@op("LayerNormalization")
def _layer_norm(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axis, eps = attr(node, "axis", -1), attr(node, "epsilon", 1e-5)
    outputs = len(node.outputs)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, scale = xs[0], xs[1]
        bias = xs[2] if len(xs) > 2 else None
        a = axis % x.dim()
        shape = tuple(x.shape[a:])
        if outputs == 1 and tuple(scale.shape) == shape and (bias is None or bias.shape == shape):
            return [F.layer_norm(x, shape, scale, bias, eps)]
        dims = list(range(a, x.dim()))
        mean = x.mean(dims, keepdim=True)
        inv = torch.rsqrt(((x - mean) ** 2).mean(dims, keepdim=True) + eps)
        y = (x - mean) * inv * scale
        if bias is not None:
            y = y + bias
        return [y, mean, inv][:outputs]

    return run


@op("LRN")
def _lrn(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    size = attr(node, "size")
    alpha, beta, bias = attr(node, "alpha", 1e-4), attr(node, "beta", 0.75), attr(node, "bias", 1.0)
    front, back = (size - 1) // 2, size - 1 - (size - 1) // 2

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        n, c = x.shape[:2]
        sq = (x * x).reshape(n, 1, c, -1)
        sums = F.avg_pool2d(F.pad(sq, (0, 0, front, back)), (size, 1), 1) * size
        return [x / (bias + alpha / size * sums.reshape(x.shape)) ** beta]

    return run


@op("Dropout")
def _dropout(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    ratio_attr = attr(node, "ratio", 0.5)
    outputs = len(node.outputs)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        ratio = ratio_attr if opset < 12 or len(xs) < 2 or xs[1] is None else float(xs[1].item())
        if not m.training or ratio == 0.0:
            return [x, torch.ones_like(x, dtype=torch.bool)][:outputs]
        keep = torch.rand_like(x) >= ratio
        return [x * keep / (1.0 - ratio), keep][:outputs]

    return run


# --- convolution and pooling -------------------------------------------------------------------


def _auto_pads(
    auto_pad: str, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
    dilations: Sequence[int],
) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] for SAME_UPPER/SAME_LOWER/VALID."""
    rank = len(spatial)
    if auto_pad == "VALID":
        return [0] * (2 * rank)
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else total - small)
        end.append(total - small if auto_pad == "SAME_UPPER" else small)
    return begin + end


def _torch_pads(pads: Sequence[int]) -> list[int]:
    """ONNX [b1, b2, e1, e2] to F.pad's [b2, e2, b1, e1] (last axis first)."""
    rank = len(pads) // 2
    out: list[int] = []
    for i in range(rank - 1, -1, -1):
        out += [pads[i], pads[i + rank]]
    return out


class _Window:
    """Kernel, strides, dilations and pads of a Conv or pooling node."""

    def __init__(self, node: ir.Node, kernel: Sequence[int] | None) -> None:
        self.kernel = list(kernel) if kernel is not None else None
        rank = len(self.kernel) if self.kernel is not None else None
        self.strides = attr(node, "strides")
        self.dilations = attr(node, "dilations")
        self.auto_pad = attr(node, "auto_pad", "NOTSET")
        self.pads = attr(node, "pads")
        self.rank = rank

    def resolve(self, x: Tensor, kernel: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        rank = len(kernel)
        strides = self.strides or [1] * rank
        dilations = self.dilations or [1] * rank
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER", "VALID"):
            pads = _auto_pads(self.auto_pad, x.shape[2:], kernel, strides, dilations)
        else:
            pads = self.pads or [0] * (2 * rank)
        return list(strides), list(dilations), list(pads)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@op("Conv")
def _conv(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    window = _Window(node, attr(node, "kernel_shape"))
    group = attr(node, "group", 1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, w = xs[0], xs[1]
        b = xs[2] if len(xs) > 2 else None
        rank = w.dim() - 2
        strides, dilations, pads = window.resolve(x, w.shape[2:])
        if pads[:rank] == pads[rank:]:
            padding: Any = pads[:rank]
        else:
            x, padding = F.pad(x, _torch_pads(pads)), 0
        return [_CONV[rank](x, w, b, strides, padding, dilations, group)]

    return run


@op("ConvTranspose")
def _conv_transpose(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    window = _Window(node, attr(node, "kernel_shape"))
    group = attr(node, "group", 1)
    output_padding = attr(node, "output_padding")
    output_shape = attr(node, "output_shape")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, w = xs[0], xs[1]
        b = xs[2] if len(xs) > 2 else None
        rank = w.dim() - 2
        kernel = list(w.shape[2:])
        strides = window.strides or [1] * rank
        dilations = window.dilations or [1] * rank
        extra = output_padding or [0] * rank
        full = [(x.shape[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
                for i in range(rank)]
        if output_shape is not None or window.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = (list(output_shape)[-rank:] if output_shape is not None
                      else [x.shape[2 + i] * strides[i] for i in range(rank)])
            total = [full[i] + extra[i] - target[i] for i in range(rank)]
            if window.auto_pad == "SAME_UPPER":
                begin = [t // 2 for t in total]
            else:
                begin = [t - t // 2 for t in total]
            pads = begin + [t - bg for t, bg in zip(total, begin, strict=True)]
        elif window.auto_pad == "VALID":
            pads = [0] * (2 * rank)
        else:
            pads = window.pads or [0] * (2 * rank)
        symmetric = pads[:rank] == pads[rank:] and all(
            0 <= e < max(s, d) for e, s, d in zip(extra, strides, dilations, strict=True)
        )
        if symmetric:
            return [_CONV_T[rank](x, w, b, strides, pads[:rank], extra, group, dilations)]
        y = _CONV_T[rank](x, w, None, strides, 0, 0, group, dilations)
        crop: list[int] = []
        for i in range(rank - 1, -1, -1):
            crop += [-pads[i], -pads[i + rank] + extra[i]]
        y = F.pad(y, crop)
        if b is not None:
            y = y + b.reshape(1, -1, *([1] * rank))
        return [y]

    return run


class _PoolWindow(_Window):
    """The window of a pooling node: its kernel is the `kernel_shape` attribute (a Conv's is its
    weight's shape), and `ceil_mode` rounds the output size up."""

    def __init__(self, node: ir.Node) -> None:
        super().__init__(node, attr(node, "kernel_shape"))
        self.pool_kernel: list[int] = list(attr(node, "kernel_shape"))
        self.ceil = bool(attr(node, "ceil_mode", 0))

    def resolve_pool(self, x: Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
        """Kernel, strides, dilations and ONNX pads for input `x`."""
        return self.pool_kernel, *self.resolve(x, self.pool_kernel)


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@op("MaxPool")
def _max_pool(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    window = _PoolWindow(node)
    ceil = window.ceil
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        raise _unsupported(node, "the Indices output")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        kernel, strides, dilations, pads = window.resolve_pool(x)
        rank = len(kernel)
        if pads[:rank] == pads[rank:] and all(
            p <= (k - 1) * d // 2 for p, k, d in zip(pads[:rank], kernel, dilations, strict=True)
        ):
            return [_MAXPOOL[rank](x, kernel, strides, pads[:rank], dilations, ceil)]
        x = F.pad(x, _torch_pads(pads), value=-math.inf)
        return [_MAXPOOL[rank](x, kernel, strides, 0, dilations, ceil)]

    return run


def _sum_pool(x: Tensor, kernel: list[int], strides: list[int], ceil: bool) -> Tensor:
    rank = len(kernel)
    if rank == 1:
        return _sum_pool(x.unsqueeze(-1), kernel + [1], strides + [1], ceil).squeeze(-1)
    pool = F.avg_pool2d if rank == 2 else F.avg_pool3d
    return pool(x, kernel, strides, 0, ceil, True, 1)


@op("AveragePool")
def _avg_pool(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    window = _PoolWindow(node)
    ceil = window.ceil
    include_pad = bool(attr(node, "count_include_pad", 0))
    if window.dilations and any(d != 1 for d in window.dilations):
        raise _unsupported(node, "dilations")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        kernel, strides, _, pads = window.resolve_pool(x)
        rank = len(kernel)
        if not any(pads) and not ceil:
            pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]
            return [pool(x, kernel, strides)]
        padded = F.pad(x, _torch_pads(pads))
        sums = _sum_pool(padded, kernel, strides, ceil)
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
        mask = F.pad(ones, _torch_pads(pads), value=1.0 if include_pad else 0.0)
        counts = _sum_pool(mask, kernel, strides, ceil)
        return [sums / counts]

    return run


@op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    mean = node.op_type == "GlobalAveragePool"

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        dims = list(range(2, x.dim()))
        return [x.mean(dims, keepdim=True) if mean else x.amax(dims, keepdim=True)]

    return run


# --- resize ------------------------------------------------------------------------------------


def _source_coords(mode: str, out: int, size: int, scale: float) -> Tensor:
    x = torch.arange(out, dtype=torch.float64)
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "align_corners":
        return x * (size - 1) / (out - 1) if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    raise ValueError(mode)


_NEAREST = {
    "round_prefer_floor": lambda c: torch.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
    "floor": torch.floor,
    "ceil": torch.ceil,
}


@op("Resize", "Upsample")
def _resize(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    mode = attr(node, "mode", "nearest")
    legacy = node.op_type == "Upsample" or opset < 11
    coord = "asymmetric" if legacy else attr(node, "coordinate_transformation_mode", "half_pixel")
    nearest = "floor" if legacy else attr(node, "nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear", "bilinear") or coord not in (
        "half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn"
    ) or nearest not in _NEAREST:
        raise _unsupported(node, f"mode '{mode}' with '{coord}' coordinates")
    policy = attr(node, "keep_aspect_ratio_policy", "stretch")
    if attr(node, "axes") is not None or policy != "stretch":
        raise _unsupported(node, "axes or keep_aspect_ratio_policy")
    scales_attr = attr(node, "scales") if node.op_type == "Upsample" and opset < 9 else None

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        scales: list[Any] | None
        sizes: list[int] | None
        if scales_attr is not None:
            scales, sizes = list(scales_attr), None
        elif legacy:
            scales, sizes = xs[1].reshape(-1).tolist(), None
        else:
            scales_t = xs[2] if len(xs) > 2 else None
            sizes_t = xs[3] if len(xs) > 3 else None
            given = scales_t is not None and scales_t.numel()
            scales = scales_t.reshape(-1).tolist() if given and scales_t is not None else None
            sizes = _ints(sizes_t) if sizes_t is not None and sizes_t.numel() else None
        if scales is None and sizes is None:
            raise _unsupported(node, "neither scales nor sizes")
        for axis in range(x.dim()):
            size = x.shape[axis]
            if sizes is not None:
                out, scale = sizes[axis], sizes[axis] / size
            else:
                assert scales is not None
                scale = float(scales[axis])
                out = int(math.floor(size * scale))
            if out == size and scale == 1.0:
                continue
            c = _source_coords(coord, out, size, scale)
            if mode == "nearest":
                idx = _NEAREST[nearest](c).clamp(0, size - 1).to(torch.int64)
                x = x.index_select(axis, idx)
                continue
            c = c.clamp(0, size - 1)
            lo = torch.floor(c).to(torch.int64)
            hi = torch.clamp(lo + 1, max=size - 1)
            frac = (c - lo).to(x.dtype)
            shape = [1] * x.dim()
            shape[axis] = out
            frac = frac.reshape(shape)
            x = x.index_select(axis, lo) * (1 - frac) + x.index_select(axis, hi) * frac
        return [x]

    return run


# --- quantization ------------------------------------------------------------------------------


@dataclass(frozen=True)
class QRange:
    """The integer type of a quantized value: its range and IR data type."""

    dtype: ir.DataType
    qmin: int
    qmax: int


_QRANGES = {
    ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255),
    ir.DataType.INT4: (-8, 7), ir.DataType.UINT4: (0, 15),
    ir.DataType.INT16: (-32768, 32767), ir.DataType.UINT16: (0, 65535),
    ir.DataType.INT32: (-(2**31), 2**31 - 1),
}


def qrange(dtype: ir.DataType) -> QRange | None:
    bounds = _QRANGES.get(dtype)
    return None if bounds is None else QRange(dtype, *bounds)


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
    """A scale or zero point shaped to broadcast against `x` (per-tensor, per-axis, blocked)."""
    if p.dim() == 0 or p.numel() == 1 and x.dim() == 0:
        return p.reshape(())
    a = axis % x.dim()
    if block:
        return p.repeat_interleave(block, dim=a).narrow(a, 0, x.shape[a])
    if p.dim() == 1:
        shape = [1] * x.dim()
        shape[a] = -1
        return p.reshape(shape)
    return p


def _grad_scale(s: Tensor, factor: float) -> Tensor:
    """`s` in the forward pass, gradient times `factor` (LSQ's step-size gradient scale)."""
    return (s - s * factor).detach() + s * factor


def quantize_values(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, r: QRange, axis: int = 1, block: int = 0
) -> Tensor:
    """ONNX QuantizeLinear as a float tensor of integers, straight-through in its gradient.

    `clamp(round_half_even(x / scale) + zp, qmin, qmax)`; the gradient is 1 through the rounding
    and 0 where the value saturates (the clamp's gradient).
    """
    s = _broadcast_param(scale.to(x.dtype), x, axis, block)
    v = x / s
    v = v + (torch.round(v) - v).detach()
    if zero_point is not None:
        v = v + _broadcast_param(zero_point.to(x.dtype), x, axis, block)
    return torch.clamp(v, r.qmin, r.qmax)


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
    x: Tensor, scale: Tensor, zero_point: Tensor | None, r: QRange, axis: int = 1, block: int = 0
) -> Tensor:
    """QuantizeLinear then DequantizeLinear with the same parameters (straight-through)."""
    q = quantize_values(x, scale, zero_point, r, axis, block)
    return dequantize_values(q, scale, zero_point, axis, block, x.dtype)


def _lsq_factor(x: Tensor, scale: Tensor, r: QRange) -> float:
    per_step = x.numel() / max(scale.numel(), 1)
    positive_levels = max((r.qmax - r.qmin) // 2, 1)  # Q_P of the paper: 127 for 8 bits
    return 1.0 / math.sqrt(per_step * positive_levels)


@op("QuantizeLinear", "DequantizeLinear")
def _quantize_or_dequantize(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """QuantizeLinear: `quantize_values`; DequantizeLinear: `dequantize_values`, or fake
    quantization when it reads a weight lowered to a float parameter. A learned scale (LSQ)
    gets its gradient scaled in training."""
    quantize = node.op_type == "QuantizeLinear"
    r = qrange(q_dtype(node))
    if r is None:
        what = "quantization to" if quantize else "dequantization of"
        raise _unsupported(node, f"{what} {q_dtype(node).name}")
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


def to_torch(array: np.ndarray) -> Tensor:
    """A numpy array as a torch tensor (int4/uint4 widened to int8/uint8, uint16 to int32)."""
    array = np.asarray(array)
    name = array.dtype.name
    if name == "int4":
        array = array.astype(np.int8)
    elif name == "uint4":
        array = array.astype(np.uint8)
    elif array.dtype == np.uint16:
        array = array.astype(np.int32)
    elif array.dtype == np.uint32:
        array = array.astype(np.int64)
    return torch.from_numpy(np.array(array, copy=True))
