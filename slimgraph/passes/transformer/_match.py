"""The attention matcher: scaled dot-product attention found by following the data.

Starting from each Softmax, the matcher walks the dataflow, not one exporter's spelling:

- scores: the Softmax input back to a MatMul of two operands, through additive biases (`Add`),
  masked fills (`Where(mask, fill, scores)`), scalar scales (`Mul`/`Div` by a constant), a soft
  cap (`c * tanh(scores / c)`, Gemma 2) and data movement; each bias is recorded with its
  layout and the scale applied after it;
- context: the Softmax output (through an `IsNaN`/`Where` guard against fully masked rows, as
  torch's sdpa decomposition writes it) read by one MatMul with the values, then forward through
  data movement to the head merge;
- operands: q, k^T and v back from the two MatMuls through data movement (`_layout`), scalar
  scales and rotary embeddings (`_rotary`: rotate-half or interleaved pairs, optionally on the
  first `rotary_dim` features) to their *source*: a value of shape [batch, sequence, features]
  (any axis order) whose features hold the heads as `heads x head_size`, possibly a part of a
  packed projection. The layouts say
  which source axis is the batch, the sequence and the features, which feature columns each head
  owns, and how key/value heads are repeated (grouped-query attention: Expand + Reshape, or
  repeat_interleave; multi-query: broadcasting). Keys and values of a decode step come
  through a key/value cache, `Concat(past, new)` along the sequence (`_cache`): the chain
  continues to the new tokens' projection and the operand records where the past comes in and
  the present goes out.

The result, `AttentionMatch`, is what fusion rewrites and head pruning edits (heads, key/value
groups, the projection columns each head owns). A Softmax that is not attention, or attention
in a form the fused ops cannot take, raises `NoMatch` with the reason.

Source: Vaswani et al. 2017 (attention); Su et al. 2021 (rotary embeddings); Ainslie et al. 2023
(grouped-query attention).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from slimgraph.ir import layer_name
from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes._kit import constant_array
from slimgraph.passes.transformer._cache import KVCache, check_cache_layout
from slimgraph.passes.transformer._layout import (
    Atom,
    Layout,
    LayoutError,
    is_move,
    normalize,
    step,
)
from slimgraph.passes.transformer._rotary import Rotary
from slimgraph.passes.transformer._symbolic import ONE, Dim, ShapeInfo, scalar
from slimgraph.passes.transformer._trace import Link, layout_along, trace

__all__ = [
    "NoMatch",
    "Rotary",
    "Operand",
    "BiasTerm",
    "AttentionMatch",
    "match_attention",
    "find_attention",
    "softmax_attention_like",
    "Link",
    "trace",
    "layout_along",
]

_MAX_CHAIN = 40
# a masked fill is an additive bias when adding it underflows the softmax exactly as the fill
_FILL_LIMIT = -1e4


class NoMatch(Exception):
    """The pattern does not apply; the message is the reason (shown to the user)."""


@dataclasses.dataclass
class Operand:
    """q, k or v as the fused op takes it: `source` [.., sequence, features] and where the heads
    are in it.

    Attributes:
        role: "q", "k" or "v".
        source: the value the fused op's input is built from (a projection's output, a part of a
            packed projection, or a transposed one).
        layout: the core's operand (q, k^T or v as the scores/context MatMul reads it) relative
            to `source`.
        batch_axis, seq_axis, feature_axis: source axes (batch_axis None when it has size 1).
        offset: the first feature of head 0; head h owns features
            `offset + h * head_stride ... offset + h * head_stride + head_size - 1`
            (`head_stride` > `head_size` where q, k and v of one head are packed together,
            as GPT-NeoX does).
        heads: distinct heads (key/value heads for k and v); head_size: features per head.
        repeat: query heads served by each of these heads (grouped-query attention).
        scale: the product of the scalar scales between source and core.
        rotary: the rotary embedding between source and core, if any.
        chain: the nodes between source and core (the head split); `links` the same as
            steps (nearest the core first).
        head_stride: features from one head's first to the next's.
        cache: where past keys/values join the new ones (`Concat(past, new)`), if they do;
            `source_dims` then has the source's sequence widened to past + new.
    """

    role: str
    source: ir.Value
    layout: Layout
    batch_axis: int | None
    seq_axis: int
    feature_axis: int
    offset: int
    heads: int
    head_size: int
    repeat: int = 1
    scale: float = 1.0
    rotary: Rotary | None = None
    chain: list[ir.Node] = dataclasses.field(default_factory=list)
    head_stride: int = 0
    links: list[Link] = dataclasses.field(default_factory=list)
    source_dims: tuple[Dim, ...] = ()
    cache: KVCache | None = None

    def __post_init__(self) -> None:
        self.head_stride = self.head_stride or self.head_size

    def columns(self, head: int) -> range:
        """The source features of `head` (a head of this operand, not a query head)."""
        start = self.offset + head * self.head_stride
        return range(start, start + self.head_size)

    @property
    def width(self) -> int:
        return self.heads * self.head_size

    @property
    def standard(self) -> bool:
        """The source is [batch, sequence, features] holding exactly these heads."""
        return (self.batch_axis in (0, None) and self.seq_axis == 1 and self.feature_axis == 2
                and self.offset == 0 and self.source_width == self.width
                and self.head_stride == self.head_size)

    @property
    def source_width(self) -> int | None:
        """The source's feature count (None when not static)."""
        if len(self.source_dims) <= self.feature_axis:
            return None
        dim = self.source_dims[self.feature_axis]
        return dim.coef if dim.static else None


@dataclasses.dataclass
class BiasTerm:
    """One term added to the scores before the Softmax, `factor` times.

    `fill` None: `value` is an additive bias. Otherwise a masked fill: where `value` (boolean)
    is `fill_if` the scores become `fill` (an additive `fill` where the mask is set, exact for
    fills of -1e4 and below: the softmax weight underflows to 0 either way).
    `layout`: the scores' layout where the term applies, relative to [B, N, S, T] (axes 0-3).
    """

    value: ir.Value
    layout: Layout
    factor: float = 1.0
    fill: float | None = None
    fill_if: bool = True


@dataclasses.dataclass
class AttentionMatch:
    """One scaled dot-product attention: softmax(scale * q k^T + bias) v, heads merged.

    Attributes:
        name: the torch module path of the block (or the Softmax's name).
        softmax: the Softmax node.
        q, k, v: the operands (k and v may have fewer heads: grouped-query attention).
        scale: multiplies q k^T (all scalar scales on q, k and the scores together).
        bias: the terms added to the scores (masks, relative position biases).
        output: the value the fused op replaces (after the head merge), `output_layout` its
            layout relative to the fused op's [B, S, N * Hv] output.
        nodes: the nodes of the core (scores MatMul to the head merge), removed once unread.
        guarded: the Softmax output was guarded against NaN rows (IsNaN/Where).
        scores_layout: the scores MatMul's output relative to [B, N, S, T]; `score_nodes` the
            nodes from it to the Softmax, `prob_nodes` the moves from the Softmax to the
            context MatMul.
        context_layout: the context MatMul's output relative to the fused op's output
            [B, S, N * Hv]; `merge_nodes` the moves from it to `output`.
        softcap: 0, or the soft cap c of softmax(c * tanh(scale * q k^T / c) + bias)
            (Gemma 2); `scale` is then inside the Tanh.
    """

    name: str
    softmax: ir.Node
    q: Operand
    k: Operand
    v: Operand
    scale: float
    bias: list[BiasTerm]
    output: ir.Value
    output_layout: Layout
    nodes: list[ir.Node]
    guarded: bool = False
    scores_layout: Layout | None = None
    score_nodes: list[ir.Node] = dataclasses.field(default_factory=list)
    prob_nodes: list[ir.Node] = dataclasses.field(default_factory=list)
    context_layout: Layout | None = None
    merge_nodes: list[ir.Node] = dataclasses.field(default_factory=list)
    softcap: float = 0.0

    @property
    def heads(self) -> int:
        return self.q.heads

    @property
    def kv_heads(self) -> int:
        return self.k.heads

    @property
    def head_size(self) -> int:
        return self.q.head_size

    @property
    def cached(self) -> bool:
        """Keys and values come from a cache (past in, present out)."""
        return self.k.cache is not None


# ------------------------------------------------------------------------------- operands


@dataclasses.dataclass
class _Roles:
    """How the core operand's axes map to the source's: found by `_roles`."""

    batch_axis: int | None
    seq_axis: int
    feature_axis: int
    offset: int
    head_size: int
    batch: list[tuple[str, Atom]]  # the batch atoms: ("B", atom) / ("N", atom) / ("R", atom)
    head_stride: int  # features from one head's first to the next's (> head_size: interleaved)


def _roles(layout: Layout, source_dims: tuple[Dim, ...], transposed: bool) -> _Roles:
    """Read batch/sequence/feature axes off the layout of q, v ([.., S, H]) or k^T ([.., H, T])."""
    if layout.rank < 3:
        raise LayoutError(f"rank {layout.rank}, expected batch, sequence and features")
    seq_atoms, head_atoms = layout.axes[-2], layout.axes[-1]
    if transposed:
        seq_atoms, head_atoms = head_atoms, seq_atoms
    if len(head_atoms) != 1 or head_atoms[0].axis is None or head_atoms[0].stride != ONE:
        raise LayoutError("the head dimension is not one run of features")
    head = head_atoms[0]
    if not head.size.static:
        raise LayoutError("head size not static")
    seq_axis: int | None = None
    if seq_atoms:  # empty: a sequence of length 1
        if len(seq_atoms) != 1 or seq_atoms[0].axis is None or seq_atoms[0].stride != ONE:
            raise LayoutError("the sequence axis is not one source axis")
        seq_axis = seq_atoms[0].axis
        if seq_atoms[0].size != source_dims[seq_axis] or layout.offsets[seq_axis]:
            raise LayoutError("the sequence axis is a part of a source axis")
    feature = head.axis
    batch: list[tuple[str, Atom]] = []
    batch_axis = None
    head_stride = None
    for atom in [a for axis in layout.axes[:-2] for a in axis]:
        if atom.axis is None:
            batch.append(("R", atom))
        elif atom.axis == feature and atom.stride.static and atom.size.static and (
                atom.stride.coef >= head.size.coef and head_stride is None):
            head_stride = atom.stride.coef
            batch.append(("N", atom))
        elif atom.axis not in (feature, seq_axis) and atom.stride == ONE and (
                atom.size == source_dims[atom.axis] and not layout.offsets[atom.axis]
                and batch_axis is None):
            batch_axis = atom.axis
            batch.append(("B", atom))
        else:
            raise LayoutError("the batch axes mix batch, sequence and feature positions")
    unused = [i for i in range(len(source_dims)) if i not in (feature, seq_axis, batch_axis)]
    if any(source_dims[i] != ONE for i in unused):
        raise LayoutError("a source axis is neither batch, sequence nor features")
    if seq_axis is None:
        if batch_axis is None or not unused:
            raise LayoutError("no sequence axis")
        seq_axis = unused[-1]
    assert feature is not None
    return _Roles(batch_axis, seq_axis, feature, layout.offsets[feature], head.size.coef,
                  batch, head_stride or head.size.coef)


def _candidates(links: list[Link]) -> Iterator[int]:
    """Chain positions to try as the source, furthest first."""
    return iter(range(len(links), -1, -1))


def _operand(value: ir.Value, role: str, shapes: ShapeInfo) -> tuple[Operand, _Roles]:
    """The operand `value` of a core MatMul traced to its source (see the module docstring)."""
    links = trace(value, shapes, cache=role in ("k", "v"))
    reasons: list[str] = []
    for upto in _candidates(links):
        kv_cache = None
        try:
            layout = layout_along(value, links, upto, shapes)
            source = links[upto - 1].source if upto else value
            dims = shapes.shape(source)
            assert dims is not None
            kv_cache = next((link.cache for link in links[:upto] if link.cache), None)
            if kv_cache is not None:  # the keys attended: past and new along the sequence
                dims = tuple(kv_cache.total if i == kv_cache.source_axis else d
                             for i, d in enumerate(dims))
            roles = _roles(layout, dims, transposed=role == "k")
            if kv_cache is not None:
                heads = [a.size.coef for r, a in roles.batch if r == "N"]
                check_cache_layout(kv_cache, roles.feature_axis, roles.head_size,
                                   heads[0] if heads else 1, roles.seq_axis, roles.head_stride)
        except LayoutError as error:
            reasons.append(str(error))
            continue
        scale = float(np.prod([link.factor for link in links[:upto]])) if upto else 1.0
        rotaries = [link.rotary for link in links[:upto] if link.rotary is not None]
        if any(link.kind == "rotary-op" for link in links[:upto]):
            reasons.append("a RotaryEmbedding op between the projection and the attention")
            continue
        if len(rotaries) > 1:
            reasons.append("two rotary embeddings")
            continue
        heads = [a.size.coef for r, a in roles.batch if r == "N"]
        operand = Operand(
            role, source, layout, roles.batch_axis, roles.seq_axis, roles.feature_axis,
            roles.offset, heads[0] if heads else 1, roles.head_size, scale=scale,
            rotary=rotaries[0] if rotaries else None,
            chain=[link.node for link in links[:upto]], head_stride=roles.head_stride,
            links=links[:upto], source_dims=tuple(dims), cache=kv_cache,
        )
        return operand, roles
    why = reasons[0] if reasons else "no chain"
    raise NoMatch(f"{role} is not a head split of one projection ({why})")


def _pair(roles: list[tuple[str, Atom]], kv: list[tuple[str, Atom]], what: str) -> int:
    """Check the k/v batch atoms against the query's (`roles`: ("B"|"N", atom) in order);
    return how many query heads share each k/v head (1: multi-head, more: grouped-query or
    multi-query attention)."""
    kv = list(kv)
    repeat = 1
    for role, atom in roles:
        if role == "B":
            if not kv or kv[0][0] != "B" or kv[0][1].size != atom.size:
                raise NoMatch(f"{what} batch does not follow the query's")
            kv.pop(0)
            continue
        if role != "N":
            raise NoMatch("the query is broadcast")
        taken: list[tuple[str, Atom]] = []
        size = ONE
        while size != atom.size:
            if not kv:
                raise NoMatch(f"{what} heads do not follow the query heads")
            taken.append(kv.pop(0))
            size = size * taken[-1][1].size
            if atom.size.divide(size) is None:
                raise NoMatch(f"{what} heads do not follow the query heads")
        kinds = "".join(r for r, _ in taken)
        if kinds == "N":
            repeat = 1
        elif kinds in ("NR", "R"):
            repeat = taken[-1][1].size.coef
        else:
            raise NoMatch(f"{what} heads repeated in an order grouped-query attention does "
                          f"not use ({kinds})")
    if kv:
        raise NoMatch(f"{what} has batch positions the query does not have")
    return repeat


def _align(q: Layout, kv: Layout) -> list[tuple[str, Atom]]:
    """The k/v batch atoms after MatMul broadcasting against the query's batch axes."""
    q_axes, kv_axes = list(q.axes[:-2]), list(kv.axes[:-2])
    rank = max(len(q_axes), len(kv_axes))
    q_axes = [()] * (rank - len(q_axes)) + q_axes
    kv_axes = [()] * (rank - len(kv_axes)) + kv_axes
    out: list[Atom] = []
    for qa, ka in zip(q_axes, kv_axes, strict=True):
        q_size = _size(qa)
        if not ka and q_size != ONE:
            out.append(Atom(None, q_size, Dim(0)))
        elif ka and q_size != ONE and _size(ka) != q_size:
            raise NoMatch("key/value batch axes do not broadcast against the query's")
        else:
            out.extend(ka)
    return [("R", a) for a in normalize(out)]


def _size(atoms: tuple[Atom, ...]) -> Dim:
    size = ONE
    for atom in atoms:
        size = size * atom.size
    return size


def _label(roles: _Roles, atoms: list[tuple[str, Atom]]) -> list[tuple[str, Atom]]:
    """Name the aligned k/v batch atoms by their source axis (B, N or a broadcast R)."""
    out = []
    for _, atom in atoms:
        if atom.axis is None:
            out.append(("R", atom))
        elif atom.axis == roles.feature_axis and atom.stride == Dim(roles.head_stride):
            out.append(("N", atom))
        elif atom.axis == roles.batch_axis:
            out.append(("B", atom))
        else:
            raise NoMatch("key/value batch axes mix batch, sequence and feature positions")
    return out


# ------------------------------------------------------------------------------- the core


_Z = ("B", "N", "S", "T")


def _z_atom(role: str, size: Dim) -> Atom:
    return Atom(_Z.index(role), size, ONE)


def _z_layout(q: Layout, roles: _Roles, t_size: Dim) -> Layout:
    """The scores q k^T relative to [B, N, S, T] (axes 0-3), from the query's layout."""
    flat = iter(roles.batch)
    axes = []
    for axis in q.axes[:-2]:
        atoms = []
        for atom in axis:
            role, _ = next(flat)
            atoms.append(_z_atom(role, atom.size))
        axes.append(tuple(atoms))
    return Layout((*axes, (_z_atom("S", _size(q.axes[-2])),), (_z_atom("T", t_size),)),
                  (0, 0, 0, 0))


@dataclasses.dataclass
class _Scores:
    """What `_scores` found between the scores MatMul and the Softmax."""

    terms: list[BiasTerm]
    factor: float  # multiplies q k^T (inside the soft cap when there is one)
    nodes: list[ir.Node]
    layout: Layout  # at the Softmax
    softcap: float = 0.0


def _scores(matmul: ir.Node, softmax: ir.Node, layout: Layout, t_size: Dim,
            shapes: ShapeInfo) -> _Scores:
    """Walk from the scores MatMul (of `layout`, in [B, N, S, T] terms) to the Softmax; return
    the bias terms, the factor applied to the scores, the nodes on the way, the layout at the
    Softmax and the soft cap.

    A soft cap (Gemma 2's `attn_logit_softcapping`) is a Tanh on the scores between scalar
    scales: `c * tanh(f * q k^T)` in any spelling (Div by c or Mul by 1/c, scales merged or
    not) is the fused op's `softcap = |c|` with `scale = f * c`, since c tanh(x / c) is odd
    in c.
    """
    terms: list[BiasTerm] = []
    factor = 1.0
    inner: float | None = None  # the factor inside the Tanh, once one is passed
    nodes: list[ir.Node] = []
    current = matmul.outputs[0]
    for _ in range(_MAX_CHAIN):
        uses = list(current.uses())
        if current.is_graph_output() or len(uses) != 1:
            raise NoMatch("the attention scores are read outside the attention")
        node = uses[0].node
        if node is softmax:
            break
        nodes.append(node)
        others = [v for i, v in enumerate(node.inputs) if i != uses[0].idx]
        if is_onnx_op(node, "Add") and others[0] is not None:
            terms.append(BiasTerm(others[0], layout, factor=1.0))
        elif is_onnx_op(node, "Mul", "Div") and (value := scalar(others[0])) is not None and (
                node.op_type == "Mul" or uses[0].idx == 0):
            value = value if node.op_type == "Mul" else 1.0 / value
            factor *= value
            for term in terms:
                term.factor *= value
        elif is_onnx_op(node, "Where") and uses[0].idx in (1, 2):
            fill = scalar(node.inputs[3 - uses[0].idx])
            cond = node.inputs[0]
            if fill is None or cond is None or fill > _FILL_LIMIT:
                raise NoMatch("a masked fill with a fill value above -1e4")
            terms.append(BiasTerm(cond, layout, fill=fill, fill_if=uses[0].idx == 2))
        elif is_onnx_op(node, "Tanh"):
            if inner is not None:
                raise NoMatch("two soft caps (tanh) on the scores")
            if terms:
                raise NoMatch("a soft cap (tanh) on the scores with a bias inside it")
            inner, factor = factor, 1.0
        elif is_move(node):
            try:
                layout = step(layout, node, node.outputs[0], shapes)
            except LayoutError as error:
                raise NoMatch(f"the scores are moved in a way the fused op cannot follow "
                              f"({error})") from None
        else:
            raise NoMatch(f"the scores pass through {node.op_type} before the Softmax")
        current = node.outputs[0]
    else:
        raise NoMatch("no Softmax after the scores")
    softcap = 0.0
    if inner is not None:  # factor: the cap c outside the Tanh
        if factor == 0.0:
            raise NoMatch("a soft cap (tanh) on the scores multiplied by 0")
        softcap, factor = abs(factor), inner * factor
    axis = softmax.attributes.get_int("axis", -1) % layout.rank
    keys = [a for a in layout.axes[-1] if a.size != ONE]
    if axis != layout.rank - 1 or len(keys) > 1 or (keys and keys[0].axis != 3) or (
            not keys and t_size != ONE):
        raise NoMatch("the Softmax does not run over the keys")
    return _Scores(terms, factor, nodes, layout, softcap)


def _probabilities(softmax: ir.Node) -> tuple[ir.Value, list[ir.Node], bool]:
    """The Softmax output as the context MatMul reads it (through a NaN guard)."""
    probs = softmax.outputs[0]
    uses = list(probs.uses())
    if probs.is_graph_output():
        raise NoMatch("the attention probabilities are a graph output")
    if len(uses) == 2:
        nan = next((u.node for u in uses if is_onnx_op(u.node, "IsNaN")), None)
        where = next((u.node for u in uses if is_onnx_op(u.node, "Where")), None)
        if nan is not None and where is not None and where.inputs[0] is nan.outputs[0] and (
                where.inputs[2] is probs and scalar(where.inputs[1]) == 0.0):
            if len(list(nan.outputs[0].uses())) == 1:
                return where.outputs[0], [nan, where], True
    if len(uses) != 1:
        raise NoMatch("the attention probabilities are read outside the attention "
                      "(attention weights returned?)")
    return probs, [], False


def match_attention(softmax: ir.Node, shapes: ShapeInfo | None = None) -> AttentionMatch:
    """Match the attention around `softmax` (see the module docstring).

    Keys and values may come through a key/value cache (`Concat(past, new)`, `_cache`): the
    match then attends over past and new, and its k and v carry the `KVCache`.

    Raises:
        NoMatch: with the reason, when the Softmax is not attention the fused ops can take.
    """
    shapes = shapes or ShapeInfo()
    if not is_onnx_op(softmax, "Softmax"):
        raise NoMatch("not a Softmax")
    scores_matmul = _scores_matmul(softmax)
    q, q_roles = _operand(scores_matmul.inputs[0], "q", shapes)  # type: ignore[arg-type]
    k, k_roles = _operand(scores_matmul.inputs[1], "k", shapes)  # type: ignore[arg-type]
    if k.head_size != q.head_size:
        raise NoMatch(f"query head size {q.head_size} differs from the key's {k.head_size}")
    k.repeat = _pair(q_roles.batch, _label(k_roles, _align(q.layout, k.layout)), "key")
    k.heads = q.heads // k.repeat
    t_size = k.source_dims[k.seq_axis]
    z_layout = scores_layout = _z_layout(q.layout, q_roles, t_size)
    found = _scores(scores_matmul, softmax, z_layout, t_size, shapes)
    terms, factor, score_nodes, z_layout = found.terms, found.factor, found.nodes, found.layout
    probs, guard, guarded = _probabilities(softmax)
    context, p_nodes, p_layout = _context(probs, z_layout, shapes)
    v, v_roles = _operand(context.inputs[1], "v", shapes)  # type: ignore[arg-type]
    p_roles = _z_roles(p_layout)
    v.repeat = _pair(p_roles, _label(v_roles, _align(p_layout, v.layout)), "value")
    v.heads = q.heads // v.repeat
    if k.heads != v.heads or k.repeat != v.repeat:
        raise NoMatch("key and value have different head counts")
    if v.source_dims[v.seq_axis] != t_size:
        raise NoMatch("key and value sequences differ")
    if (k.cache is None) != (v.cache is None):
        raise NoMatch("only one of key and value comes from a cache")
    if v.scale != 1.0 or v.rotary is not None:
        raise NoMatch("the values are scaled or rotated")
    output, output_layout, out_nodes, context_layout = _merge(context, p_layout, v.head_size,
                                                              shapes)
    nodes = [scores_matmul, *score_nodes, softmax, *guard, *p_nodes, context, *out_nodes]
    name = layer_name(softmax) or softmax.name or "attention"
    return AttentionMatch(name, softmax, q, k, v, q.scale * k.scale * factor, terms, output,
                          output_layout, nodes, guarded=guarded, scores_layout=scores_layout,
                          score_nodes=score_nodes, prob_nodes=p_nodes,
                          context_layout=context_layout, merge_nodes=out_nodes,
                          softcap=found.softcap)


def _scores_matmul(softmax: ir.Node) -> ir.Node:
    """The MatMul whose product reaches the Softmax through biases, scales, fills and moves."""
    current = softmax.inputs[0]
    for _ in range(_MAX_CHAIN):
        node = current.producer() if current is not None else None
        if node is None:
            break
        if is_onnx_op(node, "MatMul"):
            return node
        if is_onnx_op(node, "Add", "Mul", "Div"):
            current = _data_input(node)
        elif is_onnx_op(node, "Tanh"):  # a soft cap
            current = node.inputs[0]
        elif is_onnx_op(node, "Where"):
            a, b = node.inputs[1], node.inputs[2]
            current = b if scalar(a) is not None else a
        elif is_move(node):
            current = node.inputs[0]
        else:
            raise NoMatch(f"the Softmax input comes from {node.op_type}, not from q k^T")
    raise NoMatch("the Softmax input does not come from a MatMul")


def _data_input(node: ir.Node) -> ir.Value | None:
    """The input of an Add/Mul/Div on the path to a MatMul (prefers a MatMul or a longer path)."""
    a, b = node.inputs
    if node.op_type in ("Mul", "Div") and scalar(b) is not None:
        return a
    if node.op_type == "Mul" and scalar(a) is not None:
        return b
    for value in (a, b):
        producer = value.producer() if value is not None else None
        if producer is not None and is_onnx_op(producer, "MatMul"):
            return value
    # an Add of a bias: follow the operand that depends on a MatMul of activations
    for value in (a, b):
        if value is not None and _reaches_matmul(value):
            return value
    return a


def _reaches_matmul(value: ir.Value, depth: int = 0) -> bool:
    node = value.producer()
    if node is None or depth > 8:
        return False
    if is_onnx_op(node, "MatMul"):
        return all(v is not None and constant_array(v) is None for v in node.inputs)
    if is_onnx_op(node, "Add", "Mul", "Div", "Where", "Tanh") or is_move(node):
        return any(v is not None and _reaches_matmul(v, depth + 1) for v in node.inputs)
    return False


def _context(probs: ir.Value, layout: Layout,
             shapes: ShapeInfo) -> tuple[ir.Node, list[ir.Node], Layout]:
    """The MatMul(probabilities, v), the moves between, and the probabilities' layout there."""
    current: ir.Value = probs
    nodes: list[ir.Node] = []
    for _ in range(_MAX_CHAIN):
        uses = list(current.uses())
        if len(uses) != 1 or current.is_graph_output():
            raise NoMatch("the attention probabilities are read outside the attention")
        node = uses[0].node
        if is_onnx_op(node, "MatMul") and uses[0].idx == 0:
            return node, nodes, layout
        if not is_move(node):
            raise NoMatch(f"the attention probabilities go to {node.op_type}, not to a MatMul")
        try:
            layout = step(layout, node, node.outputs[0], shapes)
        except LayoutError as error:
            raise NoMatch(f"the probabilities are moved in a way the fused op cannot follow "
                          f"({error})") from None
        nodes.append(node)
        current = node.outputs[0]
    raise NoMatch("no MatMul after the Softmax")


def _z_roles(layout: Layout) -> list[tuple[str, Atom]]:
    """The batch atoms of the probabilities as ("B"|"N", atom) (all must be whole)."""
    if layout.rank < 3 or [a.axis for a in layout.axes[-2]] not in ([2], []):
        raise NoMatch("the probabilities' rows are not the query positions")
    roles = []
    for atom in [a for axis in layout.axes[:-2] for a in axis]:
        if atom.axis not in (0, 1) or atom.stride != ONE:
            raise NoMatch("the probabilities mix batch and head positions")
        roles.append((_Z[atom.axis], atom))
    return roles


def _merge(context: ir.Node, p_layout: Layout, head_size: int,
           shapes: ShapeInfo) -> tuple[ir.Value, Layout, list[ir.Node], Layout]:
    """Follow the context through the head merge: the value the fused op's output replaces.

    The fused op writes Y = [B, S, N * Hv] (Y axes: 0 batch, 1 sequence, 2 features). Returns
    the furthest value on the merge chain whose layout relative to Y is Y's atoms permuted and
    regrouped (the rewrite rebuilds it with at most a Reshape, a Transpose and a Reshape).
    """
    axes = []
    for axis in p_layout.axes[:-2]:
        atoms = []
        for atom in axis:
            if atom.axis == 0:
                atoms.append(Atom(0, atom.size, ONE))
            else:
                atoms.append(Atom(2, atom.size, Dim(head_size)))
        axes.append(tuple(atoms))
    seq = _size(p_layout.axes[-2])
    layout = Layout((), (0, 0, 0)).with_axes((*axes, (Atom(1, seq, ONE),),
                                              (Atom(2, Dim(head_size), ONE),)))
    whole: dict[int | None, Atom] = {a.axis: a for a in layout.flat() if a.axis in (0, 1)}
    start = layout
    best: tuple[ir.Value, Layout, list[ir.Node]] | None = None
    current = context.outputs[0]
    nodes: list[ir.Node] = []
    for _ in range(_MAX_CHAIN):
        if _rebuildable(layout, whole):
            best = (current, layout, list(nodes))
        uses = list(current.uses())
        if current.is_graph_output() or len(uses) != 1 or not is_move(uses[0].node):
            break
        node = uses[0].node
        try:
            layout = step(layout, node, node.outputs[0], shapes)
        except LayoutError:
            break
        nodes.append(node)
        current = node.outputs[0]
    if best is None:
        raise NoMatch("the heads are not merged back into [batch, sequence, features]")
    return (*best, start)


def _rebuildable(layout: Layout, whole: dict[int | None, Atom]) -> bool:
    """Whether a value of this layout (relative to Y) is Y permuted and regrouped: batch and
    sequence stay whole, the features may be split into runs, nothing is repeated or offset."""
    atoms = layout.flat()
    if any(a.axis is None for a in atoms) or any(layout.offsets):
        return False
    for axis in (0, 1):
        mine = [a for a in atoms if a.axis == axis]
        if (axis in whole) != bool(mine) or (mine and mine != [whole[axis]]):
            return False
    return True


def softmax_attention_like(softmax: ir.Node) -> bool:
    """Whether a Softmax looks like attention (its input from a MatMul of two activations and
    its output into one): such a Softmax left unfused is worth reporting."""
    try:
        matmul = _scores_matmul(softmax)
    except NoMatch:
        return False
    if any(v is None or constant_array(v) is not None for v in matmul.inputs):
        return False
    return any(is_onnx_op(u.node, "MatMul", "IsNaN", "Where", "Reshape", "Cast")
               for u in softmax.outputs[0].uses())


def find_attention(graph: ir.Graph, shapes: ShapeInfo | None = None) -> tuple[
        list[AttentionMatch], list[tuple[ir.Node, str]]]:
    """Every attention of `graph`: (matches, [(softmax, reason)] for attention-like Softmaxes
    that did not match). Softmaxes that are not attention (classifier heads) are not listed."""
    shapes = shapes or ShapeInfo()
    matches, failed = [], []
    for node in graph:
        if not is_onnx_op(node, "Softmax"):
            continue
        try:
            matches.append(match_attention(node, shapes))
        except NoMatch as reason:
            if softmax_attention_like(node):
                failed.append((node, str(reason)))
    return matches, failed
