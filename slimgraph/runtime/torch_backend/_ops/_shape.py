"""Shape and sequence kernels of the op table.

Shape, Reshape, Squeeze, Slice, Split, Pad, Concat, ... and the sequence ops exporters write for
`torch.split` (SplitToSequence, SequenceAt, ...), whose values are Python lists of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch.nn import functional as F

from slimgraph.runtime.torch_backend._ops._registry import (
    TORCH_DTYPES,
    Kernel,
    LowerContext,
    Tensor,
    attr,
    int_list,
    ints,
    op,
    optional,
    to_torch,
    unsupported,
)

__all__ = ["axes_source", "SEQUENCE_PRODUCERS"]

# Ops whose output is a sequence (a list of tensors): never evaluated at lowering time.
SEQUENCE_PRODUCERS = frozenset({
    "SplitToSequence", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase",
})



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
        raise unsupported(node, f"attribute {name}")
    tensor = to_torch(array)
    return lambda m, xs: [tensor]


@op("ConstantOfShape")
def _constant_of_shape(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    value = attr(node, "value")
    fill = to_torch(np.zeros((), np.float32) if value is None else np.asarray(value).reshape(()))

    def run(m: Any, xs: list[Any]) -> list[Any]:
        return [fill.expand(int_list(xs[0])).clone()]

    return run


@op("EyeLike")
def _eye_like(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    k, dtype = attr(node, "k", 0), attr(node, "dtype")
    to = TORCH_DTYPES.get(ir.DataType(dtype)) if dtype is not None else None

    def run(m: Any, xs: list[Any]) -> list[Any]:
        rows, cols = xs[0].shape
        eye = torch.ones(rows, cols).triu(k).tril(k)
        return [eye.to(to if to is not None else xs[0].dtype)]

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
        shape = list(fixed) if fixed is not None else int_list(xs[1])
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


def axes_source(node: ir.Node, opset: int, since: int, index: int) -> Callable[[list], Any]:
    """Axes as an attribute before opset `since`, as input `index` from then on."""
    if opset < since:
        axes = attr(node, "axes")
        return lambda xs: axes
    return lambda xs: ints(xs[index]) if len(xs) > index and xs[index] is not None else None


@op("Squeeze")
def _squeeze(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axes_of = axes_source(node, opset, 13, 1)

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
    axes_of = axes_source(node, opset, 13, 1)

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
            sizes = ints(xs[1])
        if sizes is None:
            dim = x.shape[axis]
            chunk = -(-dim // count)
            sizes = [min(chunk, dim - i * chunk) for i in range(count)]
        return list(torch.split(x, list(sizes), axis))

    return run


def _onnx_slice(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    """ONNX Slice on one axis: negative bounds count from the end, then clamp to [0, dim]
    ([-1, dim - 1] for a negative step)."""
    dim = x.shape[axis]
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        index = [slice(None)] * x.dim()
        index[axis] = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
        return x[tuple(index)]
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
            get = lambda i: ints(xs[i]) if len(xs) > i and xs[i] is not None else None  # noqa: E731
            return int_list(xs[1]), int_list(xs[2]), get(3), get(4)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        starts_, ends_, axes_, steps_ = params(xs)
        axes_ = axes_ if axes_ is not None else list(range(len(starts_)))
        steps_ = steps_ if steps_ is not None else [1] * len(starts_)
        for s, e, a, st in zip(starts_, ends_, axes_, steps_, strict=True):
            x = _onnx_slice(x, a % x.dim(), s, e, st)
        return [x]

    return run


@op("Expand")
def _expand(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, shape = xs[0], int_list(xs[1])
        return [x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape)))]

    return run


@op("Tile")
def _tile(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [xs[0].repeat(int_list(xs[1]))]


@op("Pad")
def _pad(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    mode = attr(node, "mode", "constant")
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    if mode not in modes:
        raise unsupported(node, f"mode '{mode}'")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x = xs[0]
        axes = None
        if opset < 11:
            pads, value = attr(node, "pads", attr(node, "paddings")), attr(node, "value", 0.0)
        else:
            pads = int_list(xs[1])
            value = xs[2].item() if len(xs) > 2 and xs[2] is not None and xs[2].numel() else 0
            axes = ints(xs[3]) if len(xs) > 3 and xs[3] is not None else None
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
            raise unsupported(node, f"mode '{mode}' on a leading axis")
        return [F.pad(x, torch_pads, mode=modes[mode])]

    return run


# --- sequences ---------------------------------------------------------------------------------


@op("SplitToSequence")
def _split_to_sequence(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """Pieces of sizes `split` (a list, or one size with a shorter last piece), or of size 1
    with the axis removed unless `keepdims` when `split` is not given."""
    axis, keepdims = attr(node, "axis", 0), attr(node, "keepdims", 1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, split = xs[0], optional(xs, 1)
        if split is None:
            pieces = list(torch.split(x, 1, axis))
            return [pieces if keepdims else [p.squeeze(axis) for p in pieces]]
        sizes = int_list(split)
        if split.dim() == 0:
            return [list(torch.split(x, sizes[0], axis))]
        return [list(torch.split(x, sizes, axis))]

    return run


@op("SequenceAt")
def _sequence_at(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [xs[0][int(xs[1].item())]]


@op("SequenceConstruct")
def _sequence_construct(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [list(xs)]


@op("SequenceEmpty")
def _sequence_empty(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [[]]


@op("SequenceLength")
def _sequence_length(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    return lambda m, xs: [torch.tensor(len(xs[0]), dtype=torch.int64)]


@op("SequenceInsert")
def _sequence_insert(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    def run(m: Any, xs: list[Any]) -> list[Any]:
        seq, position = list(xs[0]), optional(xs, 2)
        index = len(seq) if position is None else int(position.item()) % (len(seq) + 1)
        seq.insert(index, xs[1])
        return [seq]

    return run


@op("SequenceErase")
def _sequence_erase(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    def run(m: Any, xs: list[Any]) -> list[Any]:
        seq, position = list(xs[0]), optional(xs, 1)
        del seq[-1 if position is None else int(position.item())]
        return [seq]

    return run


@op("ConcatFromSequence")
def _concat_from_sequence(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    axis, new_axis = attr(node, "axis"), attr(node, "new_axis", 0)
    return lambda m, xs: [torch.stack(xs[0], axis) if new_axis else torch.cat(xs[0], axis)]
