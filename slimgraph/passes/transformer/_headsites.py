"""Where each attention head lives: projection columns, output rows, head counts in the graph.

A `HeadSite` is one attention block seen from head pruning, built from an `AttentionMatch`
(plain ops) or from a fused op (MultiHeadAttention / GroupQueryAttention that `fuse-attention`
wrote):

- `q`, `k`, `v`: the projection each operand comes from (`Projection`: its output, the constant
  weight and bias whose axis runs over the output features) and, per head (per key/value head
  for k and v), the projection columns it owns;
- `out`: the output projection's weight and the rows each head's values feed;
- `moves`: every data movement between the projections, the core and the output projection
  whose shape constants may state a head count (the head split and merge Reshapes, a packed
  Split, the Expand that repeats key/value heads, a Reshape of the scores), each with its input
  and output layout relative to a *reference* (`_headtypes`);
- what `_headregion` found beside the core (values carrying the heads read elsewhere:
  relative-position terms, a rotary embedding's own ops, a mask built from the heads' shape):
  more moves, shape-vector `edits`, `constants` sliced per head, `derived` references;
- `fused`: the fused op whose `num_heads`/`kv_num_heads` follow; `rotary_ops`: RotaryEmbedding
  ops and which heads they rotate; `head_biases`: per-head bias inputs not computed from the
  heads (T5's and Swin's relative position biases, [B|1, N, S, T]) to keep the kept heads' rows
  of; `changed`: the values whose shapes change;
- `cache`: a decode step's key/value cache, the past inputs and present outputs
  [B, KVH, T, H] (`_cache`: read by the fused op, or concatenated with the new keys/values in
  plain ops), whose declared key/value head count follows (the step's interface changes with it).

A block that head pruning cannot edit raises `NoMatch` with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import onnx_ir as ir

from slimgraph.ir import layer_name
from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes._kit import constant_array
from slimgraph.passes.transformer._cache import grow
from slimgraph.passes.transformer._emit import MS_DOMAIN, bias_plan
from slimgraph.passes.transformer._headregion import HeadFrame, follow, shape_reader
from slimgraph.passes.transformer._headtypes import Move, Ref, VectorEdit, Weight
from slimgraph.passes.transformer._layout import Atom, Layout, LayoutError, is_move, step
from slimgraph.passes.transformer._match import AttentionMatch, NoMatch, Operand
from slimgraph.passes.transformer._symbolic import ShapeInfo

if TYPE_CHECKING:
    from onnx_ir._core import Usage

__all__ = ["Projection", "HeadSite", "site_of_match", "site_of_fused", "FUSED_OPS"]

FUSED_OPS = ("MultiHeadAttention", "GroupQueryAttention", "Attention", "QAttention")
# a fused op's key/value cache: (past inputs, present outputs) [batch, kv heads, sequence, size]
_CACHE_SLOTS = {"GroupQueryAttention": ((3, 4), (1, 2)), "MultiHeadAttention": ((6, 7), (1, 2))}
# the attention_bias input of each fused op
_BIAS_INPUT = {"MultiHeadAttention": 5, "GroupQueryAttention": 10, "Attention": 5,
               "QAttention": 9}


@dataclasses.dataclass
class Projection:
    """A projection's output (features last) and its weight (+ bias) over those features."""

    output: ir.Value
    weights: list[Weight]
    width: int


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
    refs: dict[Ref, tuple[int, int]]  # ref -> (head-bearing axis, width)
    fused: ir.Node | None = None
    rotary_ops: list[tuple[ir.Node, str]] = dataclasses.field(default_factory=list)
    head_biases: list[tuple[ir.Node, int, int]] = dataclasses.field(default_factory=list)
    edits: list[VectorEdit] = dataclasses.field(default_factory=list)
    constants: list[tuple[Weight, Ref]] = dataclasses.field(default_factory=list)
    derived: dict[Ref, tuple[Ref, Layout, int]] = dataclasses.field(default_factory=dict)
    changed: set[int] = dataclasses.field(default_factory=set)
    cache: list[ir.Value] = dataclasses.field(default_factory=list)

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


def _chain_moves(start: ir.Value, steps: list[tuple[ir.Node, ir.Value]], ref: Ref,
                 shapes: ShapeInfo) -> tuple[list[Move], Layout, dict[int, Layout]]:
    """Moves of `steps` ((node, output) in data order from `start`), layouts relative to
    `start`; also the layout of every value on the way (by id)."""
    dims = shapes.shape(start)
    if dims is None:
        raise NoMatch("shape unknown")
    layout = Layout.identity(dims)
    seen = {id(start): layout}
    moves = []
    for node, out in steps:
        try:
            after = step(layout, node, out, shapes)
        except LayoutError as error:
            raise NoMatch(f"cannot follow {node.op_type} ({error})") from None
        moves.append(Move(node, ref, layout, after))
        layout = seen[id(out)] = after
    return moves, layout, seen


@dataclasses.dataclass
class _Chain:
    """One operand from its projection to the core: the moves, and every value on the way with
    its layout relative to the projection's output."""

    part: tuple[Projection, list[list[int]]]
    moves: list[Move]
    values: dict[int, tuple[ir.Value, Layout]]
    rotary: list[tuple[ir.Value, Layout]]  # outputs of rotary embeddings in plain ops


def _from_operand(operand: Operand, shapes: ShapeInfo) -> _Chain:
    projection, pre = _projection(operand.source)
    ref = ("proj", id(projection.output))
    steps = [(n, n.outputs[0]) for n in reversed(pre)]
    moves, layout, seen = _chain_moves(projection.output, steps, ref, shapes)
    values = {id(projection.output): (projection.output, seen[id(projection.output)])}
    values.update({id(n.outputs[0]): (n.outputs[0], seen[id(n.outputs[0])]) for n in pre})
    # the source's feature axis must be the projection's features, unchanged
    if pre:
        atoms = layout.axes[operand.feature_axis]
        if len(atoms) != 1 or atoms[0].stride.coef != 1 or atoms[0].size.coef != (
                projection.width) or any(layout.offsets):
            raise NoMatch("the projection's features are moved before the head split")
    rotary = []
    for link in reversed(operand.links):
        if link.kind == "move":
            try:
                layout = step(layout, link.node, link.value, shapes)
            except LayoutError as error:
                raise NoMatch(f"cannot follow {link.node.op_type} ({error})") from None
            moves.append(Move(link.node, ref, values[id(link.source)][1], layout))
        elif link.kind == "rotary":
            rotary.append((link.value, layout))
        elif link.kind == "cache":  # past and new keys/values: the sequence grows
            try:
                layout = grow(layout, link.node, shapes)[0]
            except LayoutError as error:
                raise NoMatch(f"cannot follow the cache's Concat ({error})") from None
        values[id(link.value)] = (link.value, layout)
    columns = [list(operand.columns(h)) for h in range(operand.heads)]
    return _Chain((projection, columns), moves, values, rotary)


def _data_uses(value: ir.Value) -> list[Usage]:
    """The uses of `value` that read its elements (not only its shape: `shape_reader`)."""
    return [u for u in value.uses() if not shape_reader(u.node, u.idx)]


def _out_weight(value: ir.Value) -> Weight:
    uses = _data_uses(value)
    if value.is_graph_output() or len(uses) != 1 or uses[0].idx != 0:
        raise NoMatch("attention output is not read by one output projection")
    node = uses[0].node
    weight = constant_array(node.inputs[1]) if is_onnx_op(node, "MatMul", "Gemm") else None
    if weight is None or weight.ndim != 2:
        raise NoMatch("attention output does not feed a projection with a constant weight")
    if node.op_type == "Gemm":
        return Weight(node, 1, 1 if node.attributes.get_int("transB", 0) else 0)
    return Weight(node, 1, 0)


def _core_moves(layout: Layout, nodes: list[ir.Node], ref: Ref,
                shapes: ShapeInfo) -> list[Move]:
    moves = []
    for node in nodes:
        if is_move(node):
            after = step(layout, node, node.outputs[0], shapes)
            moves.append(Move(node, ref, layout, after))
            layout = after
    return moves


def _frame(token: int, parts: dict[str, tuple[Projection, list[list[int]]]], heads: int,
           kv_heads: int, v_head_size: int, refs: dict[Ref, tuple[int, int]],
           scores: Ref | None, merged: Ref) -> HeadFrame:
    """How layouts relative to this block's references read as heads; adds the "H" refs."""
    hq: Ref = ("H", token, "q")
    hkv: Ref = hq if heads == kv_heads else ("H", token, "kv")
    refs[hq] = (0, heads)
    refs[hkv] = (0, kv_heads)
    columns: dict[Ref, dict[int, tuple[str, int, int]]] = {}
    for role, (projection, per_head) in parts.items():
        owner = columns.setdefault(("proj", id(projection.output)), {})
        for head, cols in enumerate(per_head):
            owner.update({c: (role, head, j) for j, c in enumerate(cols)})
    columns[merged] = {h * v_head_size + j: ("q", h, j) for h in range(heads)
                       for j in range(v_head_size)}
    axes = {ref: axis for ref, (axis, _) in refs.items()}
    return HeadFrame(columns, scores, {"q": hq, "k": hkv, "v": hkv}, axes)


def _add_region(site: HeadSite, region_moves: list[Move], edits: list[VectorEdit],
                constants: list[tuple[Weight, Ref]], derived: dict[Ref, tuple[Ref, Layout, int]],
                refs: dict[Ref, tuple[int, int]]) -> None:
    known = {id(m.node) for m in site.moves}
    site.moves += [m for m in region_moves if id(m.node) not in known]
    site.edits += edits
    site.constants += constants
    site.derived.update(derived)
    site.refs.update(refs)


def site_of_match(match: AttentionMatch, shapes: ShapeInfo, graph: ir.Graph) -> HeadSite:
    """The head site of an unfused attention.

    Raises:
        NoMatch: a part head pruning cannot edit (the reason says which).
    """
    moves: list[Move] = []
    parts = {}
    refs: dict[Ref, tuple[int, int]] = {}
    chains = []
    for operand in (match.q, match.k, match.v):
        chain = _from_operand(operand, shapes)
        chains.append(chain)
        parts[operand.role] = chain.part
        projection = chain.part[0]
        refs[("proj", id(projection.output))] = (len(projection.output.shape or ()) - 1,
                                                 projection.width)
        moves += [m for m in chain.moves if m.node not in {x.node for x in moves}]
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
    per_head = []
    for term in match.bias:
        if term.fill is None and bias_plan(term, shapes).z[1]:
            per_head.append(term)
    site = HeadSite(match.name, match.heads, match.kv_heads, match.head_size,
                    match.v.head_size, parts["q"], parts["k"], parts["v"],
                    _out_weight(match.output), moves, refs)
    frame = _frame(id(match), parts, match.heads, match.kv_heads, match.v.head_size, refs,
                   z_ref, y_ref)
    inside = {id(n) for n in match.nodes} | {id(m.node) for m in moves}
    starts = []
    joins: dict[int, tuple[Layout, Ref]] = {}
    for operand, chain in zip((match.q, match.k, match.v), chains, strict=True):
        inside |= {id(link.node) for link in operand.links if link.kind != "rotary"}
        ref = ("proj", id(chain.part[0].output))
        starts += [(value, layout, ref) for value, layout in chain.values.values()]
        joins.update({id(value): (layout, ref) for value, layout in chain.rotary})
    for term in per_head:
        joins[id(term.value)] = (term.layout, z_ref)
    for cache in (match.k.cache, match.v.cache):
        if cache is not None:
            site.cache += [cache.past, cache.present]
    region = follow(graph, starts, inside, joins, frame, shapes,
                    outputs={id(v) for v in site.cache})
    _add_region(site, region.moves, region.edits, region.constants, region.derived,
                region.refs)
    for term in per_head:
        if id(term.value) in region.joined:
            continue  # computed from the heads: pruned with them
        plan = bias_plan(term, shapes)
        axes = [i for i, atoms in enumerate(term.layout.axes) if any(a.axis == 1 for a in atoms)]
        if len(axes) != 1 or len(term.layout.axes[axes[0]]) != 1:
            raise NoMatch("a per-head bias merged with another axis")
        consumer = next(u for u in term.value.uses() if u.node in match.score_nodes)
        site.head_biases.append((consumer.node, consumer.idx, axes[0] - plan.pad))
    site.changed = {id(v) for c in chains for v, _ in c.values.values()} | region.values | {
        id(o) for n in match.nodes for o in n.outputs} | {id(o) for m in site.moves
                                                           for o in m.node.outputs}
    return site


def site_of_fused(node: ir.Node, shapes: ShapeInfo, graph: ir.Graph) -> HeadSite:
    """The head site of a fused attention op: MultiHeadAttention / GroupQueryAttention written
    by fuse-attention (q, k, v from projections) or Attention written by pack-attention (the
    projections packed into the op's own weight).

    Raises:
        NoMatch: a part head pruning cannot edit.
    """
    if node.op_type == "QAttention":
        raise NoMatch("int8 attention (QAttention): prune heads before quantizing")
    heads = node.attributes.get_int("num_heads", 0)
    kv_heads = node.attributes.get_int("kv_num_heads", heads) or heads
    if not heads:
        raise NoMatch(f"{node.op_type} without num_heads")
    inputs = _packed_inputs(node, heads) if node.op_type == "Attention" else _separate_inputs(
        node, heads, kv_heads, shapes)
    parts, sizes = inputs.parts, inputs.sizes
    kv_heads = len(parts["k"][1])
    if len(parts["v"][1]) != kv_heads or heads % kv_heads:
        raise NoMatch("key and value heads are not whole groups of the query heads")
    refs = inputs.refs
    y_ref, z_ref = ("Y", id(node)), ("Z", id(node))
    refs[y_ref] = (2, heads * sizes["v"])
    refs[z_ref] = (1, heads)
    output = node.outputs[0]
    query = node.inputs[0]
    if output.shape is None and query is not None and query.shape is not None and len(
            query.shape) == 3:  # onnx's shape inference knows no contrib op: [B, S, N * Hv]
        output.shape = ir.Shape([query.shape[0], query.shape[1], heads * sizes["v"]])
        output.type = output.type or query.type  # a shape without a type is not written
    output = _nan_guarded(output)
    start, out_nodes = output, []
    while (uses := _data_uses(output)) and len(uses) == 1 and is_move(uses[0].node) and (
            not output.is_graph_output()):
        out_nodes.append(uses[0].node)
        output = uses[0].node.outputs[0]
    y_moves, _, _ = _chain_moves(start, [(n, n.outputs[0]) for n in out_nodes], y_ref, shapes)
    moves = inputs.moves + y_moves
    site = HeadSite(layer_name(node) or node.name or node.op_type, heads, kv_heads,
                    sizes["q"], sizes["v"], parts["q"], parts["k"], parts["v"],
                    _out_weight(output), moves, refs, fused=node, rotary_ops=inputs.rotary_ops)
    frame = _frame(id(node), parts, heads, kv_heads, sizes["v"], refs, z_ref, y_ref)
    inside = {id(node)} | {id(m.node) for m in moves} | {id(r) for r, _ in inputs.rotary_ops}
    joins: dict[int, tuple[Layout, Ref]] = {}
    bias_index = _BIAS_INPUT[node.op_type]
    bias = node.inputs[bias_index] if len(node.inputs) > bias_index else None
    bias_dims = shapes.shape(bias)
    per_head = bias is not None and bias_dims is not None and len(bias_dims) == 4 and (
        bias_dims[1].static and bias_dims[1].coef == heads > 1)
    if per_head:
        assert bias is not None and bias_dims is not None
        joins[id(bias)] = (Layout.identity(bias_dims), z_ref)
    region = follow(graph, inputs.starts, inside, joins, frame, shapes)
    _add_region(site, region.moves, region.edits, region.constants, region.derived,
                region.refs)
    if per_head and id(bias) not in region.joined:
        site.head_biases.append((node, bias_index, 1))
    past, present = _CACHE_SLOTS.get(node.op_type, ((), ()))
    site.cache = [v for v in [*(node.inputs[i] for i in past if i < len(node.inputs)),
                              *(node.outputs[i] for i in present if i < len(node.outputs))]
                  if v is not None]
    site.changed = {id(v) for v, _, _ in inputs.starts} | region.values | {
        id(o) for m in site.moves for o in m.node.outputs} | {id(node.outputs[0])}
    return site


def _nan_guarded(value: ir.Value) -> ir.Value:
    """`Where(IsNaN(value), 0, value)` when that is all that reads `value` (what fuse-attention
    writes after MultiHeadAttention where the model's softmax was guarded against rows whose
    keys are all masked: elementwise, the heads stay where they are), else `value`."""
    uses = list(value.uses())
    if value.is_graph_output() or len(uses) != 2:
        return value
    nan = next((u.node for u in uses if is_onnx_op(u.node, "IsNaN")), None)
    where = next((u.node for u in uses if is_onnx_op(u.node, "Where")), None)
    if nan is None or where is None or len(list(nan.outputs[0].uses())) != 1:
        return value
    fill = constant_array(where.inputs[1])
    if where.inputs[0] is not nan.outputs[0] or where.inputs[2] is not value or (
            fill is None or fill.size != 1 or fill.item() != 0):
        return value
    return where.outputs[0]


@dataclasses.dataclass
class _FusedInputs:
    """Where a fused op's q, k and v come from (see `site_of_fused`)."""

    parts: dict[str, tuple[Projection, list[list[int]]]]
    sizes: dict[str, int]
    moves: list[Move]
    refs: dict[Ref, tuple[int, int]]
    rotary_ops: list[tuple[ir.Node, str]]
    starts: list[tuple[ir.Value, Layout, Ref]]


def _packed_inputs(node: ir.Node, heads: int) -> _FusedInputs:
    """`Attention(x, W [D, q + k + v], b)`: the projections are the op's own weight columns."""
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim != 2:
        raise NoMatch("Attention whose packed weight is not a constant matrix")
    hidden = node.attributes.get_ints("qkv_hidden_sizes", [weight.shape[1] // 3] * 3)
    if len(hidden) != 3 or sum(hidden) != weight.shape[1] or any(h % heads for h in hidden):
        raise NoMatch("Attention whose packed weight does not divide into the heads")
    weights = [Weight(node, 1, 1)]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        if constant_array(node.inputs[2]) is None:
            raise NoMatch("Attention whose packed bias is not constant")
        weights.append(Weight(node, 2, 0))
    value = node.inputs[1]
    assert value is not None
    projection = Projection(value, weights, int(weight.shape[1]))
    parts, sizes = {}, {}
    offset = 0
    for role, width in zip(("q", "k", "v"), hidden, strict=True):
        size = width // heads
        parts[role] = (projection, [list(range(offset + h * size, offset + (h + 1) * size))
                                    for h in range(heads)])
        sizes[role] = size
        offset += width
    return _FusedInputs(parts, sizes, [], {("proj", id(value)): (1, projection.width)}, [], [])


def _separate_inputs(node: ir.Node, heads: int, kv_heads: int,
                     shapes: ShapeInfo) -> _FusedInputs:
    """MultiHeadAttention / GroupQueryAttention: q, k, v each from a projection through moves
    (and RotaryEmbedding ops)."""
    q3, k3, v3 = (node.inputs[i] if len(node.inputs) > i else None for i in range(3))
    if q3 is None or k3 is None or v3 is None or (
            node.op_type == "MultiHeadAttention" and len(node.inputs) > 3 and node.inputs[3]):
        raise NoMatch(f"{node.op_type} with packed inputs or a bias input")
    moves: list[Move] = []
    refs: dict[Ref, tuple[int, int]] = {}
    parts: dict[str, tuple[Projection, list[list[int]]]] = {}
    rotary_ops: list[tuple[ir.Node, str]] = []
    sizes = {}
    starts: list[tuple[ir.Value, Layout, Ref]] = []
    for role, value in (("q", q3), ("k", k3), ("v", v3)):
        chain: list[ir.Node] = []
        current = value
        while (producer := current.producer()) is not None and (
                is_move(producer) or (producer.domain == MS_DOMAIN
                                      and producer.op_type == "RotaryEmbedding")):
            chain.append(producer)
            assert producer.inputs[0] is not None
            current = producer.inputs[0]
        projection, pre = _projection(current)
        ref: Ref = ("proj", id(projection.output))
        refs[ref] = (len(projection.output.shape or ()) - 1, projection.width)
        steps = [(n, n.outputs[0]) for n in reversed(pre)]
        chain_moves, layout, seen = _chain_moves(projection.output, steps, ref, shapes)
        for link in reversed(chain):
            out = _output_toward(link, value)
            if link.op_type == "RotaryEmbedding":
                rotary_ops.append((link, role))
            else:
                try:
                    after = step(layout, link, out, shapes)
                except LayoutError as error:
                    raise NoMatch(f"cannot follow {link.op_type} ({error})") from None
                chain_moves.append(Move(link, ref, layout, after))
                layout = after
            seen[id(out)] = layout
            starts.append((out, layout, ref))
        starts += [(projection.output, seen[id(projection.output)], ref)] + [
            (n.outputs[0], seen[id(n.outputs[0])], ref) for n in pre]
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
    return _FusedInputs(parts, sizes, moves, refs, rotary_ops, starts)


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
