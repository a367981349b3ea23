"""Rewriting one attention block for the heads it keeps: weights sliced, sizes restated.

`plan(site, removed)` says, before anything changes, how every size that states a head count
will be written, and raises `NoMatch` when one cannot be; `rewrite` then edits the graph:

- weights: the kept heads' Q/K/V columns (and biases), the output projection's kept rows,
  constants beside the heads (relative-position keys) by their kept rows;
- Reshape targets: a constant where every size is static or only one is symbolic (-1 and 0
  fill in the rest); else the target's own entries where they are computed from sizes pruning
  does not change (`Shape` of the input tokens: the batch, the sequence), each entry made of
  heads scaled by kept / before (`batch * 4` becomes `batch * 2`); else the sizes read from the
  input's own shape at run time;
- Expand targets and Tile repeats the same way, entry by entry;
- Split sizes, Slice bounds and Gather indices on an axis holding heads, in kept positions;
- `num_heads` / `kv_num_heads` of the fused ops and RotaryEmbedding, per-head biases gathered;
- a decode step's key/value cache (past inputs, present outputs) declares the kept key/value
  heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.passes._kit import Names, add_initializer, constant_array
from slimgraph.passes.transformer._headregion import kept_rows
from slimgraph.passes.transformer._headsites import HeadSite
from slimgraph.passes.transformer._headtypes import (
    Move,
    Ref,
    Weight,
    alive,
    axis_factors,
    new_sizes,
)
from slimgraph.passes.transformer._layout import Layout
from slimgraph.passes.transformer._match import NoMatch
from slimgraph.passes.transformer._symbolic import ONE, Dim, ShapeInfo

__all__ = ["Entry", "Done", "kept_positions", "removed_heads", "unit_columns", "out_rows",
           "plan", "rewrite"]

_MAX_SHAPE_NODES = 64  # nodes walked back from a shape vector to the Shapes it reads


@dataclasses.dataclass(frozen=True)
class Entry:
    """One entry of a restated shape vector: a constant, a copy of the old vector's entry
    `index`, or that entry times `new` / `old`."""

    kind: str  # "const" | "copy" | "scale"
    value: int = 0
    index: int = 0
    old: int = 1
    new: int = 1


# what the blocks rewrote: (node id, input) / node id -> None, a sliced constant -> its copy
Done = dict[object, "ir.Value | None"]
# (node, input index) -> the new vector: a constant array, entries, or ("input", parts)
Plan = dict[tuple[ir.Node, int], object]


def removed_heads(site: HeadSite, units: Sequence[int]) -> list[int]:
    """The query heads of the removed pruning units (a key/value head's group)."""
    return [h for u in units for h in range(u * site.repeat, (u + 1) * site.repeat)]


def unit_columns(site: HeadSite, unit: int) -> dict[str, list[int]]:
    """Projection columns of one pruning unit (a head, or a key/value group) per operand."""
    group = range(unit * site.repeat, (unit + 1) * site.repeat)
    return {"q": [c for h in group for c in site.q[1][h]], "k": list(site.k[1][unit]),
            "v": list(site.v[1][unit])}


def out_rows(site: HeadSite, heads: Sequence[int]) -> list[int]:
    """Rows of the output projection the values of `heads` feed."""
    size = site.v_head_size
    return [h * size + j for h in heads for j in range(size)]


def kept_positions(site: HeadSite, units: Sequence[int]) -> dict[Ref, np.ndarray]:
    """Per reference of `site`: which positions of its head-bearing axis stay."""
    kept = {ref: np.ones(width, bool) for ref, (_, width) in site.refs.items()}
    heads = removed_heads(site, units)
    for unit in units:
        columns = unit_columns(site, unit)
        for role in ("q", "k", "v"):
            projection = getattr(site, role)[0]
            kept[("proj", id(projection.output))][columns[role]] = False
    for ref, mask in kept.items():
        if ref[0] == "Z":
            mask[heads] = False
        elif ref[0] == "Y":
            mask[out_rows(site, heads)] = False
        elif ref[0] == "H":
            mask[heads if ref[2] == "q" else list(units)] = False
    for ref, derived in site.derived.items():
        rows = kept_rows(derived, kept)
        if rows.size != kept[ref].size:
            raise NoMatch("a constant whose rows do not line up with the heads")
        kept[ref] = rows
    return kept


# ------------------------------------------------------------------------------- planning


def plan(site: HeadSite, units: Sequence[int], shapes: ShapeInfo) -> Plan:
    """How every shape vector of `site` is rewritten once `units` go.

    Raises:
        NoMatch: a size that cannot be restated, or Slice/Gather bounds that are not constant.
    """
    kept = kept_positions(site, units)
    out: Plan = {}
    for move in site.moves:
        axis = site.refs[move.ref][0]
        mask = kept[move.ref]
        node = move.node
        if node.op_type == "Reshape":
            vector = _reshape(move, axis, mask, shapes, site.changed)
        elif node.op_type == "Expand":
            vector = _expand(move, axis, mask, shapes, site.changed)
        elif node.op_type in ("Slice", "Gather"):
            _range_bounds(move, axis, mask)  # raises on bounds that are not constant
            continue
        else:
            continue
        if vector is not None:
            out[(node, 1)] = vector
    edits: dict[tuple[ir.Node, int], list[tuple[int, int, int]]] = {}
    for edit in site.edits:
        sizes = new_sizes(edit.layout, site.refs[edit.ref][0], kept[edit.ref])
        old = new = 1
        for index in edit.atoms:
            old *= edit.layout.flat()[index].size.coef
            new *= sizes[index]
        edits.setdefault((edit.node, edit.index), []).append((edit.entry, old, new))
    for edit in site.edits:
        key = (edit.node, edit.index)
        if key in out or key not in edits:
            continue
        vector = edit.node.inputs[edit.index]
        entries = shapes.ints(vector)
        if entries is None:
            raise NoMatch(f"{edit.node.op_type} sizes unknown")
        factors = [(1, 1)] * len(entries)
        for entry, old, new in edits[key]:
            factors[entry] = (old, new)
        found = _entries(vector, entries, factors, shapes, site.changed, "tile")
        if found is None:
            raise NoMatch(f"{edit.node.op_type} sizes made of the head count cannot be restated")
        out[key] = found
    return out


def _reshape(move: Move, axis: int, mask: np.ndarray, shapes: ShapeInfo,
             changed: set[int]) -> object | None:
    """The new target of a Reshape (see the module docstring), None when it stays."""
    sizes = new_sizes(move.after, axis, mask)
    flat = move.after.flat()
    if all(flat[i].size.coef == n for i, n in sizes.items()):
        return None
    dims = _static_dims(move, sizes)
    if dims.count(None) <= 1:
        return np.array([-1 if d is None else d for d in dims], np.int64)
    vector = move.node.inputs[1]
    entries = shapes.ints(vector)
    if entries is not None and len(entries) == move.after.rank:
        same = {i for i in range(min(move.before.rank, move.after.rank))
                if move.before.axes[i] == move.after.axes[i]}
        found = _entries(vector, entries, axis_factors(move.after, sizes), shapes, changed,
                         "reshape", same)
        if found is not None:
            return found
    before = new_sizes(move.before, axis, mask)
    return ("input", _runtime_dims(move, dims, before, sizes))


def _static_dims(move: Move, sizes: dict[int, int]) -> list[int | None]:
    """New Reshape target per output axis: an int, 0 (copy the same input axis) or None
    (symbolic)."""
    dims: list[int | None] = []
    index = 0
    for out_axis, atoms in enumerate(move.after.axes):
        size, static = 1, True
        for atom in atoms:
            if index in sizes:
                size *= sizes[index]
            elif atom.size.static:
                size *= atom.size.coef
            else:
                static = False
            index += 1
        if static:
            dims.append(size)
        elif out_axis < move.before.rank and move.before.axes[out_axis] == atoms:
            dims.append(0)
        else:
            dims.append(None)
    return dims


def _runtime_dims(move: Move, dims: list[int | None], before_sizes: dict[int, int],
                  after_sizes: dict[int, int]) -> list[object]:
    """Per output axis: its static size, or its parts: static ints and (input axis, divisor),
    the input's run-time size on that axis divided by the (new, static) sizes of the other
    atoms sharing it.

    Raises:
        NoMatch: a symbolic size that no input axis holds with only static companions.
    """
    flat_before = move.before.flat()
    index_of = {id(a): i for i, a in enumerate(flat_before)}
    out: list[object] = []
    index = -1
    for out_axis, atoms in enumerate(move.after.axes):
        parts: list[int | tuple[int, int]] = []
        for atom in atoms:
            index += 1
            if dims[out_axis] is not None:
                continue
            if atom.size.static:
                parts.append(after_sizes.get(index, atom.size.coef))
                continue
            home = next((i for i, axis in enumerate(move.before.axes) if atom in axis), None)
            if home is None:
                raise NoMatch("a head split whose symbolic sizes cannot be restated")
            divisor = 1
            for other in move.before.axes[home]:
                if other is atom or other == atom:
                    continue
                size = before_sizes.get(index_of.get(id(other), -1))
                if size is None:
                    if not other.size.static:
                        raise NoMatch("a head split whose symbolic sizes cannot be restated")
                    size = other.size.coef
                divisor *= size
            parts.append((home, divisor))
        out.append(dims[out_axis] if dims[out_axis] is not None else parts)
    return out


def _expand(move: Move, axis: int, mask: np.ndarray, shapes: ShapeInfo,
            changed: set[int]) -> object | None:
    sizes = new_sizes(move.after, axis, mask)
    factors = axis_factors(move.after, sizes)
    if all(old == new for old, new in factors):
        return None
    vector = move.node.inputs[1]
    entries = shapes.ints(vector)
    if entries is None:
        raise NoMatch("Expand sizes unknown")
    found = _entries(vector, entries, factors[len(factors) - len(entries):], shapes, changed,
                     "expand")
    if found is None:
        raise NoMatch("Expand sizes made of the head count cannot be restated")
    return found


def _entries(vector: ir.Value | None, entries: tuple[Dim, ...], factors: list[tuple[int, int]],
             shapes: ShapeInfo, changed: set[int], kind: str,
             same: set[int] | None = None) -> list[Entry] | None:
    """The entries of a shape vector once the sizes made of heads scale by `factors`
    ((old, new) per entry): None when one cannot be written (a symbolic entry computed from
    sizes pruning changes, a 0 copying an axis that changes, a size that does not divide)."""
    runtime = vector is not None and not _reads_changed(vector, changed)
    out: list[Entry] = []
    for index, (entry, (old, new)) in enumerate(zip(entries, factors, strict=True)):
        if old == new or (kind == "expand" and entry == ONE):
            if entry.static:
                out.append(Entry("const", entry.coef))
            elif runtime:
                out.append(Entry("copy", index=index))
            else:
                return None
            continue
        if kind == "reshape" and entry == Dim(-1):
            out.append(Entry("const", -1))
            continue
        if kind == "reshape" and entry == Dim(0):
            if same is None or index not in same:
                return None
            out.append(Entry("const", 0))
            continue
        scaled = (entry * new).divide(old)
        if scaled is None:
            return None
        if scaled.static:
            out.append(Entry("const", scaled.coef))
        elif runtime:
            out.append(Entry("scale", index=index, old=old, new=new))
        else:
            return None
    return out


def _reads_changed(vector: ir.Value, changed: set[int]) -> bool:
    """Whether the shape vector is computed from the shape of a value pruning resizes (its
    entries would change by themselves)."""
    frontier = [vector]
    seen: set[int] = set()
    while frontier:
        node = frontier.pop().producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > _MAX_SHAPE_NODES:
            return True
        if node.op_type in ("Shape", "Size"):
            if node.inputs[0] is not None and id(node.inputs[0]) in changed:
                return True
            continue
        frontier += [v for v in node.inputs if v is not None and constant_array(v) is None]
    return False


def _range_bounds(move: Move, axis: int, mask: np.ndarray) -> tuple[object, ...] | None:
    """(data axis atom, its flat index, cumulative kept count) for a Split/Slice/Gather on an
    axis that holds heads, None when the axis holds none.

    Raises:
        NoMatch: Slice bounds or a Gather index that are not constant.
    """
    node = move.node
    layout: Layout = move.before
    if node.op_type == "Slice":
        axes = constant_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
        data_axis = int(axes.reshape(-1)[0]) % layout.rank if axes is not None else 0
    else:
        data_axis = node.attributes.get_int("axis", 0) % layout.rank
    atoms = layout.axes[data_axis]
    if len(atoms) != 1 or atoms[0].axis != axis:
        return None
    atom = atoms[0]
    index = next(i for i, a in enumerate(layout.flat()) if a is atom)
    rank = np.concatenate([[0], np.cumsum(alive(layout, axis, mask)[index])])
    if node.op_type == "Slice" and (constant_array(node.inputs[1]) is None
                                    or constant_array(node.inputs[2]) is None):
        raise NoMatch("Slice of heads with bounds not constant")
    if node.op_type == "Gather" and constant_array(node.inputs[1]) is None:
        raise NoMatch("Gather of heads with an index not constant")
    return atom, index, rank


# ------------------------------------------------------------------------------- rewriting


def rewrite(graph: ir.Graph, names: Names, site: HeadSite, units: Sequence[int], plans: Plan,
            done: Done) -> None:
    """Remove `units` of `site` (see the module docstring); `plans` from `plan`; `done`: what
    another block sharing nodes or constants already rewrote (shared across blocks)."""
    kept = kept_positions(site, units)
    for (node, index), vector in plans.items():
        if (id(node), index) in done:
            continue
        done[(id(node), index)] = None
        node.replace_input_with(index, _vector(graph, names, node, index, vector))
        if node.op_type == "Reshape":
            node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
    for move in site.moves:
        if move.node.op_type in ("Split", "Slice", "Gather") and id(move.node) not in done:
            _restate_range(graph, names, move, site.refs[move.ref][0], kept[move.ref], done)
    seen: set[int] = set()
    for role in ("q", "k", "v"):
        projection = getattr(site, role)[0]
        if id(projection.output) in seen:
            continue
        seen.add(id(projection.output))
        keep = np.flatnonzero(kept[("proj", id(projection.output))])
        for weight in projection.weights:
            _slice(graph, names, weight, keep, done)
    for weight, ref in site.constants:
        _slice(graph, names, weight, np.flatnonzero(kept[ref]), done)
    gone = set(removed_heads(site, units))
    kept_heads = [h for h in range(site.heads) if h not in gone]
    _slice(graph, names, site.out, np.array(out_rows(site, kept_heads)), done)
    new_heads, new_kv = len(kept_heads), site.kv_heads - len(units)
    if site.fused is not None:
        attributes = site.fused.attributes
        attributes["num_heads"] = ir.AttrInt64("num_heads", new_heads)
        if "kv_num_heads" in attributes:
            attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", new_kv)
        if "qkv_hidden_sizes" in attributes:  # Attention's packed q, k, v widths
            attributes["qkv_hidden_sizes"] = ir.AttrInt64s("qkv_hidden_sizes", [
                new_heads * site.head_size, new_heads * site.head_size,
                new_heads * site.v_head_size])
    _restate_cache(site.cache, new_kv)
    for node, role in site.rotary_ops:
        node.attributes["num_heads"] = ir.AttrInt64("num_heads",
                                                    new_heads if role == "q" else new_kv)
    for consumer, index, axis in site.head_biases:
        value = consumer.inputs[index]
        assert value is not None
        indices = add_initializer(graph, names.fresh("heads_kept"),
                                  np.array(kept_heads, np.int64))
        gathered = _insert(graph, names, consumer, "Gather", [value, indices], axis=axis)
        consumer.replace_input_with(index, gathered)


def _restate_cache(values: list[ir.Value], kv_heads: int) -> None:
    """The declared head count (axis 1) of a block's past key/value inputs and present outputs
    [batch, kv_heads, sequence, size], the decode step's interface included: a cache of the kept
    key/value heads only."""
    for value in values:
        if value.shape is not None and len(value.shape) == 4:
            dims = list(value.shape)
            dims[1] = kv_heads
            value.shape = ir.Shape(dims)


def _slice(graph: ir.Graph, names: Names, w: Weight, keep: np.ndarray, done: Done) -> None:
    """Give `w`'s reader a copy of the constant holding only the `keep` positions of its axis
    (other readers keep the original). A constant several blocks read (ALBERT shares one
    layer's weights) sliced the same way by each stays one tensor."""
    old = w.node.inputs[w.index]
    assert old is not None
    key = ("slice", id(old), w.axis, tuple(int(k) for k in keep))
    shared = done.get(key)
    if shared is None:
        array = np.ascontiguousarray(np.take(w.array(), keep, axis=w.axis))
        shared = done[key] = add_initializer(
            graph, names.fresh(f"{old.name or 'weight'}_heads"), array)
    w.node.replace_input_with(w.index, shared)


def _vector(graph: ir.Graph, names: Names, node: ir.Node, index: int,
            vector: object) -> ir.Value:
    """The new shape vector for input `index` of `node` from its plan."""
    if isinstance(vector, np.ndarray):
        return add_initializer(graph, names.fresh("heads_shape"), vector)
    if isinstance(vector, tuple):  # ("input", per-axis sizes or parts)
        return _from_input(graph, names, node, vector[1])
    assert isinstance(vector, list)
    entries: list[Entry] = vector
    if all(e.kind == "const" for e in entries):
        return add_initializer(graph, names.fresh("heads_shape"),
                               np.array([e.value for e in entries], np.int64))
    old = node.inputs[index]
    assert old is not None
    pieces: list[ir.Value] = []
    run: list[Entry] = []

    def flush() -> None:
        if not run:
            return
        if run[0].kind == "const":
            pieces.append(add_initializer(graph, names.fresh("heads_dims"),
                                          np.array([e.value for e in run], np.int64)))
        else:
            pieces.append(_part(graph, names, node, old, run[0].index, run[-1].index + 1))
        run.clear()

    for entry in entries:
        if entry.kind == "scale":
            flush()
            piece = _part(graph, names, node, old, entry.index, entry.index + 1)
            piece = _insert(graph, names, node, "Mul", [piece, _int(graph, names, entry.new)])
            pieces.append(_insert(graph, names, node, "Div", [piece,
                                                              _int(graph, names, entry.old)]))
            continue
        if run and (run[-1].kind != entry.kind or (
                entry.kind == "copy" and entry.index != run[-1].index + 1)):
            flush()
        run.append(entry)
    flush()
    return pieces[0] if len(pieces) == 1 else _insert(graph, names, node, "Concat", pieces,
                                                      axis=0)


def _int(graph: ir.Graph, names: Names, value: int) -> ir.Value:
    return add_initializer(graph, names.fresh("heads_factor"), np.array([value], np.int64))


def _part(graph: ir.Graph, names: Names, node: ir.Node, vector: ir.Value, start: int,
          end: int) -> ir.Value:
    """Entries start..end-1 of a shape vector (int64)."""
    value = _insert(graph, names, node, "Slice", [vector, _int(graph, names, start),
                                                  _int(graph, names, end)])
    if vector.dtype is not None and vector.dtype != ir.DataType.INT64:
        value = _insert(graph, names, node, "Cast", [value], to=ir.DataType.INT64)
    return value


def _from_input(graph: ir.Graph, names: Names, node: ir.Node, plan: list[object]) -> ir.Value:
    """A Reshape target whose symbolic sizes are read from the input's shape at run time."""
    source = node.inputs[0]
    assert source is not None
    pieces: list[ir.Value] = []
    for parts in plan:
        if isinstance(parts, int):
            pieces.append(_int(graph, names, parts))
            continue
        assert isinstance(parts, list)
        value: ir.Value | None = None
        static = 1
        for part in parts:
            if isinstance(part, int):
                static *= part
                continue
            axis, divisor = part
            piece = _insert(graph, names, node, "Shape", [source], start=axis, end=axis + 1)
            if divisor != 1:
                piece = _insert(graph, names, node, "Div", [piece, _int(graph, names, divisor)])
            value = piece if value is None else _insert(graph, names, node, "Mul",
                                                        [value, piece])
        assert value is not None
        if static != 1:
            value = _insert(graph, names, node, "Mul", [value, _int(graph, names, static)])
        pieces.append(value)
    return _insert(graph, names, node, "Concat", pieces, axis=0)


def _insert(graph: ir.Graph, names: Names, before: ir.Node, op: str, inputs: list[ir.Value],
            **attrs: int) -> ir.Value:
    node = ir.node(op, inputs, attributes=attrs, name=names.fresh(f"heads_{op}"))
    node.outputs[0].name = names.fresh(f"heads_{op.lower()}")
    graph.insert_before(before, node)
    return node.outputs[0]


def _restate_range(graph: ir.Graph, names: Names, move: Move, axis: int, mask: np.ndarray,
                   done: Done) -> None:
    """Split sizes / Slice bounds / Gather index on a head-bearing axis, in kept positions."""
    found = _range_bounds(move, axis, mask)
    if found is None:
        return
    atom, _, rank = found
    assert isinstance(rank, np.ndarray)
    node = move.node
    done[id(node)] = None
    size = atom.size.coef  # type: ignore[attr-defined]
    if node.op_type == "Split":
        sizes = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] \
            else None
        if sizes is None:
            count = len(node.outputs)
            sizes = np.full(count, size // count)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        new = [int(rank[b] - rank[a]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        value = add_initializer(graph, names.fresh("heads_split"), np.array(new, np.int64))
        node.attributes.pop("num_outputs", None)
        if len(node.inputs) < 2:
            node.resize_inputs(2)
        node.replace_input_with(1, value)
    elif node.op_type == "Slice":
        starts, ends = constant_array(node.inputs[1]), constant_array(node.inputs[2])
        assert starts is not None and ends is not None
        start, end, _ = slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])).indices(size)
        for index, bound in ((1, rank[start]), (2, rank[end])):
            node.replace_input_with(index, add_initializer(
                graph, names.fresh("heads_slice"), np.array([bound], np.int64)))
    else:
        selected = constant_array(node.inputs[1])
        assert selected is not None
        position = int(selected.reshape(-1)[0]) % size
        node.replace_input_with(1, add_initializer(
            graph, names.fresh("heads_gather"), np.array(rank[position], np.int64).reshape(
                selected.shape)))
