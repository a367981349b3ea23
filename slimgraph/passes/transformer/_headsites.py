"""Where each attention head lives: projection columns, output rows, head counts in the graph.

A `HeadSite` is one attention block seen from head pruning, built from an `AttentionMatch`
(plain ops) or from a fused op (MultiHeadAttention / GroupQueryAttention that `fuse-attention`
wrote):

- `q`, `k`, `v`: the projection each operand comes from (`Projection`: its output, the constant
  weight and bias whose axis runs over the output features) and, per head (per key/value head
  for k and v), the projection columns it owns;
- `out`: the output projection's weight and the rows each head's values feed;
- `moves`: every data movement between the projections, the core and the output projection
  whose shape constants state a head count (the head split and merge Reshapes, a packed Split,
  the Expand that repeats key/value heads, a Reshape of the scores), each with its input and
  output layout relative to a *reference*: a projection's output, the scores [B, N, S, T] or
  the merged heads [B, S, N * Hv]; `restate` turns a layout into the new sizes once heads go;
- `fused`: the fused op whose `num_heads`/`kv_num_heads` follow; `rotary_ops`: RotaryEmbedding
  ops and which heads they rotate; `head_biases`: per-head bias inputs (relative position
  biases, [B|1, N, S, T]) to keep only the kept heads' rows of.

A block that head pruning cannot edit raises `NoMatch` with the reason.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx_ir as ir

from slimgraph.ir import layer_name
from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes._kit import constant_array
from slimgraph.passes.transformer._emit import MS_DOMAIN, bias_plan
from slimgraph.passes.transformer._layout import Atom, Layout, LayoutError, is_move, step
from slimgraph.passes.transformer._match import AttentionMatch, NoMatch, Operand
from slimgraph.passes.transformer._symbolic import ShapeInfo

__all__ = ["Weight", "Projection", "Move", "HeadSite", "site_of_match", "site_of_fused",
           "new_sizes", "alive", "FUSED_OPS"]

FUSED_OPS = ("MultiHeadAttention", "GroupQueryAttention")


@dataclasses.dataclass(frozen=True)
class Weight:
    """Input `index` of `node`, a constant whose `axis` runs over some feature positions."""

    node: ir.Node
    index: int
    axis: int

    def array(self) -> np.ndarray:
        array = constant_array(self.node.inputs[self.index])
        assert array is not None
        return array


@dataclasses.dataclass
class Projection:
    """A projection's output (features last) and its weight (+ bias) over those features."""

    output: ir.Value
    weights: list[Weight]
    width: int


@dataclasses.dataclass
class Move:
    """A data movement whose shape constants follow the head count (see the module doc)."""

    node: ir.Node
    ref: tuple[str, int]
    before: Layout
    after: Layout


@dataclasses.dataclass
class HeadSite:
    name: str
    heads: int
    kv_heads: int
    head_size: int
    v_head_size: int
    q: tuple[Projection, list[list[int]]]
    k: tuple[Projection, list[list[int]]]
    v: tuple[Projection, list[list[int]]]
    out: Weight
    moves: list[Move]
    refs: dict[tuple[str, int], tuple[int, int]]  # ref -> (head-bearing axis, width)
    fused: ir.Node | None = None
    rotary_ops: list[tuple[ir.Node, str]] = dataclasses.field(default_factory=list)
    head_biases: list[tuple[ir.Node, int, int]] = dataclasses.field(default_factory=list)

    @property
    def repeat(self) -> int:
        return self.heads // self.kv_heads


# ------------------------------------------------------------------------------- projections


def _projection(value: ir.Value) -> tuple[Projection, list[ir.Node]]:
    """The projection `value` comes from through Reshapes that keep its last axis; returns it
    and those Reshapes (nearest the projection last)."""
    moves: list[ir.Node] = []
    current = value
    while (node := current.producer()) is not None and is_onnx_op(node, "Reshape", "Identity"):
        moves.append(node)
        assert node.inputs[0] is not None
        current = node.inputs[0]
    if node is None:
        raise NoMatch("operand is not computed by a projection")
    weights: list[Weight] = []
    if is_onnx_op(node, "Add"):
        for i in (0, 1):
            other, inner = node.inputs[1 - i], node.inputs[i]
            bias = constant_array(other)
            producer = inner.producer() if inner is not None else None
            if bias is not None and bias.ndim == 1 and producer is not None and is_onnx_op(
                    producer, "MatMul", "Gemm"):
                weights.append(Weight(node, 1 - i, 0))
                node = producer
                break
        else:
            raise NoMatch("projection Add without a constant 1-D bias")
    if is_onnx_op(node, "MatMul"):
        weight = constant_array(node.inputs[1])
        if weight is None or weight.ndim != 2:
            raise NoMatch("projection weight is not a constant matrix")
        weights.insert(0, Weight(node, 1, 1))
    elif is_onnx_op(node, "Gemm"):
        weight = constant_array(node.inputs[1])
        if weight is None or weight.ndim != 2 or node.attributes.get_int("transA", False):
            raise NoMatch("projection Gemm without a constant weight")
        weights.insert(0, Weight(node, 1, 0 if node.attributes.get_int("transB", False) else 1))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant_array(node.inputs[2])
            if bias is None or bias.ndim != 1:
                raise NoMatch("projection Gemm bias is not a constant vector")
            weights.append(Weight(node, 2, 0))
    else:
        raise NoMatch(f"operand comes from {node.op_type}, not from a projection")
    width = int(weights[0].array().shape[weights[0].axis])
    return Projection(current, weights, width), moves


def _chain_moves(start: ir.Value, steps: list[tuple[ir.Node, ir.Value]], ref: tuple[str, int],
                 shapes: ShapeInfo) -> tuple[list[Move], Layout]:
    """Moves of `steps` ((node, output) in data order from `start`), layouts relative to
    `start`."""
    dims = shapes.shape(start)
    if dims is None:
        raise NoMatch("shape unknown")
    layout = Layout.identity(dims)
    moves = []
    for node, out in steps:
        try:
            after = step(layout, node, out, shapes)
        except LayoutError as error:
            raise NoMatch(f"cannot follow {node.op_type} ({error})") from None
        moves.append(Move(node, ref, layout, after))
        layout = after
    return moves, layout


def _from_operand(operand: Operand, shapes: ShapeInfo) -> tuple[
        tuple[Projection, list[list[int]]], list[Move]]:
    projection, pre = _projection(operand.source)
    ref = ("proj", id(projection.output))
    steps = [(n, n.outputs[0]) for n in reversed(pre)] + [
        (link.node, link.value) for link in reversed(operand.links) if link.kind == "move"]
    moves, _ = _chain_moves(projection.output, steps, ref, shapes)
    # the source's feature axis must be the projection's features, unchanged
    if pre:
        source_layout = moves[len(pre) - 1].after
        atoms = source_layout.axes[operand.feature_axis]
        if len(atoms) != 1 or atoms[0].stride.coef != 1 or atoms[0].size.coef != (
                projection.width) or any(source_layout.offsets):
            raise NoMatch("the projection's features are moved before the head split")
    columns = [list(operand.columns(h)) for h in range(operand.heads)]
    return (projection, columns), moves


def _out_weight(value: ir.Value) -> Weight:
    uses = list(value.uses())
    if value.is_graph_output() or len(uses) != 1 or uses[0].idx != 0:
        raise NoMatch("attention output is not read by one output projection")
    node = uses[0].node
    weight = constant_array(node.inputs[1]) if is_onnx_op(node, "MatMul", "Gemm") else None
    if weight is None or weight.ndim != 2:
        raise NoMatch("attention output does not feed a projection with a constant weight")
    if node.op_type == "Gemm":
        return Weight(node, 1, 1 if node.attributes.get_int("transB", 0) else 0)
    return Weight(node, 1, 0)


def _between(start: ir.Value, end: ir.Value) -> set[int]:
    """Ids of the nodes on some path from `start` to `end` (a rotary embedding's insides)."""
    on_path: dict[int, bool] = {}

    def reaches(value: ir.Value, depth: int = 0) -> bool:
        if value is start:
            return True
        node = value.producer()
        if node is None or depth > 40:
            return False
        if id(node) not in on_path:
            on_path[id(node)] = False
            hits = [reaches(v, depth + 1) for v in node.inputs if v is not None]  # no short cut
            on_path[id(node)] = any(hits)
        return on_path[id(node)]

    reaches(end)
    return {key for key, hit in on_path.items() if hit}


def _nodes_of(end: ir.Value, ids: set[int]) -> list[ir.Node]:
    """The nodes whose ids are in `ids`, found walking back from `end`."""
    found: dict[int, ir.Node] = {}
    frontier = [end]
    while frontier:
        node = frontier.pop().producer()
        if node is None or id(node) in found or id(node) not in ids:
            continue
        found[id(node)] = node
        frontier += [v for v in node.inputs if v is not None]
    return list(found.values())


def _shape_reader(node: ir.Node, index: int, depth: int = 0) -> bool:
    """Whether `node` reads only the shape or type of its input `index` (Shape, CastLike's
    target, moves and Splits feeding only such readers): it reads the pruned tensor's own
    sizes at run time, which stay right."""
    if node.op_type in ("Shape", "Size") or (node.op_type == "CastLike" and index == 1):
        return True
    # moves that state no size (a Reshape or Expand would keep the old head count and fail)
    if depth > 6 or node.op_type not in ("Transpose", "Identity", "Unsqueeze", "Squeeze"):
        return False
    return all(not out.is_graph_output() and all(_shape_reader(u.node, u.idx, depth + 1)
                                                 for u in out.uses()) for out in node.outputs)


def _private(site: HeadSite, values: list[ir.Value], inside: set[int]) -> None:
    """Raise NoMatch when a value the head counts flow through is also read elsewhere (a
    relative-position term computed from the split heads, a cache output): pruning would
    change its shape under that reader."""
    del site
    for value in values:
        if value.is_graph_output():
            raise NoMatch("a value carrying the heads is a graph output")
        for use in value.uses():
            if id(use.node) not in inside and not _shape_reader(use.node, use.idx):
                raise NoMatch(f"the heads' values are also read outside the attention (by "
                              f"{use.node.op_type})")


def _core_moves(layout: Layout, nodes: list[ir.Node], ref: tuple[str, int],
                shapes: ShapeInfo) -> list[Move]:
    moves = []
    for node in nodes:
        if is_move(node):
            after = step(layout, node, node.outputs[0], shapes)
            moves.append(Move(node, ref, layout, after))
            layout = after
    return moves


def site_of_match(match: AttentionMatch, shapes: ShapeInfo) -> HeadSite:
    """The head site of an unfused attention.

    Raises:
        NoMatch: a part head pruning cannot edit (the reason says which).
    """
    moves: list[Move] = []
    parts = {}
    refs: dict[tuple[str, int], tuple[int, int]] = {}
    for operand in (match.q, match.k, match.v):
        part, chain = _from_operand(operand, shapes)
        parts[operand.role] = part
        refs[("proj", id(part[0].output))] = (len(part[0].output.shape or ()) - 1,
                                              part[0].width)
        moves += [m for m in chain if m.node not in {x.node for x in moves}]
    z_ref, y_ref = ("Z", id(match)), ("Y", id(match))
    refs[z_ref] = (1, match.heads)
    refs[y_ref] = (2, match.heads * match.v.head_size)
    assert match.scores_layout is not None and match.context_layout is not None
    moves += _core_moves(match.scores_layout, [*match.score_nodes, *match.prob_nodes], z_ref,
                         shapes)
    moves += _core_moves(match.context_layout, match.merge_nodes, y_ref, shapes)
    last = match.output_layout.axes[-1] if match.output_layout.axes else ()
    if len(last) != 1 or last[0] != Atom(2, last[0].size, last[0].stride) or (
            last[0].stride.coef != 1 or last[0].size.coef != refs[y_ref][1]):
        raise NoMatch("the merged heads are not the last axis of the output projection's input")
    biases = []
    for term in match.bias:
        if term.fill is not None:
            continue
        plan = bias_plan(term, shapes)
        if not plan.z[1]:
            continue
        axes = [i for i, atoms in enumerate(term.layout.axes) if any(a.axis == 1 for a in atoms)]
        if len(axes) != 1 or len(term.layout.axes[axes[0]]) != 1:
            raise NoMatch("a per-head bias merged with another axis")
        consumer = next(u for u in term.value.uses() if u.node in match.score_nodes)
        biases.append((consumer.node, consumer.idx, axes[0] - plan.pad))
    site = HeadSite(match.name, match.heads, match.kv_heads, match.head_size,
                    match.v.head_size, parts["q"], parts["k"], parts["v"],
                    _out_weight(match.output), moves, refs, head_biases=biases)
    inside = {id(n) for n in match.nodes} | {id(m.node) for m in moves}
    values = []
    for operand in (match.q, match.k, match.v):
        inside |= {id(link.node) for link in operand.links}
        for link in operand.links:
            values.append(link.source)
            if link.rotary is not None:  # its insides, reached from any value before it
                insides = _between(operand.source, link.value)
                if any(n.op_type in ("Reshape", "Expand") for n in link.rotary.nodes) or any(
                        node.op_type in ("Reshape", "Expand") and id(node) in insides
                        and node not in {x.node for x in operand.links}
                        for node in _nodes_of(link.value, insides)):
                    raise NoMatch("a rotary embedding whose own Reshapes state the head count "
                                  "(interleaved pairs): fuse first, then prune")
                inside |= insides
        values += [link.value for link in operand.links]
        values.append(getattr(site, operand.role)[0].output)
    _private(site, values, inside)
    return site


def site_of_fused(node: ir.Node, shapes: ShapeInfo) -> HeadSite:
    """The head site of a MultiHeadAttention / GroupQueryAttention written by fuse-attention.

    Raises:
        NoMatch: a part head pruning cannot edit.
    """
    heads = node.attributes.get_int("num_heads", 0)
    kv_heads = node.attributes.get_int("kv_num_heads", heads) or heads
    q3, k3, v3 = (node.inputs[i] if len(node.inputs) > i else None for i in range(3))
    if not heads or q3 is None or k3 is None or v3 is None or (
            node.op_type == "MultiHeadAttention" and len(node.inputs) > 3 and node.inputs[3]):
        raise NoMatch(f"{node.op_type} with packed inputs or a bias input")
    moves: list[Move] = []
    refs: dict[tuple[str, int], tuple[int, int]] = {}
    parts: dict[str, tuple[Projection, list[list[int]]]] = {}
    rotary_ops: list[tuple[ir.Node, str]] = []
    sizes = {}
    for role, value in (("q", q3), ("k", k3), ("v", v3)):
        chain: list[ir.Node] = []
        current = value
        while (producer := current.producer()) is not None and (
                is_move(producer) or (producer.domain == MS_DOMAIN
                                      and producer.op_type == "RotaryEmbedding")):
            if producer.op_type == "RotaryEmbedding":
                rotary_ops.append((producer, role))
            else:
                chain.append(producer)
            assert producer.inputs[0] is not None
            current = producer.inputs[0]
        projection, pre = _projection(current)
        ref = ("proj", id(projection.output))
        refs[ref] = (len(projection.output.shape or ()) - 1, projection.width)
        steps = [(n, n.outputs[0]) for n in reversed(pre)] + [
            (n, _output_toward(n, value)) for n in reversed(chain)]
        chain_moves, layout = _chain_moves(projection.output, steps, ref, shapes)
        moves += [m for m in chain_moves if m.node not in {x.node for x in moves}]
        columns = _feature_positions(layout, projection)
        count = kv_heads if role != "q" and node.op_type == "GroupQueryAttention" else heads
        if len(columns) % count:
            raise NoMatch(f"{role} features do not divide into {count} heads")
        per_head = len(columns) // count
        distinct: list[list[int]] = []
        for i in range(0, len(columns), per_head):
            if columns[i:i + per_head] not in distinct:
                distinct.append(columns[i:i + per_head])
        parts[role] = (projection, distinct)
        sizes[role] = per_head
    kv_heads = len(parts["k"][1])
    if len(parts["v"][1]) != kv_heads or heads % kv_heads:
        raise NoMatch("key and value heads are not whole groups of the query heads")
    y_ref = ("Y", id(node))
    refs[y_ref] = (2, heads * sizes["v"])
    output = node.outputs[0]
    out_nodes = []
    while (uses := list(output.uses())) and len(uses) == 1 and is_move(uses[0].node) and (
            not output.is_graph_output()):
        out_nodes.append(uses[0].node)
        output = uses[0].node.outputs[0]
    y_moves, _ = _chain_moves(node.outputs[0], [(n, n.outputs[0]) for n in out_nodes], y_ref,
                              shapes)
    moves += y_moves
    biases = []
    bias_index = 10 if node.op_type == "GroupQueryAttention" else 5
    if len(node.inputs) > bias_index and node.inputs[bias_index] is not None:
        dims = shapes.shape(node.inputs[bias_index])
        if dims is not None and len(dims) == 4 and dims[1].static and dims[1].coef == heads:
            biases.append((node, bias_index, 1))
    site = HeadSite(layer_name(node) or node.name or node.op_type, heads, kv_heads,
                    sizes["q"], sizes["v"], parts["q"], parts["k"], parts["v"],
                    _out_weight(output), moves, refs, fused=node, rotary_ops=rotary_ops,
                    head_biases=biases)
    inside = {id(node)} | {id(m.node) for m in moves} | {id(r) for r, _ in rotary_ops}
    values = [m.node.outputs[0] for m in moves if m.node.op_type != "Split"]
    values += [out for m in moves if m.node.op_type == "Split" for out in m.node.outputs
               if any(True for _ in out.uses())]
    values += [r.outputs[0] for r, _ in rotary_ops]
    values += [getattr(site, role)[0].output for role in ("q", "k", "v")]
    _private(site, [v for v in values if v is not output], inside | {
        id(u.node) for u in output.uses()})
    return site


def _output_toward(node: ir.Node, value: ir.Value) -> ir.Value:
    """The output of `node` on the way to `value` (a Split has several)."""
    if len(node.outputs) == 1:
        return node.outputs[0]
    frontier = [value]
    seen = set()
    while frontier:
        current = frontier.pop()
        if current in node.outputs:
            return current
        producer = current.producer()
        if producer is None or id(producer) in seen:
            continue
        seen.add(id(producer))
        frontier += [v for v in producer.inputs if v is not None]
    return node.outputs[0]


def _feature_positions(layout: Layout, projection: Projection) -> list[int]:
    """The projection column of each position of the last axis (repeats included)."""
    atoms = layout.axes[-1]
    positions = [0]
    for atom in atoms:
        if not atom.size.static or not atom.stride.static:
            raise NoMatch("head positions not static")
        stride = 0 if atom.axis is None else atom.stride.coef
        positions = [p + stride * i for p in positions for i in range(atom.size.coef)]
    axis = next((a.axis for a in atoms if a.axis is not None), None)
    offset = layout.offsets[axis] if axis is not None else 0
    if any(a.axis not in (axis, None) for a in atoms):
        raise NoMatch("the fused op's input mixes features with other axes")
    return [offset + p for p in positions if offset + p < projection.width]


# ------------------------------------------------------------------------------- new sizes


def alive(layout: Layout, ref_axis: int, kept: np.ndarray) -> dict[int, np.ndarray]:
    """For each atom of `layout` on the reference's head-bearing axis (by index in
    `layout.flat()`), which of its indices still hold a kept position once only the `kept`
    positions of that axis remain.

    Raises:
        NoMatch: the kept positions are not a product of per-atom index sets (a move that
            mixes a pruned head with a kept one).
    """
    flat = layout.flat()
    mine = [(i, a) for i, a in enumerate(flat) if a.axis == ref_axis]
    if not mine:
        return {}
    if any(not a.size.static or not a.stride.static for _, a in mine):
        raise NoMatch("symbolic head positions")
    base = layout.offsets[ref_axis]
    grids = [range(a.size.coef) for _, a in mine]
    mask = np.zeros([a.size.coef for _, a in mine], bool)
    for index in itertools.product(*grids):
        position = base + sum(a.stride.coef * i for (_, a), i in zip(mine, index, strict=True))
        mask[index] = position < kept.size and kept[position]
    out: dict[int, np.ndarray] = {}
    product = np.ones((), bool)
    for k, (i, _) in enumerate(mine):
        others = tuple(j for j in range(len(mine)) if j != k)
        out[i] = np.asarray(mask.any(axis=others) if others else mask)
        product = np.multiply.outer(product, out[i])
    if not np.array_equal(product, mask):
        raise NoMatch("a data movement mixes pruned and kept heads")
    return out


def new_sizes(layout: Layout, ref_axis: int, kept: np.ndarray) -> dict[int, int]:
    """New sizes of the atoms of `layout` on the reference's head-bearing axis (by index in
    `layout.flat()`); see `alive`."""
    return {i: int(v.sum()) for i, v in alive(layout, ref_axis, kept).items()}
