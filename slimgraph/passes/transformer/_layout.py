"""Where each element of a tensor comes from: layouts through data-movement ops.

Attention splits heads with Reshape/Transpose chains that every exporter spells differently
(`view` + `transpose`, `[-1, T, H]` Reshapes around a Transpose for k^T, `unflatten` + `select`
of a packed projection, Expand + Reshape to repeat key/value heads). A `Layout` describes a
tensor reached through such a chain relative to the tensor the chain started from (its
*source*): each axis is a tuple of `Atom`s, major to minor; an atom is a run of positions on
one source axis (`size` positions, `stride` apart) or a broadcast (a repeat, `axis` None);
`offsets` shift each source axis (Slice, Split and Gather select a range of it). Applying the
chain's ops to the source's identity layout (`step`) gives the layout of the chain's end, so
the matcher can read off which source axis is the batch, the sequence, the head and the head
dimension, whatever the spelling, and refuse anything that mixes them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes._kit import constant_array
from slimgraph.passes.transformer._symbolic import (
    ONE,
    Dim,
    Shape,
    ShapeInfo,
    product,
    slice_size,
    split_sizes,
)

__all__ = ["ZERO", "Atom", "Layout", "LayoutError", "MOVES", "step", "is_move"]

ZERO = Dim(0)

# Ops that only move data: the layout of their output follows from the layout of their input.
MOVES = frozenset({
    "Reshape", "Flatten", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Slice",
    "Split", "Gather",
})


class LayoutError(Exception):
    """A data-movement op whose effect the layout cannot express; the message says why."""


@dataclasses.dataclass(frozen=True)
class Atom:
    """`size` positions `stride` apart on source axis `axis` (None: a broadcast repeat)."""

    axis: int | None
    size: Dim
    stride: Dim

    def split(self, major: Dim) -> tuple[Atom, Atom] | None:
        """(major part of size `major`, minor rest), or None when `major` does not divide."""
        rest = self.size.divide(major)
        if rest is None:
            return None
        return Atom(self.axis, major, self.stride * rest), Atom(self.axis, rest, self.stride)


def normalize(atoms: tuple[Atom, ...] | list[Atom]) -> tuple[Atom, ...]:
    """Drop size-1 atoms and merge neighbours that are one contiguous run (or one repeat)."""
    out: list[Atom] = []
    for atom in atoms:
        if atom.size == ONE:
            continue
        if out:
            last = out[-1]
            if atom.axis is None and last.axis is None:
                out[-1] = Atom(None, last.size * atom.size, ZERO)
                continue
            if (atom.axis is not None and last.axis == atom.axis
                    and last.stride == atom.size * atom.stride):
                out[-1] = Atom(atom.axis, last.size * atom.size, atom.stride)
                continue
        out.append(atom)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Axes of atoms (major to minor) and each source axis's offset."""

    axes: tuple[tuple[Atom, ...], ...]
    offsets: tuple[int, ...]

    @classmethod
    def identity(cls, shape: Shape) -> Layout:
        axes = tuple(normalize([Atom(i, d, ONE)]) for i, d in enumerate(shape))
        return cls(axes, (0,) * len(shape))

    @property
    def rank(self) -> int:
        return len(self.axes)

    def size(self, axis: int) -> Dim:
        return product([a.size for a in self.axes[axis]])

    def flat(self) -> list[Atom]:
        return [a for axis in self.axes for a in axis]

    def with_axes(self, axes: list[tuple[Atom, ...]] | tuple[tuple[Atom, ...], ...]) -> Layout:
        return Layout(tuple(normalize(a) for a in axes), self.offsets)

    def shifted(self, axis: int, by: int) -> Layout:
        offsets = list(self.offsets)
        offsets[axis] += by
        return Layout(self.axes, tuple(offsets))


def is_move(node: ir.Node) -> bool:
    if not is_onnx_op(node, *MOVES, "Cast", "Dropout"):
        return False
    if node.op_type == "Cast":  # a Cast to the same type moves nothing
        source = node.inputs[0]
        target = node.attributes.get_int("to", 0)
        dtype = known_dtype(source) if source is not None else None
        return dtype is not None and dtype.value == target
    return True


# ops whose output has the type of their first input (of the second for Where)
_SAME_TYPE = MOVES | {"Softmax", "LogSoftmax", "Dropout", "Neg", "Tanh", "Exp", "Sqrt", "Add",
                      "Sub", "Mul", "Div", "Where"}


def known_dtype(value: ir.Value, depth: int = 0) -> ir.DataType | None:
    """The element type of `value`: recorded, or, where a raw export left it untyped (Gemma 2's
    and BLOOM's Softmax before a Cast to the same type), the type of the input it has it from,
    by dataflow (softmax, elementwise and data movement keep their input's type)."""
    if value.dtype is not None:
        return value.dtype
    node = value.producer()
    if node is None or depth > 16 or not is_onnx_op(node, *_SAME_TYPE):
        return None
    source = node.inputs[1 if node.op_type == "Where" else 0]
    return known_dtype(source, depth + 1) if source is not None else None


def step(layout: Layout, node: ir.Node, value: ir.Value, shapes: ShapeInfo) -> Layout:
    """The layout of `value` (an output of `node`) given the layout of `node`'s data input.

    Raises:
        LayoutError: the op's effect cannot be expressed (the message says why).
    """
    op = node.op_type
    if op in ("Identity", "Cast", "Dropout"):
        return layout
    if op in ("Reshape", "Flatten"):
        dims = shapes.shape(value)
        if dims is None:
            raise LayoutError(f"{op} output shape unknown")
        return layout.with_axes(_regroup(layout.flat(), dims))
    if op == "Transpose":
        perm = node.attributes.get_ints("perm", list(reversed(range(layout.rank))))
        return layout.with_axes([layout.axes[p] for p in perm])
    if op == "Unsqueeze":
        axes = shapes.array(node.inputs[1])
        if axes is None:
            raise LayoutError("Unsqueeze axes not constant")
        rank = layout.rank + axes.size
        new = list(layout.axes)
        for axis in sorted(int(a) % rank for a in axes.reshape(-1)):
            new.insert(axis, ())
        return layout.with_axes(new)
    if op == "Squeeze":
        axes = shapes.array(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None:
            drop = {i for i, a in enumerate(layout.axes) if not a}
        else:
            drop = {int(a) % layout.rank for a in axes.reshape(-1)}
        if any(layout.axes[i] for i in drop):
            raise LayoutError("Squeeze of an axis that is not of size 1")
        return layout.with_axes([a for i, a in enumerate(layout.axes) if i not in drop])
    if op == "Expand":
        return _expand(layout, shapes.ints(node.inputs[1]))
    if op == "Slice":
        return _slice(layout, node, shapes)
    if op == "Split":
        return _split(layout, node, value)
    if op == "Gather":
        return _gather(layout, node, shapes)
    raise LayoutError(f"{op} is not a data movement")


def _regroup(atoms: list[Atom], dims: Shape) -> list[tuple[Atom, ...]]:
    queue = [a for a in atoms if a.size != ONE]
    out: list[tuple[Atom, ...]] = []
    for dim in dims:
        group: list[Atom] = []
        need = dim
        while need != ONE:
            if not queue:
                raise LayoutError("Reshape changes the element count")
            atom = queue.pop(0)
            if atom.size == need:
                group.append(atom)
                need = ONE
                continue
            rest = need.divide(atom.size)
            if rest is not None:
                group.append(atom)
                need = rest
                continue
            parts = atom.split(need)
            if parts is None:
                raise LayoutError(f"Reshape splits a dimension of size {atom.size} by {need}")
            group.append(parts[0])
            queue.insert(0, parts[1])
            need = ONE
        out.append(tuple(group))
    if queue:
        raise LayoutError("Reshape changes the element count")
    return out


def _expand(layout: Layout, target: tuple[Dim, ...] | None) -> Layout:
    if target is None:
        raise LayoutError("Expand shape not known")
    rank = max(layout.rank, len(target))
    axes = [()] * (rank - layout.rank) + list(layout.axes)
    target = (ONE,) * (rank - len(target)) + tuple(target)
    new: list[tuple[Atom, ...]] = []
    for atoms, dim in zip(axes, target, strict=True):
        if not atoms and dim != ONE:
            if dim.static and dim.coef < 1:
                raise LayoutError("Expand to a negative size")
            new.append((Atom(None, dim, ZERO),))
        else:
            new.append(atoms)
    return Layout(tuple(normalize(a) for a in new), layout.offsets)


def _ranged(layout: Layout, axis: int, start: int, size: Dim, step: int = 1) -> Layout:
    atoms = layout.axes[axis]
    if len(atoms) != 1:
        raise LayoutError("a slice across several source axes")
    atom = atoms[0]
    if start == 0 and size == atom.size and step == 1:
        return layout
    axes = list(layout.axes)
    axes[axis] = (Atom(atom.axis, size, atom.stride * step),)
    out = layout.with_axes(axes)
    if atom.axis is None or start == 0:
        return out
    if not atom.stride.static:
        raise LayoutError("a slice of a symbolic stride")
    return out.shifted(atom.axis, start * atom.stride.coef)


def _slice(layout: Layout, node: ir.Node, shapes: ShapeInfo) -> Layout:
    parts = [shapes.array(v) if v is not None else None for v in node.inputs[1:5]]
    parts += [None] * (4 - len(parts))
    if parts[0] is None or parts[1] is None:
        raise LayoutError("Slice bounds not constant")
    starts, ends = parts[0].reshape(-1), parts[1].reshape(-1)
    axes = parts[2].reshape(-1) if parts[2] is not None else np.arange(starts.size)
    steps = parts[3].reshape(-1) if parts[3] is not None else np.ones(starts.size, np.int64)
    for start, end, axis, stride in zip(starts, ends, axes, steps, strict=True):
        axis = int(axis) % layout.rank
        dim = layout.size(axis)
        size = slice_size(dim, int(start), int(end), int(stride))
        if size is None or int(stride) < 1:
            raise LayoutError("Slice bounds not static")
        first = int(start)
        if first < 0:
            if not dim.static:
                raise LayoutError("Slice from the end of a symbolic axis")
            first = max(0, dim.coef + first)
        if dim.static:
            first = min(first, dim.coef)
        layout = _ranged(layout, axis, first, size, int(stride))
    return layout


def _split(layout: Layout, node: ir.Node, value: ir.Value) -> Layout:
    axis = node.attributes.get_int("axis", 0) % layout.rank
    sizes = split_sizes(node, layout.size(axis))
    index = value.index()
    if sizes is None or index is None:
        raise LayoutError("Split sizes not static")
    return _ranged(layout, axis, sum(sizes[:index]), Dim(sizes[index]))


def _gather(layout: Layout, node: ir.Node, shapes: ShapeInfo) -> Layout:
    index = constant_array(node.inputs[1])
    if index is None and (found := shapes.array(node.inputs[1])) is not None:
        index = found.reshape(()) if found.size == 1 and shapes.rank(node.inputs[1]) == 0 \
            else found
    if index is None or index.size != 1:
        raise LayoutError("Gather of a non-constant or multi-element index")
    axis = node.attributes.get_int("axis", 0) % layout.rank
    dim = layout.size(axis)
    position = int(index.reshape(()))
    if position < 0:
        if not dim.static:
            raise LayoutError("Gather from the end of a symbolic axis")
        position += dim.coef
    out = _ranged(layout, axis, position, ONE)
    if index.ndim == 0:
        out = out.with_axes([a for i, a in enumerate(out.axes) if i != axis])
    return out
