"""Values carrying the heads that are read beside the attention core, followed until they rejoin it.

Head pruning shrinks every tensor that holds the heads. Most of them are the core's own (the
projections, the head split, the scores, the merge); some are read elsewhere too, and those
readers must shrink with them:

- DeBERTa's relative-position terms: the split query and key multiplied (batched over
  batch x heads) with per-head position keys and queries (constants, tiled over the batch),
  gathered by relative distance (an index expanded to batch x heads), added to the scores;
- a rotary embedding's own ops (GPT-J's interleaved pairs restate the head count in a Reshape);
- the causal mask torch's sdpa builds from the split heads' shape.

`follow` walks forward from those values, in graph order, through data movement (restated like
the core's), elementwise ops, MatMul, GatherElements, Concat and Tile, until the values rejoin
the attention (a bias on the scores, a rotary output, the fused op's bias input) or are read only
for their shape. Past the first op that is not a data movement, layouts are kept relative to the
heads themselves ("H" references: one axis of query or key/value heads), which `HeadFrame`
reads off the projection's columns. Inputs of those ops that do not come from the heads but line
up with them (a constant with one row per head, an index expanded to batch x heads) are traced
back: a constant's head axis is sliced, an Expand's or Tile's entry is restated. Anything else
raises `NoMatch` naming the op, before the graph changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

import slimgraph.passes.transformer._layout as moves
from slimgraph.ir import layer_name
from slimgraph.passes._kit import constant_array
from slimgraph.passes.transformer._headtypes import Move, Ref, VectorEdit, Weight, alive
from slimgraph.passes.transformer._layout import (
    ZERO,
    Atom,
    Layout,
    LayoutError,
    is_move,
    normalize,
)
from slimgraph.passes.transformer._match import NoMatch
from slimgraph.passes.transformer._symbolic import ONE, Dim, ShapeInfo

__all__ = ["HeadFrame", "Region", "follow", "shape_reader", "signature", "kept_rows"]

_MAX_NODES = 400  # a region larger than this is not a term beside the attention
_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Neg", "Sqrt", "Reciprocal", "Exp", "Log",
    "Abs", "Erf", "Tanh", "Sigmoid", "Relu", "Clip", "Not", "And", "Or", "Equal", "Less",
    "LessOrEqual", "Greater", "GreaterOrEqual", "IsNaN", "IsInf", "Sign", "Floor", "Ceil",
    "Round", "Sin", "Cos", "Max", "Min", "Mod",
})


def shape_reader(node: ir.Node, index: int, depth: int = 0) -> bool:
    """Whether `node` reads only the shape or type of its input `index` (Shape, CastLike's
    target, moves that state no size feeding only such readers): it reads the pruned tensor's
    own sizes at run time, which stay right."""
    if node.op_type in ("Shape", "Size") or (node.op_type == "CastLike" and index == 1):
        return True
    if depth > 6 or node.op_type not in ("Transpose", "Identity", "Unsqueeze", "Squeeze"):
        return False
    return all(not out.is_graph_output() and all(shape_reader(u.node, u.idx, depth + 1)
                                                 for u in out.uses()) for out in node.outputs)


def signature(layout: Layout) -> tuple[object, ...]:
    """What must agree for two layouts relative to the same heads to hold the same head in the
    same place: per axis, the head atoms (size, stride) and the sizes of the runs between them,
    and the offset of the first head."""
    axes = []
    for atoms in layout.axes:
        items: list[tuple[object, ...]] = []
        run = ONE
        for atom in atoms:
            if atom.axis is None:
                run = run * atom.size
                continue
            if run != ONE:
                items.append(("F", run))
                run = ONE
            items.append(("H", atom.axis, atom.size, atom.stride))
        if run != ONE:
            items.append(("F", run))
        axes.append(tuple(items))
    return (tuple(axes), layout.offsets)


def _foreign(size: Dim) -> tuple[Atom, ...]:
    return () if size == ONE else (Atom(None, size, ZERO),)


def _has_heads(atoms: tuple[Atom, ...]) -> bool:
    return any(a.axis == 0 for a in atoms)


@dataclasses.dataclass
class HeadFrame:
    """How to read head positions off layouts relative to one attention block's references.

    Attributes:
        columns: per projection or merged-heads reference, column -> (role, head, position in
            the head) for every column a head owns ("q", "k", "v"; the merged heads: "q").
        scores: the scores reference (heads on its axis 1), if the block has one.
        heads: role -> the "H" reference of its heads ("q" for query heads, "k" and "v" for
            key/value heads; the same reference when every key/value head serves one query head).
        axes: reference -> its head-bearing axis.
    """

    columns: dict[Ref, dict[int, tuple[str, int, int]]]
    scores: Ref | None
    heads: dict[str, Ref]
    axes: dict[Ref, int]

    def convert(self, layout: Layout, ref: Ref) -> tuple[Layout, Ref]:
        """`layout` (relative to `ref`) relative to the heads: head atoms on axis 0, everything
        else foreign (None atoms).

        Raises:
            NoMatch: the layout mixes heads with positions within a head, or q, k and v.
        """
        if ref[0] == "H":
            return layout, ref
        if ref == self.scores:
            axes = [tuple(Atom(0, a.size, a.stride) if a.axis == 1 else Atom(None, a.size, ZERO)
                          for a in atoms) for atoms in layout.axes]
            return Layout(tuple(normalize(a) for a in axes), (layout.offsets[1],)), self.heads["q"]
        if ref not in self.columns:
            raise NoMatch("heads read through a tensor head pruning cannot follow")
        return self._from_columns(layout, ref)

    def _from_columns(self, layout: Layout, ref: Ref) -> tuple[Layout, Ref]:
        owner = self.columns[ref]
        axis = self.axes[ref]
        base = layout.offsets[axis]
        if base not in owner:
            raise NoMatch("a tensor beside the heads holds columns no head owns")
        role, head0, _ = owner[base]
        axes = []
        for atoms in layout.axes:
            new = []
            for atom in atoms:
                if atom.axis != axis:
                    new.append(Atom(None, atom.size, ZERO))
                    continue
                if not atom.size.static or not atom.stride.static:
                    raise NoMatch("symbolic head positions")
                hits = [owner.get(base + atom.stride.coef * k) for k in range(atom.size.coef)]
                if any(h is None or h[0] != role for h in hits):
                    raise NoMatch("a data movement mixes the heads of q, k and v")
                heads = [h[1] for h in hits if h is not None]
                within = {h[2] for h in hits if h is not None}
                if len(set(heads)) == 1:
                    new.append(Atom(None, atom.size, ZERO))
                    continue
                step_ = heads[1] - heads[0]
                if len(within) != 1 or step_ <= 0 or heads != [heads[0] + step_ * k
                                                              for k in range(len(heads))]:
                    raise NoMatch("a data movement mixes positions of different heads")
                new.append(Atom(0, atom.size, Dim(step_)))
            axes.append(tuple(new))
        return Layout(tuple(normalize(a) for a in axes), (head0,)), self.heads[role]


@dataclasses.dataclass
class Region:
    """What a walk found: moves to restate, shape-vector entries to scale, constants to slice
    (by a derived reference: base reference, layout relative to it, flat index of the atom the
    constant's axis lines up with), the references it added, the nodes walked, the values whose
    shapes change, and the join values it reached."""

    moves: list[Move] = dataclasses.field(default_factory=list)
    edits: list[VectorEdit] = dataclasses.field(default_factory=list)
    constants: list[tuple[Weight, Ref]] = dataclasses.field(default_factory=list)
    derived: dict[Ref, tuple[Ref, Layout, int]] = dataclasses.field(default_factory=dict)
    refs: dict[Ref, tuple[int, int]] = dataclasses.field(default_factory=dict)
    nodes: set[int] = dataclasses.field(default_factory=set)
    values: set[int] = dataclasses.field(default_factory=set)
    joined: set[int] = dataclasses.field(default_factory=set)


def follow(graph: ir.Graph, starts: Sequence[tuple[ir.Value, Layout, Ref]], inside: set[int],
           joins: dict[int, tuple[Layout, Ref]], frame: HeadFrame,
           shapes: ShapeInfo, outputs: set[int] | frozenset[int] = frozenset()) -> Region:
    """Walk the readers of `starts` (values of the block, laid out relative to a reference)
    that are not `inside` the block, until they rejoin it at one of `joins` (value id ->
    the layout the block expects there) or are read only for their shape. `outputs`: the
    starts that may be graph outputs (a decode step's present keys/values, whose declared head
    count the rewrite restates).

    Raises:
        NoMatch: a reader head pruning cannot follow, or a value rejoining the block elsewhere
            or laid out differently from what the block expects.
    """
    walk = _Walk(graph, inside, joins, frame, shapes)
    return walk.run(starts, outputs)


class _Walk:
    def __init__(self, graph: ir.Graph, inside: set[int], joins: dict[int, tuple[Layout, Ref]],
                 frame: HeadFrame, shapes: ShapeInfo) -> None:
        self.graph, self.inside, self.joins = graph, inside, joins
        self.frame, self.shapes = frame, shapes
        self.region = Region()
        self.layouts: dict[int, tuple[Layout, Ref]] = {}
        self.values: dict[int, ir.Value] = {}

    def run(self, starts: Sequence[tuple[ir.Value, Layout, Ref]],
            outputs: set[int] | frozenset[int]) -> Region:
        frontier = []
        for value, layout, ref in starts:
            if value.is_graph_output() and id(value) not in outputs:
                raise NoMatch("a value carrying the heads is a graph output")
            if any(self._outside(u.node, u.idx) for u in value.uses()):
                self.layouts[id(value)] = (layout, ref)
                frontier.append(value)
        reach = self.region.nodes
        while frontier:
            value = frontier.pop()
            for use in value.uses():
                if not self._outside(use.node, use.idx) or id(use.node) in reach:
                    continue
                reach.add(id(use.node))
                if len(reach) > _MAX_NODES:
                    raise NoMatch("the heads' values are read by much of the graph")
                frontier += list(use.node.outputs)
        started = set(self.layouts)
        for node in self.graph:  # graph order is a topological order
            if id(node) in reach:
                self._visit(node)
        for key, value in self.values.items():
            if key in started:
                continue
            self.region.values.add(key)
            self._check_exit(value)
        return self.region

    def _outside(self, node: ir.Node, index: int) -> bool:
        return id(node) not in self.inside and not shape_reader(node, index)

    def _check_exit(self, value: ir.Value) -> None:
        if value.is_graph_output():
            raise NoMatch("a value computed from the heads is a graph output")
        into = [u.node for u in value.uses() if id(u.node) in self.inside]
        if not into:
            return
        expected = self.joins.get(id(value))
        if expected is None:
            raise NoMatch(f"the heads' values reach the attention another way (by "
                          f"{into[0].op_type})")
        got = self.frame.convert(*self.layouts[id(value)])
        want = self.frame.convert(*expected)
        if got[0].rank < want[0].rank:  # broadcast against the scores from the right
            got = (Layout(((),) * (want[0].rank - got[0].rank) + got[0].axes, got[0].offsets),
                   got[1])
        if got[1] != want[1] or signature(got[0]) != signature(want[0]):
            raise NoMatch("a term computed from the heads is laid out unlike the attention's")
        self.region.joined.add(id(value))

    # ---------------------------------------------------------------------------- visiting

    def _set(self, value: ir.Value, layout: Layout, ref: Ref) -> None:
        self.layouts[id(value)] = (layout, ref)
        self.values[id(value)] = value

    def _heads(self, value: ir.Value, rank: int) -> tuple[Layout, Ref]:
        """The layout of a region value relative to the heads, padded to `rank` axes."""
        layout, ref = self.frame.convert(*self.layouts[id(value)])
        if layout.rank > rank:
            raise NoMatch("a value carrying the heads broadcast to fewer axes")
        return Layout(((),) * (rank - layout.rank) + layout.axes, layout.offsets), ref

    def _visit(self, node: ir.Node) -> None:
        mine = [(i, v) for i, v in enumerate(node.inputs) if v is not None
                and id(v) in self.layouts]
        op = node.op_type
        who = f"{op} ({layer_name(node) or node.name})"
        if not mine:
            return  # reached only through a value read for its shape
        if node.domain not in ("", "ai.onnx"):
            raise NoMatch(f"the heads' values are also read by {who}")
        if is_move(node):
            if mine[0][0] != 0 or len(mine) > 1:
                raise NoMatch(f"a size computed from the heads' values ({who})")
            self._move(node, who)
        elif op in _ELEMENTWISE:
            self._elementwise(node, mine, who)
        elif op == "MatMul":
            self._matmul(node, who)
        elif op == "GatherElements":
            self._gather_elements(node, who)
        elif op == "Concat":
            self._concat(node, mine, who)
        elif op == "Tile" and mine[0][0] == 0 and len(mine) == 1:
            self._tile_region(node, who)
        else:
            raise NoMatch(f"the heads' values are also read by {who}")

    def _move(self, node: ir.Node, who: str) -> None:
        data = node.inputs[0]
        assert data is not None
        layout, ref = self.layouts[id(data)]
        first: Layout | None = None
        for out in node.outputs:
            try:
                after = moves.step(layout, node, out, self.shapes)
            except LayoutError as error:
                raise NoMatch(f"cannot follow {who} ({error})") from None
            first = first or after
            self._set(out, after, ref)
        assert first is not None
        self.region.moves.append(Move(node, ref, layout, first))

    def _out_dims(self, node: ir.Node) -> tuple[Dim, ...]:
        dims = self.shapes.shape(node.outputs[0])
        if dims is None:
            raise NoMatch(f"shape unknown after {node.op_type}")
        return dims

    def _merge(self, layouts: list[tuple[Layout, Ref]], dims: tuple[Dim, ...], skip: int | None,
               who: str) -> tuple[Layout, Ref]:
        """The layout of an op's output whose axes line up with every input's (but `skip`):
        the region inputs must agree where they hold heads; elsewhere foreign atoms."""
        refs = {ref for _, ref in layouts}
        offsets = {layout.offsets for layout, _ in layouts}
        if len(refs) != 1 or len(offsets) != 1:
            raise NoMatch(f"query and key/value heads meet in {who}")
        axes: list[tuple[Atom, ...]] = []
        for j, dim in enumerate(dims):
            held = [layout.axes[j] for layout, _ in layouts]
            if j == skip:
                if any(_has_heads(a) for a in held):
                    raise NoMatch(f"{who} runs over the heads")
                axes.append(_foreign(dim))
                continue
            if any(_has_heads(a) for a in held):
                signatures = {signature(Layout((a,), (0,)))[0] for a in held}
                if len(signatures) != 1:
                    raise NoMatch(f"{who} combines values whose heads do not line up")
                axes.append(held[0])
            else:
                axes.append(_foreign(dim))
        return Layout(tuple(normalize(a) for a in axes), offsets.pop()), refs.pop()

    def _elementwise(self, node: ir.Node, mine: list[tuple[int, ir.Value]], who: str) -> None:
        dims = self._out_dims(node)
        layouts = [self._heads(v, len(dims)) for _, v in mine]
        layout, ref = self._merge(layouts, dims, None, who)
        region = {i for i, _ in mine}
        for i, value in enumerate(node.inputs):
            if value is None or i in region or (node.op_type == "Clip" and i > 0):
                continue
            rank = self.shapes.rank(value)
            if rank is None:
                raise NoMatch(f"shape unknown before {who}")
            self._depend(node, value, layout, ref, {k: k + len(dims) - rank
                                                    for k in range(rank)}, who)
        self._set(node.outputs[0], layout, ref)

    def _matmul(self, node: ir.Node, who: str) -> None:
        dims = self._out_dims(node)
        rank = len(dims)
        a, b = node.inputs
        assert a is not None and b is not None
        ranks = [self.shapes.rank(a), self.shapes.rank(b)]
        if None in ranks or min(r for r in ranks if r is not None) < 2:
            raise NoMatch(f"{who} of vectors or of unknown rank")
        operands: list[tuple[Layout, Ref] | None] = []
        for value, contracted in ((a, -1), (b, -2)):
            if id(value) in self.layouts:
                layout, ref = self._heads(value, rank)
                if _has_heads(layout.axes[contracted]):
                    raise NoMatch(f"{who} sums over the heads")
                operands.append((layout, ref))
            else:
                operands.append(None)
        held = [x for x in operands if x is not None]
        batch = [Layout(x[0].axes[:-2] + ((), ()), x[0].offsets) for x in held]
        merged, ref = self._merge([(lay, r) for lay, (_, r) in zip(batch, held, strict=True)],
                                  dims, None, who)
        rows = operands[0][0].axes[-2] if operands[0] is not None else _foreign(dims[-2])
        cols = operands[1][0].axes[-1] if operands[1] is not None else _foreign(dims[-1])
        layout = merged.with_axes((*merged.axes[:-2], rows, cols))
        for value, operand, value_rank in ((a, operands[0], ranks[0]),
                                           (b, operands[1], ranks[1])):
            if operand is None:
                assert value_rank is not None
                self._depend(node, value, layout, ref, {k: k + rank - value_rank
                                                        for k in range(value_rank - 2)}, who)
        self._set(node.outputs[0], layout, ref)

    def _gather_elements(self, node: ir.Node, who: str) -> None:
        data, index = node.inputs[0], node.inputs[1]
        assert data is not None and index is not None
        if id(data) not in self.layouts:
            raise NoMatch(f"{who} picks positions by the heads' values")
        dims = self._out_dims(node)
        axis = node.attributes.get_int("axis", 0) % len(dims)
        if self.shapes.shape(data) is None or any(
                d != e for j, (d, e) in enumerate(zip(self.shapes.shape(data) or (), dims,
                                                       strict=True)) if j != axis):
            raise NoMatch(f"{who} with an index smaller than its data")
        layouts = [self._heads(data, len(dims))]
        if id(index) in self.layouts:
            layouts.append(self._heads(index, len(dims)))
        layout, ref = self._merge(layouts, dims, axis, who)
        if id(index) not in self.layouts:
            self._depend(node, index, layout, ref, {k: k for k in range(len(dims)) if k != axis},
                         who)
        self._set(node.outputs[0], layout, ref)

    def _concat(self, node: ir.Node, mine: list[tuple[int, ir.Value]], who: str) -> None:
        dims = self._out_dims(node)
        axis = node.attributes.get_int("axis", 0) % len(dims)
        layout, ref = self._merge([self._heads(v, len(dims)) for _, v in mine], dims, axis, who)
        region = {i for i, _ in mine}
        for i, value in enumerate(node.inputs):
            if value is not None and i not in region:
                self._depend(node, value, layout, ref, {k: k for k in range(len(dims))
                                                        if k != axis}, who)
        self._set(node.outputs[0], layout, ref)

    def _tile_region(self, node: ir.Node, who: str) -> None:
        data = node.inputs[0]
        assert data is not None
        layout, ref = self.layouts[id(data)]
        self._set(node.outputs[0], _tile(layout, self.shapes.ints(node.inputs[1]), who, True),
                  ref)

    # ---------------------------------------------------------------------------- dependents

    def _depend(self, reader: ir.Node, value: ir.Value, target: Layout, ref: Ref,
                axes: dict[int, int], who: str) -> None:
        """`value`, read by `reader` beside a region value laid out as `target` (relative to
        the heads `ref`), its axis k lined up with the target's axis `axes[k]`: where that axis
        holds heads, `value` must follow them (see the module docstring)."""
        dims = self.shapes.shape(value)
        if dims is None:
            raise NoMatch(f"shape unknown before {who}")
        needs = [(k, t) for k, t in axes.items() if _has_heads(target.axes[t]) and dims[k] != ONE]
        if not needs:
            return
        chain: list[ir.Node] = []
        origin = value
        while (producer := origin.producer()) is not None and constant_array(origin) is None and (
                is_move(producer) or producer.op_type == "Tile") and producer.inputs[0] is not None:
            chain.append(producer)
            origin = producer.inputs[0]
        start = self.shapes.shape(origin)
        if start is None:
            raise NoMatch(f"shape unknown before {who}")
        layout = Layout.identity(start)
        steps: list[tuple[ir.Node, Layout, Layout]] = []
        for node in reversed(chain):
            try:
                after = (_tile(layout, self.shapes.ints(node.inputs[1]), who, False)
                         if node.op_type == "Tile" else moves.step(layout, node, node.outputs[0],
                                                              self.shapes))
            except LayoutError as error:
                raise NoMatch(f"cannot follow {node.op_type} ({error})") from None
            steps.append((node, layout, after))
            layout = after
        first_index = [sum(len(a) for a in target.axes[:t]) for t in range(target.rank)]
        for k, t in needs:
            try:
                group_of = _pair(layout.axes[k], target.axes[t], first_index[t], who)
            except NoMatch:
                if constant_array(origin) is not None and any(
                        a.axis is None for a in target.axes[t]):
                    raise NoMatch(f"a constant holding a value per head repeated over the batch "
                                  f"(folded by a fixed-size export) ({who})") from None
                raise
            for atom, group in group_of:
                heads = tuple(i for i, a in group if a.axis == 0)
                if heads:
                    self._line_up(reader, value, origin, chain, steps, atom, group, heads,
                                  target, ref, k, who)

    def _line_up(self, reader: ir.Node, value: ir.Value, origin: ir.Value, chain: list[ir.Node],
                 steps: list[tuple[ir.Node, Layout, Layout]], atom: Atom,
                 group: list[tuple[int, Atom]], heads: tuple[int, ...], target: Layout,
                 ref: Ref, axis: int, who: str) -> None:
        if atom.axis is not None:  # an axis of the origin: a constant with one row per head
            array = constant_array(origin)
            if array is None:
                raise NoMatch(f"a tensor computed at run time holds a value per head ({who})")
            width = array.shape[atom.axis]
            layout = steps[-1][2] if steps else Layout.identity(self.shapes.shape(origin) or ())
            if len(group) != 1 or atom.stride != ONE or atom.size != Dim(width) or (
                    layout.offsets[atom.axis]):
                raise NoMatch(f"a constant whose rows do not line up with the heads ({who})")
            first = chain[-1] if chain else reader
            index = next(i for i, v in enumerate(first.inputs) if v is origin)
            c_ref: Ref = ("C", id(origin), id(first))
            self.region.refs[c_ref] = (atom.axis, width)
            self.region.derived[c_ref] = (ref, target, heads[0])
            self.region.constants.append((Weight(first, index, atom.axis), c_ref))
            self.region.moves += [Move(n, c_ref, b, a) for n, b, a in steps
                                  if n.op_type != "Tile"]
            return
        creator = value.producer()
        if not chain or creator is not chain[0] or creator.op_type not in ("Expand", "Tile"):
            raise NoMatch(f"a size made of the head count, computed before {who}")
        before, after = steps[-1][1], steps[-1][2]
        shift = after.rank - before.rank
        if axis >= shift and atom in before.axes[axis - shift]:
            raise NoMatch(f"a size made of the head count, computed before {who}")
        vector = self.shapes.ints(creator.inputs[1])
        if vector is None:
            raise NoMatch(f"{creator.op_type} sizes unknown ({who})")
        entry = axis - (after.rank - len(vector))
        if entry < 0:
            raise NoMatch(f"{creator.op_type} broadcast over the heads ({who})")
        self.region.edits.append(VectorEdit(creator, 1, entry, ref, target, heads))


def _pair(atoms: tuple[Atom, ...], targets: tuple[Atom, ...], first: int,
          who: str) -> list[tuple[Atom, list[tuple[int, Atom]]]]:
    """Line the atoms of one axis of a tensor up with the atoms of the same axis of the region
    value it meets: each atom covers one or more (a broadcast) target atoms of equal total size;
    target atoms come with their index in the target's flat atom list (`first` is the index of
    the axis's first atom)."""
    queue = [(first + i, a) for i, a in enumerate(targets)]
    out = []
    for atom in atoms:
        group: list[tuple[int, Atom]] = []
        size = ONE
        while size != atom.size:
            if not queue or atom.size.divide(size) is None:
                raise NoMatch(f"a tensor whose positions do not line up with the heads ({who})")
            group.append(queue.pop(0))
            size = size * group[-1][1].size
        if len(group) > 1 and atom.axis is not None:
            raise NoMatch(f"a tensor whose positions do not line up with the heads ({who})")
        out.append((atom, group))
    if queue:
        raise NoMatch(f"a tensor whose positions do not line up with the heads ({who})")
    return out


def _tile(layout: Layout, repeats: tuple[Dim, ...] | None, who: str, heads: bool) -> Layout:
    """The layout after Tile: each repeated axis gains a broadcast atom in front (`heads`: the
    layout is relative to the heads, which must not be repeated)."""
    if repeats is None or len(repeats) != layout.rank:
        raise NoMatch(f"Tile repeats unknown ({who})")
    axes = []
    for atoms, count in zip(layout.axes, repeats, strict=True):
        if heads and count != ONE and _has_heads(atoms):
            raise NoMatch(f"Tile repeats the heads ({who})")
        axes.append((*_foreign(count), *atoms))
    return layout.with_axes(axes)


def kept_rows(derived: tuple[Ref, Layout, int], kept: dict[Ref, np.ndarray]) -> np.ndarray:
    """The kept rows of a constant lined up with the heads (see `Region.derived`)."""
    base, layout, index = derived
    return alive(layout, 0, kept[base])[index]
