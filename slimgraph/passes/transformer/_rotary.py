"""Rotary position embeddings as exporters write them, found by dataflow.

`match_rotary(value)` recognizes `x * cos + rotate(x) * sin` with rotate-half
(`concat(-x[..., h/2:], x[..., :h/2])`: Llama, Mistral, Qwen2, GPT-NeoX, Phi) or interleaved
pairs (`stack(-x[..., 1::2], x[..., ::2], -1).flatten(-2)`: GPT-J), optionally on the first
`dim` features only (`concat(rotary(x[..., :dim]), x[..., dim:])`: GPT-NeoX, Phi, GPT-J). It
checks that the cos/sin tables hold each value twice where the rotation reads it
(`cos(concat(f, f))`, or `repeat_interleave(f, 2)` for interleaved pairs), which is what lets
onnxruntime's RotaryEmbedding, whose caches hold one value per pair, compute the same values.

Source: Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding".
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes._kit import constant_array
from slimgraph.passes.transformer._layout import Layout
from slimgraph.passes.transformer._symbolic import ShapeInfo, scalar

__all__ = ["Rotary", "match_rotary", "same_value"]


@dataclasses.dataclass
class Rotary:
    """A rotary embedding applied to an operand: `x * cos + rotate(x) * sin` on the first
    `dim` features of every head (rotate-half: `rotate(x) = concat(-x2, x1)`).

    Attributes:
        cos, sin: the graph's [.., S, dim] tables (broadcast over batch and heads), whose two
            halves of the last axis are equal (checked: both come from one `concat(f, f)`).
        dim: rotated features per head; interleaved: pairs (2i, 2i+1) rotate (GPT-J style)
            instead of (i, i + dim/2).
        nodes: the nodes computing the rotation.
        batched: the tables vary with the batch (positions per row, as a decode step with
            padded rows has them); set by the fusion's check.
    """

    cos: ir.Value
    sin: ir.Value
    dim: int
    interleaved: bool
    nodes: list[ir.Node]
    cos_layout: Layout | None = None  # cos relative to the rotated tensor's layout
    batched: bool = False


def _slice_last(value: ir.Value | None, shapes: ShapeInfo) -> tuple[ir.Value, int, int, int] | None:
    """`Slice(x, start, end, axis=last[, step])` -> (x, start, end, step), static bounds."""
    node = value.producer() if value is not None else None
    if node is None or not is_onnx_op(node, "Slice"):
        return None
    parts = [shapes.array(v) if v is not None else None for v in node.inputs[1:5]]
    parts += [None] * (4 - len(parts))
    x = node.inputs[0]
    rank = shapes.rank(x)
    if x is None or rank is None or parts[0] is None or parts[1] is None or parts[0].size != 1:
        return None
    axis = int(parts[2].reshape(-1)[0]) if parts[2] is not None else 0
    if axis % rank != rank - 1:
        return None
    dims = shapes.shape(x)
    assert dims is not None
    start, end = int(parts[0].reshape(-1)[0]), int(parts[1].reshape(-1)[0])
    stride = int(parts[3].reshape(-1)[0]) if parts[3] is not None else 1
    if not dims[-1].static:
        return None
    start, end, stride = slice(start, end, stride).indices(dims[-1].coef)
    return x, start, end, stride


def _negated(value: ir.Value | None) -> ir.Value | None:
    node = value.producer() if value is not None else None
    if node is None:
        return None
    if is_onnx_op(node, "Neg"):
        return node.inputs[0]
    if is_onnx_op(node, "Mul"):
        for i in (0, 1):
            if scalar(node.inputs[i]) == -1.0:
                return node.inputs[1 - i]
    return None


def _rotate_half(value: ir.Value, shapes: ShapeInfo) -> tuple[ir.Value, int] | None:
    """`Concat(-x[..., h/2:], x[..., :h/2], axis=-1)` -> (x, h)."""
    node = value.producer()
    if node is None or not is_onnx_op(node, "Concat") or len(node.inputs) != 2:
        return None
    rank = shapes.rank(value)
    if rank is None or node.attributes.get_int("axis", 0) % rank != rank - 1:
        return None
    high = _slice_last(_negated(node.inputs[0]), shapes)
    low = _slice_last(node.inputs[1], shapes)
    if high is None or low is None or not same_value(high[0], low[0], shapes) or (
            high[3] != 1 or low[3] != 1):
        return None
    dims = shapes.shape(high[0])
    assert dims is not None
    width = dims[-1].coef
    half = low[2]
    if low[1] != 0 or high[1] != half or high[2] != width or 2 * half != width:
        return None
    return high[0], width


def same_value(a: ir.Value | None, b: ir.Value | None, shapes: ShapeInfo, depth: int = 0) -> bool:
    """`a` is `b`, or both are the same Slice of the same value (exporters repeat
    `x[..., :d]` for each use)."""
    if a is None or b is None:
        return False
    a, b = _through_full_slices(a, shapes), _through_full_slices(b, shapes)
    if a is b:
        return True
    na, nb = a.producer(), b.producer()
    if na is None or nb is None or depth > 4 or na.op_type != nb.op_type or (
            na.op_type != "Slice" or len(na.inputs) != len(nb.inputs)):
        return False
    if not same_value(na.inputs[0], nb.inputs[0], shapes, depth + 1):
        return False
    for x, y in zip(na.inputs[1:], nb.inputs[1:], strict=True):
        ax, ay = shapes.array(x), shapes.array(y)
        if ax is None or ay is None or ax.tolist() != ay.tolist():
            return False
    return True


def _through_full_slices(value: ir.Value, shapes: ShapeInfo) -> ir.Value:
    """`value` without the Slices that keep every element (`x[:, :]` exports as those)."""
    while (node := value.producer()) is not None and is_onnx_op(node, "Slice") and (
            node.inputs[0] is not None):
        parts = [shapes.array(v) if v is not None else None for v in node.inputs[1:5]]
        parts += [None] * (4 - len(parts))
        starts, ends, _, steps = parts
        if starts is None or ends is None or np.any(starts != 0) or np.any(ends < 2**62) or (
                steps is not None and np.any(steps != 1)):
            break
        value = node.inputs[0]
    return value


def _rotate_every_two(value: ir.Value, shapes: ShapeInfo) -> tuple[ir.Value, int] | None:
    """`stack(-x[..., 1::2], x[..., ::2], -1).flatten(-2)` (GPT-J's rotate_every_two):
    `Reshape(Concat(Unsqueeze(-odd, -1), Unsqueeze(even, -1), axis=-1))` -> (x, h)."""
    node = value.producer()
    if node is None or not is_onnx_op(node, "Reshape", "Flatten") or node.inputs[0] is None:
        return None
    stack = node.inputs[0].producer()
    if stack is None or not is_onnx_op(stack, "Concat") or len(stack.inputs) != 2:
        return None
    rank = shapes.rank(node.inputs[0])
    if rank is None or stack.attributes.get_int("axis", 0) % rank != rank - 1:
        return None
    parts = []
    for item in stack.inputs:
        unsqueeze = item.producer() if item is not None else None
        if unsqueeze is None or not is_onnx_op(unsqueeze, "Unsqueeze"):
            return None
        parts.append(unsqueeze.inputs[0])
    odd, even = _slice_last(_negated(parts[0]), shapes), _slice_last(parts[1], shapes)
    if odd is None or even is None or not same_value(odd[0], even[0], shapes):
        return None
    width = _last_dim(odd[0], shapes)
    if width is None or (odd[1], odd[3], even[1], even[3]) != (1, 2, 0, 2):
        return None
    merged, source = shapes.shape(value), shapes.shape(odd[0])
    if merged is None or source is None or merged != source:
        return None
    return odd[0], width


def _table_pairs(value: ir.Value, shapes: ShapeInfo, interleaved: bool, depth: int = 0) -> bool:
    """Whether the last axis of `value` repeats each entry it needs for a one-half cache:
    `concat(f, f)` (rotate-half) or `repeat_interleave(f, 2)` (interleaved), through
    elementwise ops. A constant table (a fixed-size export folds the tables) is checked by value.
    """
    table = constant_array(value)
    if table is not None:
        return _constant_pairs(table, interleaved)
    node = value.producer()
    if node is None or depth > 12:
        return False
    rank = shapes.rank(value)
    if not interleaved and is_onnx_op(node, "Concat") and len(node.inputs) == 2 and (
            node.inputs[0] is node.inputs[1]):
        return rank is not None and node.attributes.get_int("axis", 0) % rank == rank - 1
    if interleaved and is_onnx_op(node, "Reshape") and node.inputs[0] is not None:
        expand = node.inputs[0].producer()  # Reshape(Expand(Unsqueeze(f, -1), [.., 2]))
        if expand is not None and is_onnx_op(expand, "Expand") and expand.inputs[0] is not None:
            inner = expand.inputs[0].producer()
            target = shapes.ints(expand.inputs[1])
            unsqueezed = shapes.shape(expand.inputs[0])
            if inner is not None and is_onnx_op(inner, "Unsqueeze") and target and (
                    target[-1].static and target[-1].coef == 2 and unsqueezed is not None
                    and unsqueezed[-1].static and unsqueezed[-1].coef == 1):
                merged, base = shapes.shape(value), shapes.shape(inner.inputs[0])
                return (merged is not None and base is not None and base[-1].static
                        and merged[-1] == base[-1] * 2 and merged[:-1] == base[:-1])
    data = None
    if is_onnx_op(node, "Cos", "Sin", "Cast", "Identity", "Unsqueeze", "Neg", "Expand"):
        data = node.inputs[0]
    elif is_onnx_op(node, "Mul", "Div") and scalar(node.inputs[1]) is not None:
        data = node.inputs[0]
    elif is_onnx_op(node, "Mul") and scalar(node.inputs[0]) is not None:
        data = node.inputs[1]
    return data is not None and _table_pairs(data, shapes, interleaved, depth + 1)


def _constant_pairs(table: np.ndarray, interleaved: bool) -> bool:
    """A constant table whose last axis holds each value twice where the rotation reads it:
    equal halves (rotate-half) or equal pairs (interleaved), bit for bit."""
    if table.ndim == 0 or table.dtype.kind != "f" or table.shape[-1] % 2:
        return False
    if interleaved:
        first, second = table[..., 0::2], table[..., 1::2]
    else:
        half = table.shape[-1] // 2
        first, second = table[..., :half], table[..., half:]
    return bool(np.array_equal(first, second))


def match_rotary(value: ir.Value, shapes: ShapeInfo) -> tuple[ir.Value, Rotary] | None:
    """`value = rotary(x)` (full or on the first features) -> (x, Rotary), else None."""
    node = value.producer()
    if node is None:
        return None
    if is_onnx_op(node, "Concat") and len(node.inputs) == 2:  # partial: concat(rot, pass)
        rank = shapes.rank(value)
        rotated, passed = node.inputs
        if rank is None or rotated is None or passed is None or (
                node.attributes.get_int("axis", 0) % rank != rank - 1):
            return None
        inner = _rotary_core(rotated, shapes)
        kept = _slice_last(passed, shapes)
        if inner is None or kept is None:
            return None
        part, rotary = inner
        head = _slice_last(part, shapes)
        if head is None or not same_value(head[0], kept[0], shapes) or head[1] != 0 or (
                head[3] != 1):
            return None
        if kept[1] != head[2] or kept[3] != 1 or kept[2] != _last_dim(kept[0], shapes):
            return None
        rotary.nodes += [n for n in (node, part.producer(), passed.producer()) if n is not None]
        return kept[0], rotary
    return _rotary_core(value, shapes)


def _last_dim(value: ir.Value, shapes: ShapeInfo) -> int | None:
    dims = shapes.shape(value)
    return dims[-1].coef if dims and dims[-1].static else None


def _rotary_core(value: ir.Value, shapes: ShapeInfo) -> tuple[ir.Value, Rotary] | None:
    node = value.producer()
    if node is None or not is_onnx_op(node, "Add"):
        return None
    products = [v.producer() if v is not None else None for v in node.inputs]
    if any(p is None or not is_onnx_op(p, "Mul") for p in products):
        return None
    terms = []
    for mul in products:
        assert mul is not None
        a, b = mul.inputs
        terms.append(((a, b), (b, a)))
    for first, second in ((0, 1), (1, 0)):
        for x, cos in terms[first]:
            for rot, sin in terms[second]:
                if x is None or rot is None or cos is None or sin is None:
                    continue
                interleaved = False
                found = _rotate_half(rot, shapes)
                if found is None:
                    found, interleaved = _rotate_every_two(rot, shapes), True
                if found is None or not same_value(found[0], x, shapes):
                    continue
                if not (_table_pairs(cos, shapes, interleaved)
                        and _table_pairs(sin, shapes, interleaved)):
                    return None
                nodes = [node, *(p for p in products if p is not None)]
                rotary = Rotary(cos, sin, found[1], interleaved, nodes)
                return x, rotary
    return None


