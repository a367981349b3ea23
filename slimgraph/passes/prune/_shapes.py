"""Shapes at fixed symbolic sizes, and where one entry of a computed shape tensor comes from.

Exporters compute Reshape targets from the symbolic batch and sequence: Hugging Face's GPT-2
writes its Conv1D as `x.view(-1, x.size(-1)) @ W` and `.view(*size_out)`, which the dynamo
exporter spells `Shape -> Gather -> Concat` (or a `sym_size` scalar -> Reshape -> Concat), and the
views' output shapes come out symbolic (`8*s72`) or unknown. How the channels land in such a view
cannot be read from those shapes, and its shape constant cannot be rewritten as a whole.

- `annotate_static_shapes` records every value's shape with the symbolic dimensions fixed (the
  export's example sizes when given, else 1) in `value.meta` (`metadata.STATIC_SHAPE`), from
  `analysis.with_static_shapes`, the one place that folds shape arithmetic; `dims` reads a
  value's own shape where it is fully known, else the recorded one.
- `shape_entry` follows one entry of a shape tensor back through Concat, Unsqueeze, Squeeze,
  Reshape, Cast, Gather and Slice to a constant (which a rewrite can change without fixing the
  other entries), to a dimension read by `Shape`, or names the op that computes it.
- `reshape_channel_map`: where the channels of one axis land in a reshape of static dims.

Example:
    >>> annotate_static_shapes(model)  # doctest: +SKIP
    >>> shape_entry(reshape_node, 1, 2).constant  # doctest: +SKIP
    64
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from slimgraph.ir import metadata
from slimgraph.ir.analysis import static_shape, with_static_shapes

__all__ = [
    "ShapeEntry",
    "annotate_static_shapes",
    "forget_static_shapes",
    "dims",
    "static_dim",
    "shape_entry",
    "reshape_channel_map",
]

# Ops a shape entry passes through unchanged (same elements in the same flat order).
_SAME_ORDER = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Cast"})
# Hops followed before giving up (shape chains are a handful of nodes).
_MAX_HOPS = 32


def _values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    for node in graph:
        yield from node.outputs


def annotate_static_shapes(model: ir.Model, dim_values: Mapping[str, int] | None = None) -> int:
    """Record the shape of every value of the main graph at fixed symbolic sizes.

    Args:
        model: the model (not changed but for `.meta` of its values).
        dim_values: sizes of symbolic dimensions by name; others are 1.

    Returns:
        How many values got a static shape (`value.meta[metadata.STATIC_SHAPE]`, a tuple of ints).
        Values whose shape stays unknown get none; a previous record is dropped first.
    """
    shaped = with_static_shapes(model, dim_values)
    found = {v.name: shape for v in _values(shaped.graph) if (shape := static_shape(v)) is not None}
    count = 0
    for value in _values(model.graph):
        value.meta.pop(metadata.STATIC_SHAPE, None)
        shape = found.get(value.name) if value.name else None
        if shape is not None:
            value.meta[metadata.STATIC_SHAPE] = shape
            count += 1
    return count


def forget_static_shapes(graph: ir.Graph) -> None:
    """Drop the records of `annotate_static_shapes` (stale once the graph changed)."""
    for value in _values(graph):
        value.meta.pop(metadata.STATIC_SHAPE, None)


def dims(value: ir.Value | None) -> list[int | ir.SymbolicDim] | None:
    """The dimensions of `value`: its own shape where every dim is known, else the static shape
    recorded by `annotate_static_shapes` (same rank), else its own partly symbolic shape."""
    if value is None:
        return None
    shape = value.shape
    if shape is not None and all(isinstance(d, int) for d in shape):
        return list(shape)
    recorded = value.meta.get(metadata.STATIC_SHAPE)
    if recorded is not None and (shape is None or len(shape) == len(recorded)):
        return list(recorded)
    return None if shape is None else list(shape)


def static_dim(value: ir.Value | None, axis: int) -> int | None:
    """Dimension `axis` of `value` when it is static: its own, or the recorded one where its own
    is unknown, except a recorded 1 (a symbolic dimension fixed to 1 looks the same)."""
    found = dims(value)
    if value is None or found is None or not 0 <= axis < len(found):
        return None
    own = value.shape[axis] if value.shape is not None and len(value.shape) > axis else None
    dim = found[axis]
    if not isinstance(dim, int) or (dim == 1 and not isinstance(own, int)):
        return None
    return dim


@dataclass(frozen=True)
class ShapeEntry:
    """Where one entry of a shape tensor comes from; exactly one of three answers.

    Attributes:
        constant: the entry is constant `constant`: element `index` (flat) of input `path[-1][1]`
            of node `path[-1][0]`, reached from the shape's reader through `path` ((node, input
            index) hops, the reader first).
        source, axis: the entry is dimension `axis` of tensor `source` (read by a `Shape`).
        reason: what computes the entry instead (arithmetic on dimensions, an input, ...).
    """

    path: tuple[tuple[ir.Node, int], ...] = ()
    index: int = 0
    constant: int | None = None
    source: ir.Value | None = None
    axis: int = 0
    reason: str = ""


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(x) for x in value.const_value.numpy().reshape(-1)]


def _length(value: ir.Value | None) -> int | None:
    """Elements of a 0-D or 1-D value, when known."""
    found = dims(value)
    if found is None or len(found) > 1:
        return None
    return 1 if not found else (found[0] if isinstance(found[0], int) else None)


def shape_entry(node: ir.Node, input_index: int, index: int) -> ShapeEntry:
    """Follow entry `index` of input `input_index` of `node` (a 1-D shape tensor) to its source.

    Returns:
        A `ShapeEntry`: a constant with the path to it, a dimension of a tensor, or the reason
        neither was found. Never raises.
    """
    path = [(node, input_index)]
    value = node.inputs[input_index]
    for _ in range(_MAX_HOPS):
        constant = _ints(value)
        if constant is not None:
            if not 0 <= index < len(constant):
                return ShapeEntry(reason=f"entry {index} is outside a constant of {len(constant)}")
            return ShapeEntry(tuple(path), index, constant=constant[index])
        producer = value.producer() if value is not None else None
        if producer is None or producer.domain not in ("", "ai.onnx"):
            name = value.name if value is not None else "an absent input"
            return ShapeEntry(reason=f"{name} is not computed by a standard op")
        op, where = producer.op_type, f"{producer.op_type} {producer.name}"
        if op == "Concat":
            offset, hop = 0, None
            for i, part in enumerate(producer.inputs):
                length = _length(part)
                if length is None:
                    return ShapeEntry(reason=f"{where} joins a part of unknown length")
                if index < offset + length:
                    hop = i
                    break
                offset += length
            if hop is None:
                return ShapeEntry(reason=f"{where} is shorter than entry {index}")
            path.append((producer, hop))
            value, index = producer.inputs[hop], index - offset
        elif op in _SAME_ORDER:
            path.append((producer, 0))
            value = producer.inputs[0]
        elif op == "Shape":
            rank = len(dims(producer.inputs[0]) or ()) or None
            if rank is None:
                return ShapeEntry(reason=f"{where} reads a tensor of unknown rank")
            start = producer.attributes.get_int("start", 0)
            start = min(max(start + rank if start < 0 else start, 0), rank)
            return ShapeEntry(source=producer.inputs[0], axis=start + index)
        elif op in ("Gather", "Slice"):
            length, picked = _length(producer.inputs[0]), _picked(producer)
            if length is None or picked is None:
                return ShapeEntry(reason=f"{where} picks computed or unknown positions")
            positions = list(range(length))[picked] if isinstance(picked, slice) else picked
            if not 0 <= index < len(positions):
                return ShapeEntry(reason=f"{where} is shorter than entry {index}")
            path.append((producer, 0))
            value, index = producer.inputs[0], positions[index] % length
        else:
            return ShapeEntry(reason=f"{where} computes it")
    return ShapeEntry(reason=f"the shape of {node.name} is computed by a long chain")


def _picked(node: ir.Node) -> list[int] | slice | None:
    """Which positions of a 1-D input a Gather (axis 0) or Slice (opset 10+) picks."""
    if node.op_type == "Gather":
        if node.attributes.get_int("axis", 0) != 0:
            return None
        return _ints(node.inputs[1])
    inputs = list(node.inputs)
    starts = _ints(inputs[1]) if len(inputs) > 1 else None
    ends = _ints(inputs[2]) if len(inputs) > 2 else None
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1]
    if starts is None or ends is None or steps is None or len(starts) != 1:
        return None
    return slice(starts[0], ends[0], steps[0])


def reshape_channel_map(in_dims: Sequence[int], axis: int, out_dims: Sequence[int]):
    """How channel axis `axis` of a tensor with `in_dims` lands in a reshape to `out_dims`.

    Returns (out_axis, positions) where positions[c] lists the positions on `out_axis` that hold
    channel c, or None when the reshape splits the channel axis (channel shuffle, attention heads)
    or mixes it with an axis in front of it.
    """
    outer = math.prod(in_dims[:axis])
    prefix = 1
    out_axis = 0
    while out_axis < len(out_dims) and prefix < outer:
        prefix *= out_dims[out_axis]
        out_axis += 1
    # skip size-1 output axes that still sit before the channel axis boundary
    while (
        out_axis < len(out_dims)
        and prefix == outer
        and out_dims[out_axis] == 1
        and (in_dims[axis] != 1)
    ):
        out_axis += 1
    if prefix != outer or out_axis >= len(out_dims):
        return None
    width = out_dims[out_axis]
    channels = in_dims[axis]
    if width % channels:
        return None
    # the output axis covers in_dims[axis:axis+m] exactly for some m
    covered, end = 1, axis
    while end < len(in_dims) and covered < width:
        covered *= in_dims[end]
        end += 1
    if covered != width:
        return None
    inner = width // channels
    positions = np.arange(width, dtype=np.int64).reshape(channels, inner)
    return out_axis, positions
