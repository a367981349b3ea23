"""Indexing kernels of the op table: gathers, scatters, selections and rearrangements.

Gather, GatherElements, GatherND, ScatterND, ScatterElements, NonZero, OneHot, TopK,
ArgMax/ArgMin, CumSum, Trilu, DepthToSpace/SpaceToDepth.

Indices follow the ONNX rule: negative values count from the end of their axis.
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir
import torch
from torch.nn import functional as F

from slimgraph.runtime.torch_backend._ops._registry import (
    Kernel,
    LowerContext,
    Tensor,
    attr,
    op,
    unsupported,
)

__all__ = ["nonnegative"]

def nonnegative(indices: Tensor, size: int) -> Tensor:
    """Gather-style int64 indices with the negative ones counted from the end of the axis."""
    indices = indices.to(torch.int64)
    return torch.where(indices < 0, indices + size, indices)


@op("Gather")
def _gather(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axis = attr(node, "axis", 0)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, idx = xs
        a = axis % x.dim()
        idx = nonnegative(idx, x.shape[a])
        out = x.index_select(a, idx.reshape(-1))
        return [out.reshape(*x.shape[:a], *idx.shape, *x.shape[a + 1:])]

    return run


@op("GatherElements")
def _gather_elements(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axis = attr(node, "axis", 0)
    return lambda m, xs: [torch.gather(xs[0], axis, nonnegative(xs[1], xs[0].shape[axis]))]


@op("CumSum")
def _cumsum(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    exclusive, reverse = attr(node, "exclusive", 0), attr(node, "reverse", 0)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, axis = xs[0], int(xs[1].item())
        if reverse:
            x = x.flip(axis)
        y = torch.cumsum(x, axis, dtype=x.dtype)
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


def _flat_positions(indices: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Row-major positions in a tensor of leading shape `shape` of the index tuples in the last
    axis of `indices` ([..., k], k = len(shape)), negative indices counted from the end."""
    position = torch.zeros(indices.shape[:-1], dtype=torch.int64)
    for j, size in enumerate(shape):
        position = position * size + nonnegative(indices[..., j], size)
    return position


@op("GatherND")
def _gather_nd(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """out[b..., i...] = data[b..., indices[b..., i..., :]] with `batch_dims` leading axes
    shared; output shape indices.shape[:-1] + data.shape[batch_dims + k:]."""
    batch_dims = attr(node, "batch_dims", 0)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        data, indices = xs[0], xs[1].to(torch.int64)
        k = indices.shape[-1]
        batch = math.prod(data.shape[:batch_dims])
        rest = data.shape[batch_dims + k:]
        rows = data.reshape(batch, math.prod(data.shape[batch_dims:batch_dims + k]), *rest)
        picks = _flat_positions(indices, tuple(data.shape[batch_dims:batch_dims + k]))
        picks = picks.reshape(batch, -1)
        out = rows[torch.arange(batch).unsqueeze(1), picks]
        return [out.reshape(*indices.shape[:-1], *rest)]

    return run


_REDUCTIONS = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@op("ScatterND")
def _scatter_nd(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """A copy of data with the slices at `indices` replaced by (or reduced with) `updates`."""
    reduction = attr(node, "reduction", "none")
    if reduction != "none" and reduction not in _REDUCTIONS:
        raise unsupported(node, f"reduction '{reduction}'")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        data, indices, updates = xs[0], xs[1].to(torch.int64), xs[2]
        k = indices.shape[-1]
        rest = data.shape[k:]
        flat = data.reshape(math.prod(data.shape[:k]), *rest)
        where = _flat_positions(indices, tuple(data.shape[:k])).reshape(-1)
        values = updates.reshape(-1, *rest).to(data.dtype)
        if reduction == "none":
            out = flat.index_put((where,), values)
        else:
            spread = where.reshape(-1, *([1] * len(rest))).expand(values.shape)
            out = flat.scatter_reduce(0, spread, values, _REDUCTIONS[reduction])
        return [out.reshape(data.shape)]

    return run


@op("ScatterElements", "Scatter")
def _scatter_elements(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axis, reduction = attr(node, "axis", 0), attr(node, "reduction", "none")
    if reduction != "none" and reduction not in _REDUCTIONS:
        raise unsupported(node, f"reduction '{reduction}'")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        data, updates = xs[0], xs[2].to(xs[0].dtype)
        a = axis % data.dim()
        indices = nonnegative(xs[1], data.shape[a])
        if reduction == "none":
            return [data.scatter(a, indices, updates)]
        return [data.scatter_reduce(a, indices, updates, _REDUCTIONS[reduction])]

    return run


@op("NonZero")
def _nonzero(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """int64 [rank, count]: the indices of the non-zero elements in row-major order."""
    return lambda m, xs: [torch.nonzero(xs[0].reshape(xs[0].shape or (1,))).T.contiguous()]


@op("OneHot")
def _one_hot(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """values[1] where the index (negative ones counted from `depth`) is, values[0] elsewhere
    and everywhere for an index out of range; the new axis at `axis`."""
    axis = attr(node, "axis", -1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        indices, values = xs[0].to(torch.int64), xs[2]
        depth = int(xs[1].reshape(-1)[0].item())
        indices = torch.where(indices < 0, indices + depth, indices)
        valid = (indices >= 0) & (indices < depth)
        hot = F.one_hot(indices.clamp(0, depth - 1), depth).bool() & valid.unsqueeze(-1)
        hot = hot.movedim(-1, axis % (indices.dim() + 1))
        return [torch.where(hot, values[1], values[0])]

    return run
