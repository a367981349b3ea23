"""Reduction, Softmax and normalization kernels of the op table, fused forms included.

The normalizations are BatchNormalization, LayerNormalization, GroupNormalization,
RMSNormalization, ... and onnxruntime's fused forms of them (`com.microsoft`
SkipLayerNormalization and SkipSimplifiedLayerNormalization, and SimplifiedLayerNormalization,
which onnxruntime registers in the ONNX domain).

RMS normalization: y = x / sqrt(mean(x^2) + epsilon) * scale over the axes from `axis` on
(Zhang and Sennrich, 2019). The "Skip" forms first add the residual and an optional bias and also
return that sum (onnxruntime's contrib op specs).
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
    Builder,
    Kernel,
    LowerContext,
    attr,
    op,
)
from slimgraph.runtime.torch_backend._ops._shape import axes_source

__all__: list[str] = []

# --- reductions --------------------------------------------------------------------------------

_REDUCE_SINCE = {"ReduceSum": 13}  # the others take axes as an input from opset 18


_REDUCERS: dict[str, Callable[[torch.Tensor, list[int], bool], torch.Tensor]] = {
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


def _prod(x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


@op(*_REDUCERS)
def _reduce(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    fn = _REDUCERS[node.op_type]
    keepdims = bool(attr(node, "keepdims", 1))
    noop = attr(node, "noop_with_empty_axes", 0)
    axes_of = axes_source(node, opset, _REDUCE_SINCE.get(node.op_type, 18), 1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, axes = xs[0], axes_of(xs)
        if not axes:
            if noop:
                return [x]
            axes = list(range(x.dim()))
        y = fn(x, [a % max(x.dim(), 1) for a in axes], keepdims)
        return [y if y.dtype == x.dtype else y.to(x.dtype)]  # torch sums integers as int64

    return run


# --- normalization and activation over axes ----------------------------------------------------


def _softmax_family(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Builder:
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


def _hardmax(x: torch.Tensor, axis: int) -> torch.Tensor:
    return F.one_hot(torch.argmax(x, axis), x.shape[axis]).movedim(-1, axis).to(x.dtype)


op("Softmax")(_softmax_family(lambda x, a: torch.softmax(x, a)))
op("LogSoftmax")(_softmax_family(lambda x, a: torch.log_softmax(x, a)))
op("Hardmax")(_softmax_family(_hardmax))


@op("BatchNormalization")
def _batch_norm(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    eps = attr(node, "epsilon", 1e-5)
    momentum = attr(node, "momentum", 0.9)
    if opset < 7 and not attr(node, "spatial", 1):
        raise registry.unsupported(node, "spatial=0")

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


@op("GroupNormalization")
def _group_norm(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """Normalization over groups of channels; scale and bias per channel (opset 21) or, as
    opset 18 defined them, per group."""
    groups, eps = attr(node, "num_groups"), attr(node, "epsilon", 1e-5)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, scale, bias = xs[0], xs[1], xs[2]
        channels = x.shape[1]
        if scale.numel() == groups and groups != channels:
            scale = scale.repeat_interleave(channels // groups)
            bias = bias.repeat_interleave(channels // groups)
        return [F.group_norm(x, groups, scale, bias, eps)]

    return run


def _rms(x: torch.Tensor, axis: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x / sqrt(mean(x^2) + eps) over the axes from `axis`, and the inverse RMS (kept dims)."""
    dims = list(range(axis % x.dim(), x.dim()))
    inv = torch.rsqrt((x * x).mean(dims, keepdim=True) + eps)
    return x * inv, inv


@op("RMSNormalization", "SimplifiedLayerNormalization")
def _rms_norm(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """y = x / sqrt(mean(x^2) + epsilon) * scale (and, for SimplifiedLayerNormalization, the
    inverse RMS as a second output)."""
    axis, eps = attr(node, "axis", -1), attr(node, "epsilon", 1e-5)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        y, inv = _rms(xs[0], axis, eps)
        return [y * xs[1], inv]

    return run


@op("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MS_DOMAIN)
def _skip_norm(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """s = input + skip (+ bias); LayerNorm(s) * gamma + beta (or RMS-normalized s * gamma for
    the simplified form) over the last axis. Outputs: y, mean, inverse std, s."""
    eps = attr(node, "epsilon", 1e-12)
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, skip, gamma = xs[0], xs[1], xs[2]
        beta = None if simplified else registry.optional(xs, 3)
        bias = registry.optional(xs, 3 if simplified else 4)
        s = x + skip if bias is None else x + skip + bias
        if simplified:
            y, inv = _rms(s, -1, eps)
            return [y * gamma, None, inv, s]
        mean = s.mean(-1, keepdim=True)
        inv = torch.rsqrt(((s - mean) ** 2).mean(-1, keepdim=True) + eps)
        y = F.layer_norm(s, s.shape[-1:], gamma, beta, eps)
        return [y, mean, inv, s]

    return run


@op("LpNormalization")
def _lp_norm(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """x / ||x||_p along `axis` (p 1 or 2; a zero norm leaves zeros)."""
    axis, p = attr(node, "axis", -1), attr(node, "p", 2)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        norm = (x.abs().sum(axis, keepdim=True) if p == 1
                else torch.sqrt((x * x).sum(axis, keepdim=True)))
        return [torch.where(norm == 0, torch.zeros((), dtype=x.dtype), x / norm)]

    return run


@op("MeanVarianceNormalization")
def _mean_variance_norm(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """(x - mean) / sqrt(variance + 1e-9) over `axes` (default 0, 2, 3)."""
    axes = attr(node, "axes", [0, 2, 3])

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        mean = x.mean(axes, keepdim=True)
        variance = (x * x).mean(axes, keepdim=True) - mean * mean
        return [(x - mean) / torch.sqrt(variance + 1e-9)]

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
