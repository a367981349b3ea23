"""Building the fused attention's inputs and output around an `AttentionMatch`.

Each builder works on one `Emitter` (the graph, fresh names, the node new nodes go before, and
caches so that layers sharing a mask, a rotary table or a packed projection share what is built
from it):

- `operand_input`: q, k or v as [B, S, heads * head_size] from the operand's source (as it is;
  its part of a packed projection by one Split; transposed when the source is [S, B, D]; gathered
  per head when q, k and v of a head are packed together);
- `rotary`: `com.microsoft.RotaryEmbedding` on that input, its cos/sin cache rows taken from the
  graph's own cos/sin tables (so positions and scaling stay exactly the model's);
- `bias_plan` / `attention_bias` / `key_padding_mask`: the masks and biases added to the scores,
  reduced to the fused op's [B or 1, N or 1, S, T] `attention_bias`, or to a [B, T]
  `key_padding_mask` when the only term is a padding mask over keys;
- `rebuild_output`: the value the attention's head merge produced, from the fused op's
  [B, S, N * Hv] output (a Reshape, a Transpose and a Reshape at most).

Plans (`bias_plan`) are made before anything is built, so a block that cannot be rewritten is
reported with its reason and left as it was.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.passes._kit import Names, add_initializer
from slimgraph.passes.transformer._layout import Atom, Layout
from slimgraph.passes.transformer._match import AttentionMatch, BiasTerm, NoMatch, Operand
from slimgraph.passes.transformer._rotary import Rotary
from slimgraph.passes.transformer._symbolic import ONE, Dim, ShapeInfo, all_true, scalar

__all__ = ["MS_DOMAIN", "Emitter", "BiasPlan", "bias_plan", "operand_input", "rotary_input",
           "rotary_caches", "rotary_positions",
           "attention_bias", "key_padding_mask", "rebuild_output", "padding_term", "inert",
           "check_rotary", "check_operand"]

MS_DOMAIN = "com.microsoft"


class Emitter:
    """Adds nodes before `anchor` (set per attention), with fresh names and shared caches."""

    def __init__(self, graph: ir.Graph, names: Names, shapes: ShapeInfo) -> None:
        self.graph, self.names, self.shapes = graph, names, shapes
        self.anchor: ir.Node | None = None
        self.metadata: dict[str, str] = {}
        self.cache: dict[Any, ir.Value] = {}
        self.created: list[ir.Node] = []

    def op(self, op_type: str, inputs: list[ir.Value | None], *, domain: str = "",
           outputs: int = 1, dtype: ir.DataType | None = None, **attrs: Any) -> list[ir.Value]:
        assert self.anchor is not None
        node = ir.node(op_type, inputs, attributes=attrs, domain=domain, num_outputs=outputs,
                       name=self.names.fresh(f"{self.anchor.name or 'attention'}_{op_type}"))
        node.metadata_props.update(self.metadata)
        for out in node.outputs:
            out.name = self.names.fresh(f"attention_{op_type.lower()}")
            if dtype is not None:
                out.dtype = dtype
        self.graph.insert_before(self.anchor, node)
        self.created.append(node)
        return list(node.outputs)

    def one(self, op_type: str, inputs: list[ir.Value | None], **attrs: Any) -> ir.Value:
        return self.op(op_type, inputs, **attrs)[0]

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        key = ("const", base, array.dtype.str, array.shape, array.tobytes())
        if key not in self.cache:
            self.cache[key] = add_initializer(self.graph, base, array, names=self.names)
        return self.cache[key]

    def ints(self, values: list[int]) -> ir.Value:
        return self.const("attention_shape", np.array(values, np.int64))

    def dim(self, value: ir.Value, axis: int) -> ir.Value:
        """A 1-element int64 tensor: `value`'s size on `axis` at run time."""
        key = ("dim", id(value), axis)
        if key not in self.cache:
            self.cache[key] = self.one("Shape", [value], start=axis, end=axis + 1)
        return self.cache[key]

    def shape_vector(self, parts: list[ir.Value | int]) -> ir.Value:
        """Concat of run-time sizes (values) and static sizes (ints) into a shape."""
        if all(isinstance(p, int) for p in parts):
            return self.ints([int(p) for p in parts])  # type: ignore[arg-type]
        pieces = [self.ints([p]) if isinstance(p, int) else p for p in parts]
        return self.one("Concat", pieces, axis=0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- operands


def check_operand(operand: Operand) -> None:
    """Raise NoMatch when `operand_input` cannot build the operand (checked before rewriting)."""
    if operand.standard:
        return
    if len(operand.source_dims) != 3:
        raise NoMatch(f"{operand.role} source of rank {len(operand.source_dims)} (expected 3)")
    if operand.head_stride != operand.head_size:
        width = operand.source_width
        if width is None or width != operand.heads * operand.head_stride or (
                operand.offset >= operand.head_stride):
            raise NoMatch(f"{operand.role} heads interleaved in a way the fused op cannot take")


def operand_input(em: Emitter, match: AttentionMatch, operand: Operand) -> ir.Value:
    """`operand` as [B, S, heads * head_size] (see the module docstring); `check_operand`
    has accepted it."""
    source = operand.source
    if operand.standard:
        return source
    batch = operand.batch_axis
    if batch is None:
        batch = next(i for i in range(3) if i not in (operand.seq_axis, operand.feature_axis))
    perm = [batch, operand.seq_axis, operand.feature_axis]
    value = source
    if perm != [0, 1, 2]:
        key = ("transpose", id(source), tuple(perm))
        if key not in em.cache:
            em.cache[key] = em.one("Transpose", [source], perm=perm)
        value = em.cache[key]
    width = operand.source_width
    if operand.head_stride != operand.head_size:  # heads interleaved with other heads' parts
        heads, stride = operand.heads, operand.head_stride
        split = em.one("Reshape", [value, em.ints([0, 0, heads, stride])])
        part = em.one("Slice", [split, em.ints([operand.offset]),
                                em.ints([operand.offset + operand.head_size]), em.ints([3])])
        return em.one("Reshape", [part, em.ints([0, 0, heads * operand.head_size])])
    if operand.offset == 0 and width == operand.width:
        return value
    parts = _packed_parts(match, operand)
    if parts is not None and width == sum(parts):
        key = ("split", id(value), tuple(parts))
        if key not in em.cache:
            outs = em.op("Split", [value, em.ints(parts)], outputs=len(parts), axis=2)
            for i, out in enumerate(outs):
                em.cache[(*key, i)] = out
            em.cache[key] = outs[0]
        index = _packed_index(match, operand)
        return em.cache[(*key, index)]
    return em.one("Slice", [value, em.ints([operand.offset]),
                            em.ints([operand.offset + operand.width]), em.ints([2])])


def _packed_parts(match: AttentionMatch, operand: Operand) -> list[int] | None:
    """Sizes of a Split giving q, k, v (in feature order) when they tile one source."""
    sharing = [o for o in (match.q, match.k, match.v) if o.source is operand.source]
    if len(sharing) < 2 or any(o.head_stride != o.head_size for o in sharing):
        return None
    if len({(o.batch_axis, o.seq_axis, o.feature_axis) for o in sharing}) != 1:
        return None
    ranges = sorted((o.offset, o.offset + o.width) for o in sharing)
    if ranges[0][0] != 0 or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:], strict=False)):
        return None
    return [end - start for start, end in ranges]


def _packed_index(match: AttentionMatch, operand: Operand) -> int:
    sharing = sorted(o.offset for o in (match.q, match.k, match.v)
                      if o.source is operand.source)
    return sharing.index(operand.offset)


def rotary_caches(em: Emitter, rotary: Rotary,
                  rows: ir.Value | None = None) -> tuple[ir.Value, ir.Value]:
    """The cos and sin caches [R, dim / 2] (one value per rotated pair) the fused ops index by
    position id: the graph's own tables flattened, row `b * S + s` for batch row b and token s
    of a table that varies with the batch (`Rotary.batched`), row s otherwise. `rows`: a
    1-element int64 tensor; the caches are padded with zeros to at least that many rows
    (GroupQueryAttention wants a row per key position)."""
    caches = []
    for table in (rotary.cos, rotary.sin):
        key = ("rotary", id(table), id(rows))
        if key not in em.cache:  # one value per rotated pair: the first half, or every other
            half = em.one("Slice", [table, em.ints([0]), em.ints([
                rotary.dim if rotary.interleaved else rotary.dim // 2]), em.ints([-1]),
                em.ints([2 if rotary.interleaved else 1])])
            flat = em.one("Reshape", [half, em.ints([-1, rotary.dim // 2])])
            if rows is not None:
                dtype = table.dtype.numpy() if table.dtype is not None else np.float32
                zeros = em.one("ConstantOfShape", [em.shape_vector([rows, rotary.dim // 2])],
                               value=ir.tensor(np.zeros(1, dtype)))
                flat = em.one("Concat", [flat, zeros], axis=0)
            em.cache[key] = flat
        caches.append(em.cache[key])
    return caches[0], caches[1]


def rotary_positions(em: Emitter, rotary: Rotary, value: ir.Value, *,
                     full: bool = False) -> ir.Value:
    """Position ids into `rotary_caches` for `value` [B, S, ...]: [B, S] (`b * S + s` for a
    table that varies with the batch, else s), or the offset [0] when the table does not vary
    with the batch and `full` is not asked."""
    if not rotary.batched and not full:
        return em.const("rotary_position_offset", np.array([0], np.int64))
    key = ("positions", id(rotary.cos), id(value), full)
    if key not in em.cache:
        seq = em.dim(value, 1)
        rows = em.one("Mul", [em.dim(value, 0), seq]) if rotary.batched else seq
        scalar_rows = em.one("Squeeze", [rows, em.ints([0])])
        ids = em.one("Range", [em.const("attention_zero_i64", np.array(0, np.int64)),
                               scalar_rows, em.const("attention_one_i64", np.array(1, np.int64))])
        grid = em.one("Reshape", [ids, em.shape_vector([-1, seq])])
        if not rotary.batched:
            grid = em.one("Expand", [grid, em.shape_vector([em.dim(value, 0), seq])])
        em.cache[key] = grid
    return em.cache[key]


def rotary_input(em: Emitter, match: AttentionMatch, operand: Operand,
                 value: ir.Value) -> ir.Value:
    """`com.microsoft.RotaryEmbedding` of `value` [B, S, heads * head_size] with the operand's
    rotary tables; `value` when the operand has no rotary embedding."""
    rotary = operand.rotary
    if rotary is None:
        return value
    cos, sin = rotary_caches(em, rotary)
    positions = rotary_positions(em, rotary, value)
    return em.one("RotaryEmbedding", [value, positions, cos, sin], domain=MS_DOMAIN,
                  num_heads=operand.heads, rotary_embedding_dim=rotary.dim,
                  interleaved=int(rotary.interleaved))


def check_rotary(operand: Operand, shapes: ShapeInfo) -> None:
    """Raise NoMatch unless the rotary tables are [.., S, dim] with only the sequence and the
    batch varying (1 on the heads, the batch before the sequence): then row `b * S + s` of the
    flattened table is batch row b's token s (`Rotary.batched` says whether the batch varies)."""
    rotary = operand.rotary
    if rotary is None:
        return
    layout = rotary.cos_layout
    batched = False
    for table in (rotary.cos, rotary.sin):
        dims = shapes.shape(table)
        if layout is None or dims is None or len(dims) > layout.rank:
            raise NoMatch("rotary table shape unknown")
        pad = layout.rank - len(dims)
        seen_seq = False
        for axis, atoms in enumerate(layout.axes):
            dim = dims[axis - pad] if axis >= pad else ONE
            seq = any(a.axis == operand.seq_axis for a in atoms)
            batch = operand.batch_axis is not None and any(
                a.axis == operand.batch_axis for a in atoms)
            if axis == layout.rank - 1:
                if dim != Dim(rotary.dim):
                    raise NoMatch("rotary table width differs from the rotated features")
            elif seq:
                seen_seq = True
            elif batch and dim != ONE and not seen_seq and len(atoms) == 1:
                batched = True
            elif dim != ONE:
                raise NoMatch("rotary tables that vary with the head (or batch after sequence)")
    rotary.batched = batched


# ------------------------------------------------------------------------------- masks


@dataclasses.dataclass
class BiasPlan:
    """How one bias term becomes [B|1, N|1, S, T]: `pad` leading axes, then a Reshape to
    `z` (per Z axis: True = full, False = 1) when the scores layout is not [B, N, S, T]."""

    term: BiasTerm
    value: ir.Value  # the tensor to reduce (the term's value, or a masked fill's condition)
    pad: int
    z: tuple[bool, bool, bool, bool]
    reshape: bool


def bias_plan(term: BiasTerm, shapes: ShapeInfo, value: ir.Value | None = None) -> BiasPlan:
    """Plan the reduction of `term` (or of `value` broadcast like it) to the fused op's form.

    Raises:
        NoMatch: the bias does not broadcast against the scores, or the scores are laid out in
            an order the plan cannot follow.
    """
    value = value if value is not None else term.value
    layout = term.layout
    dims = shapes.shape(value)
    if dims is None:
        raise NoMatch("mask shape unknown")
    pad = layout.rank - len(dims)
    if pad < 0:
        raise NoMatch("mask of higher rank than the scores")
    full: list[bool] = []
    for axis in range(layout.rank):
        size = layout.size(axis)
        dim = dims[axis - pad] if axis >= pad else ONE
        if dim == ONE:
            full.append(size == ONE)
        elif dim == size or not (dim.static and size.static):
            full.append(True)
        else:
            raise NoMatch(f"mask of shape [{', '.join(map(str, dims))}] does not broadcast "
                          "against the scores")
    atoms = [(axis, a) for axis, atoms in enumerate(layout.axes) for a in atoms]
    order = [a.axis if a.axis is not None else -1 for _, a in atoms]
    if -1 in order or order != sorted(order) or any(a.stride != ONE for _, a in atoms):
        raise NoMatch("mask on scores laid out in another order than [B, N, S, T]")
    z = [True, True, True, True]
    for axis, atom in atoms:
        assert atom.axis is not None
        z[atom.axis] = full[axis]
    for role in (0, 1, 2, 3):
        if role not in order:
            z[role] = False  # size 1
    canonical = layout.rank == 4 and all(
        all(a.axis == i for a in layout.axes[i]) for i in range(4))
    return BiasPlan(term, value, pad, (z[0], z[1], z[2], z[3]), not canonical)


def _z_form(em: Emitter, plan: BiasPlan, value: ir.Value, q_in: ir.Value, kv_len: ir.Value,
            heads: int, expand: bool = True) -> ir.Value:
    """`value` (shaped like the plan's tensor) as [B|1, N|1, S, T] (S and T expanded); `kv_len`
    is T, a 1-element int64 tensor."""
    if plan.pad and not plan.reshape:
        value = em.one("Unsqueeze", [value, em.ints(list(range(plan.pad)))])
    if plan.reshape:
        sizes: list[ir.Value | int] = [
            em.dim(q_in, 0) if plan.z[0] else 1, heads if plan.z[1] else 1,
            em.dim(q_in, 1) if plan.z[2] else 1, kv_len if plan.z[3] else 1,
        ]
        value = em.one("Reshape", [value, em.shape_vector(sizes)])
    if expand and not (plan.z[2] and plan.z[3]):
        sizes = [1, 1, em.dim(q_in, 1) if not plan.z[2] else 1,
                 kv_len if not plan.z[3] else 1]
        value = em.one("Expand", [value, em.shape_vector(sizes)])
    return value


def inert(term: BiasTerm) -> bool:
    """Whether the term adds nothing: a mask that keeps everything."""
    if term.fill is not None:
        return not term.fill_if and all_true(term.value)
    node = term.value.producer()
    if node is None or node.op_type != "Where" or node.domain not in ("", "ai.onnx"):
        return False
    return scalar(node.inputs[1]) == 0.0 and all_true(node.inputs[0])


def padding_term(terms: list[BiasTerm], shapes: ShapeInfo) -> tuple[BiasPlan, bool, float] | None:
    """(plan of the mask condition, True where kept, fill) when the only term masks keys per
    batch row ([B, 1, 1, T] after broadcasting): the fused op's key_padding_mask."""
    if len(terms) != 1:
        return None
    term = terms[0]
    cond, keep_if, fill = None, True, 0.0
    if term.fill is not None:
        cond, keep_if, fill = term.value, not term.fill_if, term.fill * term.factor
    else:
        node = term.value.producer()
        if node is not None and node.op_type == "Where" and node.domain in ("", "ai.onnx"):
            a, b = scalar(node.inputs[1]), scalar(node.inputs[2])
            if a == 0.0 and b is not None and b * term.factor <= -1e4:
                cond, keep_if, fill = node.inputs[0], True, b * term.factor
            elif b == 0.0 and a is not None and a * term.factor <= -1e4:
                cond, keep_if, fill = node.inputs[0], False, a * term.factor
    if cond is None or cond.dtype != ir.DataType.BOOL:
        return None
    while (node := cond.producer()) is not None and node.domain in ("", "ai.onnx"):
        first, second = (list(node.inputs) + [None])[:2]
        if node.op_type == "Expand" and first is not None:  # broadcasting does the same
            cond = first
        elif node.op_type == "And" and keep_if and all_true(first) and second is not None:
            cond = second  # `mask & always-true` is the mask (broadcast)
        elif node.op_type == "And" and keep_if and all_true(second) and first is not None:
            cond = first
        else:
            break
    try:
        plan = bias_plan(term, shapes, cond)
    except NoMatch:
        return None
    if plan.z != (True, False, False, True):
        return None
    return plan, keep_if, fill


def key_padding_mask(em: Emitter, found: tuple[BiasPlan, bool, float], q_in: ir.Value,
                     kv_len: ir.Value, heads: int) -> ir.Value:
    """int32 [B, T], 1 where the key is kept."""
    plan, keep_if, _ = found
    key = ("padding", id(plan.value), keep_if)
    if key not in em.cache:
        cond = _z_form(em, plan, plan.value, q_in, kv_len, heads, expand=False)
        flat = em.one("Reshape", [cond, em.ints([0, -1])])
        if not keep_if:
            flat = em.one("Not", [flat])
        em.cache[key] = em.op("Cast", [flat], to=ir.DataType.INT32, dtype=ir.DataType.INT32)[0]
    return em.cache[key]


def attention_bias(em: Emitter, plans: list[BiasPlan], q_in: ir.Value, kv_len: ir.Value,
                   heads: int, dtype: np.dtype) -> ir.Value | None:
    """The sum of the terms as one float [B|1, N|1, S, T] tensor (None without terms); `kv_len`
    is T, a 1-element int64 tensor."""
    total = None
    for plan in plans:
        term = plan.term
        key = ("bias", id(term.value), term.fill, term.fill_if, term.factor, plan.reshape,
               (id(q_in), id(kv_len)) if plan.reshape or not (plan.z[2] and plan.z[3]) else 0)
        if key not in em.cache:
            value = term.value
            if term.fill is not None:
                fill = em.const("attention_mask_fill", np.array(term.fill * term.factor, dtype))
                zero = em.const("attention_mask_zero", np.array(0, dtype))
                pair = [fill, zero] if term.fill_if else [zero, fill]
                value = em.one("Where", [value, *pair])
            elif term.factor != 1.0:
                value = em.one("Mul", [value, em.const("attention_bias_scale",
                                                       np.array(term.factor, dtype))])
            em.cache[key] = _z_form(em, plan, value, q_in, kv_len, heads)
        part = em.cache[key]
        total = part if total is None else em.one("Add", [total, part])
    return total


# ------------------------------------------------------------------------------- output


def rebuild_output(em: Emitter, y: ir.Value, layout: Layout) -> ir.Value:
    """The value of `layout` (relative to Y [B, S, D]) from Y: features split into the
    layout's runs, axes permuted, regrouped (each step only where needed)."""
    atoms = layout.flat()
    feature = sorted((a for a in atoms if a.axis == 2), key=lambda a: -a.stride.coef)
    if len(feature) > 1:
        y = em.one("Reshape", [y, em.ints([0, 0, *[a.size.coef for a in feature]])])
        axes: list[Atom | None] = [None, None, *feature]
    else:
        axes = [None, None, feature[0] if feature else None]
    for atom in atoms:
        if atom.axis in (0, 1):
            axes[atom.axis] = atom
    order = [axes.index(a) for a in atoms]
    missing = [i for i, a in enumerate(axes) if a is None or a not in atoms]
    perm = missing + order
    if perm != sorted(perm):
        y = em.one("Transpose", [y], perm=perm)
    target = [a for a in layout.axes]
    current = [axes[p] for p in perm]
    if [tuple(x for x in t) for t in target] == [((c,) if c is not None else ()) for c in current]:
        return y
    sizes: list[ir.Value | int] = []
    for group in target:
        symbolic = [a for a in group if not a.size.static]
        static = int(np.prod([a.size.coef for a in group if a.size.static]))
        if not symbolic:
            sizes.append(static)
            continue
        runtime: ir.Value = em.dim(y, perm.index(axes.index(symbolic[0])))
        for extra in symbolic[1:]:
            runtime = em.one("Mul", [runtime, em.dim(y, perm.index(axes.index(extra)))])
        if static != 1:
            runtime = em.one("Mul", [runtime, em.ints([static])])
        sizes.append(runtime)
    return em.one("Reshape", [y, em.shape_vector(sizes)])
