"""Element-wise, activation and linear-algebra kernels of the op table.

ONNX's ops and the `com.microsoft` activations onnxruntime's transformer fusions write (Gelu,
BiasGelu, FastGelu, QuickGelu).

Semantics follow the ONNX operator specification and, for the contrib ops, onnxruntime's CPU
kernels (docs/ContribOperators.md of onnxruntime).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import onnx_ir as ir
import torch
from torch.nn import functional as F

import slimgraph.runtime.torch_backend._ops._registry as registry
from slimgraph.runtime.torch_backend._ops._registry import (
    MS_DOMAIN,
    TORCH_DTYPES,
    Kernel,
    LowerContext,
    Tensor,
    attr,
    op,
)

__all__: list[str] = []

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
        raise registry.unsupported(node, "legacy broadcast with an axis")
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


@op("Swish")
def _swish(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    alpha = attr(node, "alpha", 1.0)
    return lambda m, xs: [xs[0] * torch.sigmoid(alpha * xs[0])]


@op("Shrink")
def _shrink(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    bias, lambd = attr(node, "bias", 0.0), attr(node, "lambd", 0.5)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        zero = torch.zeros((), dtype=x.dtype)
        return [torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero))]

    return run


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
        raise registry.unsupported(node, f"a cast to {ir.DataType(attr(node, 'to')).name}")
    return lambda m, xs: [xs[0].to(to)]


@op("CastLike")
def _cast_like(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [xs[0].to(xs[1].dtype)]


@op("BitwiseXor")
def _bitwise_xor(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [torch.bitwise_xor(xs[0], xs[1])]


@op("BitwiseNot")
def _bitwise_not(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [torch.bitwise_not(xs[0])]


@op("BitShift")
def _bit_shift(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    left = attr(node, "direction") == "LEFT"
    return lambda m, xs: [xs[0] << xs[1] if left else xs[0] >> xs[1]]


# --- com.microsoft activations -----------------------------------------------------------------


@op("Gelu", domain=MS_DOMAIN)
def _ms_gelu(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """x * Phi(x) (the erf form)."""
    return lambda m, xs: [F.gelu(xs[0])]


@op("BiasGelu", domain=MS_DOMAIN)
def _bias_gelu(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """Gelu (erf form) of A + B, B a bias broadcast over A's last axis."""
    return lambda m, xs: [F.gelu(xs[0] + xs[1])]


@op("FastGelu", domain=MS_DOMAIN)
def _fast_gelu(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """The tanh approximation 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) of X (+ bias)."""

    def run(m: Any, xs: list[Any]) -> list[Any]:
        bias = registry.optional(xs, 1)
        x = xs[0] if bias is None else xs[0] + bias
        return [F.gelu(x, approximate="tanh")]

    return run


@op("QuickGelu", domain=MS_DOMAIN)
def _quick_gelu(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """x * sigmoid(alpha x), alpha 1.702 by default."""
    alpha = attr(node, "alpha", 1.702)
    return lambda m, xs: [xs[0] * torch.sigmoid(alpha * xs[0])]


# --- linear algebra ----------------------------------------------------------------------------


@op("Einsum")
def _einsum(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    equation = attr(node, "equation").replace(" ", "")
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
