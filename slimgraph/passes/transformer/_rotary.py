"""Rotary position embeddings as exporters write them, found by dataflow.

`match_rotary(value)` recognizes `x * cos + rotate(x) * sin` with rotate-half
(`concat(-x[..., h/2:], x[..., :h/2])`, Llama, Mistral, Qwen2, GPT-NeoX, Phi), optionally on the
first `dim` features only (`concat(rotary(x[..., :dim]), x[..., dim:])`, GPT-NeoX and Phi's
partial rotary). It checks that the cos/sin tables repeat their first half in their second
(`cos(concat(f, f))`), which is what lets onnxruntime's RotaryEmbedding, whose caches hold one
half, compute the same values.

Source: Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding".
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes.transformer._layout import Layout
from slimgraph.passes.transformer._symbolic import ShapeInfo, scalar

__all__ = ["Rotary", "match_rotary"]


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
    """

    cos: ir.Value
    sin: ir.Value
    dim: int
    interleaved: bool
    nodes: list[ir.Node]
    cos_layout: Layout | None = None  # cos relative to the rotated tensor's layout


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
    if high is None or low is None or high[0] is not low[0] or high[3] != 1 or low[3] != 1:
        return None
    dims = shapes.shape(high[0])
    assert dims is not None
    width = dims[-1].coef
    half = low[2]
    if low[1] != 0 or high[1] != half or high[2] != width or 2 * half != width:
        return None
    return high[0], width


def _duplicated_halves(value: ir.Value, shapes: ShapeInfo, depth: int = 0) -> bool:
    """Whether the last axis of `value` is `concat(f, f)` through elementwise ops."""
    node = value.producer()
    if node is None or depth > 12:
        return False
    if is_onnx_op(node, "Concat") and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]:
        rank = shapes.rank(value)
        return rank is not None and node.attributes.get_int("axis", 0) % rank == rank - 1
    if is_onnx_op(node, "Cos", "Sin", "Cast", "Identity", "Unsqueeze", "Neg"):
        return node.inputs[0] is not None and _duplicated_halves(node.inputs[0], shapes,
                                                                 depth + 1)
    if is_onnx_op(node, "Mul", "Div") and scalar(node.inputs[1]) is not None:
        return node.inputs[0] is not None and _duplicated_halves(node.inputs[0], shapes,
                                                                 depth + 1)
    if is_onnx_op(node, "Mul") and scalar(node.inputs[0]) is not None:
        return node.inputs[1] is not None and _duplicated_halves(node.inputs[1], shapes,
                                                                 depth + 1)
    return False


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
        if head is None or head[0] is not kept[0] or head[1] != 0 or head[3] != 1:
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
                found = _rotate_half(rot, shapes)
                if found is None or found[0] is not x:
                    continue
                if not (_duplicated_halves(cos, shapes) and _duplicated_halves(sin, shapes)):
                    return None
                nodes = [node, *products, rot.producer()]
                rot_node = rot.producer()
                assert rot_node is not None
                nodes += [n.producer() for n in rot_node.inputs if n is not None]
                neg = _negated(rot_node.inputs[0])
                if neg is not None and neg.producer() is not None:
                    nodes.append(neg.producer())
                rotary = Rotary(cos, sin, found[1], False, [n for n in nodes if n is not None])
                return x, rotary
    return None


