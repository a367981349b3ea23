"""Attention-head pruning: remove whole heads, with every head count in the graph updated.

One head of an attention block is a channel group that the generic channel tracer cannot form
(the head split mixes the channel axis): the head's columns of the Q, K and V projections (and
biases) together with the rows of the output projection its values feed. The attention matcher
says where they are, whatever the exporter's spelling (`_headsites`: separate projections, one
packed projection split three ways, GPT-NeoX's per-head packing, the fused ops fuse-attention
writes). Removing a head shrinks those weights, and the head count wherever the graph states it:

- fused form: `num_heads` (and `kv_num_heads`) of MultiHeadAttention / GroupQueryAttention,
  `num_heads` of the RotaryEmbedding ops feeding them;
- plain form: every Reshape, Expand, Split and Slice between the projections, the scores and
  the head merge gets shapes for the kept heads (static sizes where they are static, `0` to copy
  a batch or sequence dimension, `-1` for one, or sizes read at run time);
- per-head biases added to the scores (T5's and Swin's relative position biases) keep the kept
  heads' rows.

Grouped-query attention (fewer key/value heads) prunes whole groups: a key/value head and the
query heads that read it. Importance per head (per group): the L2 (or L1) norm of its Q/K/V
columns and output-projection rows. A head whose output-projection rows (or V columns and V bias)
are all zero contributes nothing: its score is 0, it goes first, and removing it is exact.
`ratio` is the fraction of heads (groups) removed per attention block (at least one stays). The
output shapes never change (the output projection keeps its width).

Approximate (`exact = False`) in general; exact for dead heads (tested).
Source: Michel et al. 2019, "Are Sixteen Heads Really Better than One?" (head importance and
pruning); Torch-Pruning's head groups (where `num_heads` must be fixed by hand).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from slimgraph.errors import BadOptionError
from slimgraph.passes._kit import Names, add_initializer, constant_array
from slimgraph.passes.base import Skipped, SlimgraphFunctionalPass, SlimgraphPassResult
from slimgraph.passes.prune import prepare_for_pruning
from slimgraph.passes.registry import register_pass
from slimgraph.passes.transformer._emit import MS_DOMAIN
from slimgraph.passes.transformer._headsites import (
    FUSED_OPS,
    HeadSite,
    Move,
    Weight,
    alive,
    new_sizes,
    site_of_fused,
    site_of_match,
)
from slimgraph.passes.transformer._layout import Layout
from slimgraph.passes.transformer._match import NoMatch, find_attention
from slimgraph.passes.transformer._symbolic import ShapeInfo

__all__ = ["HeadReport", "PruneHeadsResult", "PruneHeadsPass", "prune_heads", "CRITERIA",
           "head_sites"]

logger = logging.getLogger(__name__)

CRITERIA = ("l2", "l1")


@dataclasses.dataclass(frozen=True)
class HeadReport:
    """One attention block: query heads before and after, which were removed, their scores
    (a grouped-query block's heads share their group's score)."""

    node: str
    heads: int
    kept: int
    removed: tuple[int, ...]
    scores: tuple[float, ...]


@dataclasses.dataclass
class PruneHeadsResult(SlimgraphPassResult):
    blocks: list[HeadReport] = dataclasses.field(default_factory=list)


def head_sites(graph: ir.Graph, shapes: ShapeInfo | None = None) -> tuple[
        list[HeadSite], list[Skipped]]:
    """Every attention block of `graph` as a `HeadSite` (plain or fused), and those that head
    pruning cannot edit, with the reason."""
    shapes = shapes or ShapeInfo()
    sites, skipped = [], []
    matches, failed = find_attention(graph, shapes)
    skipped += [Skipped(n.name or "Softmax", "Softmax", reason) for n, reason in failed]
    for match in matches:
        try:
            sites.append(site_of_match(match, shapes))
        except NoMatch as reason:
            skipped.append(Skipped(match.name, "Softmax", str(reason)))
    for node in graph:
        if node.domain == MS_DOMAIN and node.op_type in FUSED_OPS:
            try:
                sites.append(site_of_fused(node, shapes))
            except NoMatch as reason:
                skipped.append(Skipped(node.name or node.op_type, node.op_type, str(reason)))
    return sites, skipped


def _unit_columns(site: HeadSite, unit: int) -> dict[str, list[int]]:
    """Projection columns of one pruning unit (a head, or a key/value group) per operand."""
    group = range(unit * site.repeat, (unit + 1) * site.repeat)
    return {
        "q": [c for h in group for c in site.q[1][h]],
        "k": list(site.k[1][unit]),
        "v": list(site.v[1][unit]),
    }


def _out_rows(site: HeadSite, heads: list[int]) -> list[int]:
    size = site.v_head_size
    return [h * size + j for h in heads for j in range(size)]


def _scores(site: HeadSite, criterion: str) -> np.ndarray:
    units = site.kv_heads
    out = site.out.array()
    scores = np.zeros(units)
    for unit in range(units):
        columns = _unit_columns(site, unit)
        chunks = []
        for role in ("q", "k", "v"):
            projection = getattr(site, role)[0]
            for w in projection.weights:
                chunks.append(np.take(w.array(), columns[role], axis=w.axis).ravel())
        heads = list(range(unit * site.repeat, (unit + 1) * site.repeat))
        rows = np.take(out, _out_rows(site, heads), axis=site.out.axis)
        chunks.append(rows.ravel())
        values = np.concatenate(chunks).astype(np.float64)
        score = np.abs(values).sum() if criterion == "l1" else np.sqrt((values ** 2).sum())
        v_dead = all(not np.any(np.take(w.array(), columns["v"], axis=w.axis))
                     for w in site.v[0].weights)
        scores[unit] = 0.0 if v_dead or not np.any(rows) else score
    return scores


# ------------------------------------------------------------------------------- rewriting


def _slice(graph: ir.Graph, names: Names, w: Weight, keep: np.ndarray) -> None:
    old = w.node.inputs[w.index]
    assert old is not None
    array = np.ascontiguousarray(np.take(w.array(), keep, axis=w.axis))
    w.node.replace_input_with(w.index, add_initializer(
        graph, names.fresh(f"{old.name or 'weight'}_heads"), array))


def _kept_positions(site: HeadSite, removed_units: list[int]) -> dict[tuple[str, int], np.ndarray]:
    """Per reference (projection output, scores, merged heads): which positions stay."""
    kept: dict[tuple[str, int], np.ndarray] = {}
    for ref, (_, width) in site.refs.items():
        kept[ref] = np.ones(width, bool)
    removed_heads = [h for u in removed_units for h in range(u * site.repeat,
                                                               (u + 1) * site.repeat)]
    for unit in removed_units:
        columns = _unit_columns(site, unit)
        for role in ("q", "k", "v"):
            projection = getattr(site, role)[0]
            kept[("proj", id(projection.output))][columns[role]] = False
    for ref in kept:
        if ref[0] == "Z":
            kept[ref][removed_heads] = False
        elif ref[0] == "Y":
            kept[ref][_out_rows(site, removed_heads)] = False
    return kept


def _restate(graph: ir.Graph, names: Names, move: Move, site: HeadSite,
             kept: dict[tuple[str, int], np.ndarray], done: set[int]) -> None:
    """Give `move` the shapes it needs once only the kept positions remain."""
    axis, _ = site.refs[move.ref]
    mask = kept[move.ref]
    node = move.node
    if id(node) in done:
        return
    if node.op_type in ("Reshape", "Flatten"):
        if node.op_type == "Flatten":
            return  # Flatten's axis states no head count
        done.add(id(node))
        dims = _reshape_dims(move, axis, mask)
        if dims is None:
            return
        value = _shape_value(graph, names, node, move, dims, new_sizes(move.before, axis, mask),
                             new_sizes(move.after, axis, mask))
        node.replace_input_with(1, value)
        node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
    elif node.op_type == "Expand":
        done.add(id(node))
        target = []
        rank = move.after.rank
        before = [()] * (rank - move.before.rank) + list(move.before.axes)
        for atoms, previous in zip(move.after.axes, before, strict=True):
            fresh = [a for a in atoms if a.axis is None and a not in previous]
            target.append(int(np.prod([a.size.coef for a in fresh])) if fresh else 1)
        node.replace_input_with(1, add_initializer(graph, names.fresh("heads_expand"),
                                                   np.array(target, np.int64)))
    elif node.op_type in ("Split", "Slice", "Gather"):
        _restate_range(graph, names, move, axis, mask, done)


def _reshape_dims(move: Move, axis: int, mask: np.ndarray) -> list[int | None] | None:
    """New Reshape target per output axis: an int, 0 (copy the same input axis) or None
    (symbolic, filled by `_shape_value`); None when nothing changes."""
    sizes = new_sizes(move.after, axis, mask)
    if not sizes or all(move.after.flat()[i].size.coef == n for i, n in sizes.items()):
        return None
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


def _shape_value(graph: ir.Graph, names: Names, node: ir.Node, move: Move,
                 dims: list[int | None], before_sizes: dict[int, int],
                 after_sizes: dict[int, int]) -> ir.Value:
    if dims.count(None) <= 1:
        array = np.array([-1 if d is None else d for d in dims], np.int64)
        return add_initializer(graph, names.fresh("heads_shape"), array)
    # several symbolic axes: each symbolic size read at run time from the input's shape
    source = node.inputs[0]
    assert source is not None
    plan = _runtime_dims(move, dims, before_sizes, after_sizes)
    pieces: list[ir.Value] = []
    for out_axis, parts in enumerate(plan):
        if dims[out_axis] is not None:
            pieces.append(add_initializer(graph, names.fresh("heads_dim"),
                                          np.array([dims[out_axis]], np.int64)))
            continue
        value: ir.Value | None = None
        static = 1
        for part in parts:
            if isinstance(part, int):
                static *= part
                continue
            axis, divisor = part
            piece = _insert(graph, names, node, "Shape", [source], start=axis, end=axis + 1)
            if divisor != 1:
                piece = _insert(graph, names, node, "Div", [piece, add_initializer(
                    graph, names.fresh("heads_divisor"), np.array([divisor], np.int64))])
            value = piece if value is None else _insert(graph, names, node, "Mul",
                                                        [value, piece])
        assert value is not None
        if static != 1:
            value = _insert(graph, names, node, "Mul", [value, add_initializer(
                graph, names.fresh("heads_factor"), np.array([static], np.int64))])
        pieces.append(value)
    return _insert(graph, names, node, "Concat", pieces, axis=0)


def _runtime_dims(move: Move, dims: list[int | None], before_sizes: dict[int, int],
                  after_sizes: dict[int, int]) -> list[list[int | tuple[int, int]]]:
    """For each output axis, its size as parts: static ints, or (input axis, divisor): the
    input's run-time size on that axis divided by the (new, static) sizes of the other atoms
    sharing it.

    Raises:
        NoMatch: a symbolic size that no input axis holds with only static companions.
    """
    flat_before = move.before.flat()
    index_of = {id(a): i for i, a in enumerate(flat_before)}
    plan: list[list[int | tuple[int, int]]] = []
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
        plan.append(parts)
    return plan


def _insert(graph: ir.Graph, names: Names, before: ir.Node, op: str, inputs: list[ir.Value],
            **attrs: int) -> ir.Value:
    node = ir.node(op, inputs, attributes=attrs, name=names.fresh(f"heads_{op}"))
    node.outputs[0].name = names.fresh(f"heads_{op.lower()}")
    graph.insert_before(before, node)
    return node.outputs[0]


def _restate_range(graph: ir.Graph, names: Names, move: Move, axis: int, mask: np.ndarray,
                   done: set[int]) -> None:
    """Split sizes / Slice bounds / Gather index on a head-bearing axis, in kept positions."""
    node = move.node
    layout: Layout = move.before
    data_axis = node.attributes.get_int("axis", 0) % layout.rank if node.op_type != "Slice" \
        else None
    if node.op_type == "Slice":
        axes = constant_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
        data_axis = int(axes.reshape(-1)[0]) % layout.rank if axes is not None else 0
    assert data_axis is not None
    atoms = layout.axes[data_axis]
    if len(atoms) != 1 or atoms[0].axis != axis:
        return
    atom = atoms[0]
    index = next(i for i, a in enumerate(layout.flat()) if a is atom)
    rank = np.concatenate([[0], np.cumsum(alive(layout, axis, mask)[index])])
    if node.op_type == "Split":
        if id(node) in done:
            return
        done.add(id(node))
        sizes = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] \
            else None
        if sizes is None:
            count = len(node.outputs)
            sizes = np.full(count, atom.size.coef // count)
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        new = [int(rank[b] - rank[a]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        value = add_initializer(graph, names.fresh("heads_split"), np.array(new, np.int64))
        node.attributes.pop("num_outputs", None)
        if len(node.inputs) < 2:
            node.resize_inputs(2)
        node.replace_input_with(1, value)
    elif node.op_type == "Slice":
        done.add(id(node))
        starts, ends = constant_array(node.inputs[1]), constant_array(node.inputs[2])
        if starts is None or ends is None:
            raise NoMatch("Slice of heads with bounds not constant")
        start, end, _ = slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])).indices(
            atom.size.coef)
        for index, bound in ((1, rank[start]), (2, rank[end])):
            node.replace_input_with(index, add_initializer(
                graph, names.fresh("heads_slice"), np.array([bound], np.int64)))
    else:
        done.add(id(node))
        selected = constant_array(node.inputs[1])
        if selected is None:
            raise NoMatch("Gather of heads with an index not constant")
        position = int(selected.reshape(-1)[0]) % atom.size.coef
        node.replace_input_with(1, add_initializer(
            graph, names.fresh("heads_gather"), np.array(rank[position], np.int64).reshape(
                selected.shape)))


def _check(site: HeadSite, removed_units: list[int]) -> None:
    """Raise NoMatch, before anything changes, when a move cannot be restated."""
    kept = _kept_positions(site, removed_units)
    for move in site.moves:
        axis, _ = site.refs[move.ref]
        before = new_sizes(move.before, axis, kept[move.ref])
        if move.node.op_type == "Reshape":
            dims = _reshape_dims(move, axis, kept[move.ref])
            if dims is not None and dims.count(None) > 1:
                _runtime_dims(move, dims, before, new_sizes(move.after, axis, kept[move.ref]))


def _rewrite(graph: ir.Graph, names: Names, site: HeadSite, removed_units: list[int],
             done: set[int]) -> None:
    kept = _kept_positions(site, removed_units)
    for move in site.moves:
        _restate(graph, names, move, site, kept, done)
    seen: set[int] = set()
    for role in ("q", "k", "v"):
        projection = getattr(site, role)[0]
        if id(projection.output) in seen:
            continue
        seen.add(id(projection.output))
        keep = np.flatnonzero(kept[("proj", id(projection.output))])
        for weight in projection.weights:
            _slice(graph, names, weight, keep)
    removed_heads = [h for u in removed_units for h in range(u * site.repeat,
                                                               (u + 1) * site.repeat)]
    kept_heads = [h for h in range(site.heads) if h not in removed_heads]
    rows = _out_rows(site, kept_heads)
    _slice(graph, names, site.out, np.array(rows))
    new_heads, new_kv = len(kept_heads), site.kv_heads - len(removed_units)
    if site.fused is not None:
        site.fused.attributes["num_heads"] = ir.AttrInt64("num_heads", new_heads)
        if "kv_num_heads" in site.fused.attributes:
            site.fused.attributes["kv_num_heads"] = ir.AttrInt64("kv_num_heads", new_kv)
    for node, role in site.rotary_ops:
        count = new_heads if role == "q" else new_kv
        node.attributes["num_heads"] = ir.AttrInt64("num_heads", count)
    for consumer, index, axis in site.head_biases:
        value = consumer.inputs[index]
        assert value is not None
        indices = add_initializer(graph, names.fresh("heads_kept"),
                                  np.array(kept_heads, np.int64))
        gathered = _insert(graph, names, consumer, "Gather", [value, indices], axis=axis)
        consumer.replace_input_with(index, gathered)


def _refresh_shapes(model: ir.Model, sites: list[HeadSite]) -> None:
    """Shapes again after the head counts changed: inferred where onnx can (the base pass
    restores the symbolic names), set by hand on the fused ops' outputs."""
    fused = {}
    for node in model.graph:
        if node.domain == MS_DOMAIN:
            fused[id(node)] = [(o.shape, o.type) for o in node.outputs]
            continue
        for value in node.outputs:
            value.shape = None
    ir_common.RemoveUnusedNodesPass()(model)
    ir_common.ShapeInferencePass(strict_mode=False)(model)
    for site in sites:
        if site.fused is None:
            continue
        out = site.fused.outputs[0]
        heads = site.fused.attributes.get_int("num_heads", site.heads)
        query = site.fused.inputs[0]
        if query is not None and query.shape is not None and len(query.shape) == 3:
            out.shape = ir.Shape([query.shape[0], query.shape[1], heads * site.v_head_size])


@register_pass("prune-heads", exact=False)
class PruneHeadsPass(SlimgraphFunctionalPass):
    """Remove the least important `ratio` of the heads of every attention block (see the module
    docstring); approximate, exact for dead heads.

    Args:
        ratio: fraction of each block's heads to remove, in [0, 1); at least one head stays.
        criterion: "l2" or "l1" norm of the head's weights.
        dead_only: remove only heads that contribute nothing (exact), whatever the ratio.
    """

    exact: ClassVar[bool] = False

    def __init__(self, *, ratio: float = 0.5, criterion: str = "l2",
                 dead_only: bool = False) -> None:
        super().__init__()
        self.ratio, self.criterion, self.dead_only = ratio, criterion, dead_only

    def requires(self, model: ir.Model) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise BadOptionError(f"head ratio must be in [0, 1) (got {self.ratio})")
        if self.criterion not in CRITERIA:
            raise BadOptionError(
                f"unknown head importance '{self.criterion}' (choose {', '.join(CRITERIA)})")

    def call(self, model: ir.Model) -> PruneHeadsResult:
        pruned = prepare_for_pruning(model)  # a copy
        graph = pruned.graph
        names = Names(graph)
        sites, skipped = head_sites(graph)
        blocks = []
        done: set[int] = set()
        rewritten = []
        for site in sites:
            scores = _scores(site, self.criterion)
            order = list(np.argsort(scores, kind="stable"))
            units = site.kv_heads
            if self.dead_only:
                removed = [u for u in order if scores[u] == 0.0][: units - 1]
            else:
                count = min(int(np.floor(units * self.ratio + 1e-9)), units - 1)
                removed = order[:count]
            removed = sorted(int(u) for u in removed)
            heads_removed = tuple(h for u in removed
                                  for h in range(u * site.repeat, (u + 1) * site.repeat))
            if removed:
                try:
                    _check(site, removed)
                except NoMatch as reason:
                    skipped.append(Skipped(site.name, "attention", str(reason)))
                    continue
                _rewrite(graph, names, site, removed, done)
                rewritten.append(site)
            per_head = tuple(float(scores[h // site.repeat]) for h in range(site.heads))
            blocks.append(HeadReport(site.name, site.heads, site.heads - len(heads_removed),
                                     heads_removed, per_head))
            logger.info("%s: %d -> %d heads", site.name, site.heads,
                        site.heads - len(heads_removed))
        modified = bool(rewritten)
        if modified:
            _refresh_shapes(pruned, rewritten)
        return PruneHeadsResult(pruned, modified, skipped=skipped, blocks=blocks)


def prune_heads(model: ir.Model, ratio: float = 0.5, *, criterion: str = "l2",
                dead_only: bool = False) -> PruneHeadsResult:
    """Remove attention heads from a copy of `model`; see `PruneHeadsPass`.

    Example:
        >>> result = prune_heads(model, 0.5)  # doctest: +SKIP
        >>> [(b.heads, b.kept) for b in result.blocks]  # doctest: +SKIP
    """
    result = PruneHeadsPass(ratio=ratio, criterion=criterion, dead_only=dead_only)(model)
    assert isinstance(result, PruneHeadsResult)
    return result
