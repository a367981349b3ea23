"""Key/value caches in attention: `Concat(past, new)` on the keys and values, found by dataflow.

A decode-step graph (one generation step of a causal LM) attends over the keys and values of
every token so far: each layer concatenates its past keys (a graph input [B, KVH, P, H]) with the
new tokens' keys along the sequence, returns the result as its present keys (a graph output),
and attends over it; the values the same way. The attention matcher follows k and v back through
that Concat to the new tokens' projection (`past_concat` recognizes it, `grow` widens the
layout's sequence to past + new), so a cached block is matched like any other, with a `KVCache`
on its k and v operands saying where the past comes in and the present goes out.

Nothing here changes the graph.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes.transformer._layout import Atom, Layout, LayoutError
from slimgraph.passes.transformer._symbolic import ONE, Dim, ShapeInfo, sum_dim

__all__ = ["KVCache", "past_concat", "past_input", "grow", "check_cache_layout"]

_MAX_CHAIN = 8


@dataclasses.dataclass
class KVCache:
    """The cache of one operand (keys or values) of an attention block.

    Attributes:
        past: the graph input holding the past [B, KVH, P, H].
        present: the Concat's output, past and new (often a graph output).
        concat: the Concat node; `axis` its axis (the sequence of [B, KVH, T, H]).
        past_length: P, the past's size on that axis; `total` T = P + new.
        layout: the present's layout relative to the operand's source (with its sequence
            widened to T); `source_axis` the source axis that grew (the sequence).
    """

    past: ir.Value
    present: ir.Value
    concat: ir.Node
    axis: int
    past_length: Dim
    total: Dim
    layout: Layout
    source_axis: int


def past_input(value: ir.Value | None) -> ir.Value | None:
    """The graph input `value` is (through Identity and same-type Casts), else None."""
    for _ in range(_MAX_CHAIN):
        if value is None:
            return None
        if value.is_graph_input():
            return value
        node = value.producer()
        if node is None or not is_onnx_op(node, "Identity", "Cast") or (
                node.op_type == "Cast" and node.inputs[0] is not None
                and node.inputs[0].dtype != value.dtype):
            return None
        value = node.inputs[0]
    return None


def past_concat(node: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """(past, new) when `node` is `Concat(past, new)` with `past` a graph input (through
    Identity: then the graph input is returned): a cache update. The caller checks that the
    axis is the sequence."""
    if not is_onnx_op(node, "Concat") or len(node.inputs) != 2:
        return None
    past, new = past_input(node.inputs[0]), node.inputs[1]
    if past is None or new is None or past_input(new) is not None:
        return None
    return past, new


def grow(layout: Layout, concat: ir.Node, shapes: ShapeInfo) -> tuple[Layout, int, Dim, Dim]:
    """The layout of the Concat's output given the layout of its new part: the concatenated
    axis must be one whole run of one source axis (the sequence), which grows to past + new.

    Returns:
        (layout, source axis that grew, past length P, total length T).

    Raises:
        LayoutError: the Concat does not run along one whole source axis.
    """
    rank = layout.rank
    axis = concat.attributes.get_int("axis", 0) % rank
    atoms = layout.axes[axis]
    past, new, out = (shapes.shape(v) for v in (*concat.inputs, concat.outputs[0]))
    if past is None or new is None or out is None or len(atoms) != 1:
        raise LayoutError("a cache Concat whose axis is not one source axis")
    atom = atoms[0]
    if atom.axis is None or atom.stride != ONE or layout.offsets[atom.axis] or (
            atom.size != new[axis]):
        raise LayoutError("a cache Concat along part of a source axis")
    total = out[axis]
    if total.syms and total.syms[0].startswith("?"):  # no recorded name: one of our own
        total = sum_dim(past[axis], new[axis])
    axes = list(layout.axes)
    axes[axis] = (Atom(atom.axis, total, ONE),)
    return layout.with_axes(axes), atom.axis, past[axis], total


def check_cache_layout(cache: KVCache, feature_axis: int, head_size: int, heads: int,
                       seq_axis: int, head_stride: int) -> None:
    """Raise LayoutError unless the present is [B, heads, T, head_size] of the source (heads
    `head_stride` features apart): what the fused ops' past and present buffers hold (BNSH)."""
    axes = cache.layout.axes
    if len(axes) != 4:
        raise LayoutError("the cache is not of rank 4")
    head = [a for a in axes[1] if a.size != ONE]
    size = [a for a in axes[3] if a.size != ONE]
    seq = [a for a in axes[2] if a.size != ONE]
    if cache.axis % 4 != 2 or [a.axis for a in seq] != [seq_axis]:
        raise LayoutError("the cache is not concatenated along its third axis")
    if heads > 1 and (len(head) != 1 or head[0].axis != feature_axis
                      or head[0].stride != Dim(head_stride) or head[0].size != Dim(heads)):
        raise LayoutError("the cache's second axis is not the heads")
    if heads == 1 and head:
        raise LayoutError("the cache's second axis is not the heads")
    if len(size) != 1 or size[0].axis != feature_axis or size[0].stride != ONE or (
            size[0].size != Dim(head_size)):
        raise LayoutError("the cache's last axis is not the head size")
    if any(a.axis in (None, feature_axis, seq_axis) for a in axes[0] if a.size != ONE):
        raise LayoutError("the cache's first axis is not the batch")
