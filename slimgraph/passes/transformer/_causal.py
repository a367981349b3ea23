"""Proving that an attention's mask is causal, from the mask's own computation.

onnxruntime's GroupQueryAttention with a key/value cache applies its own causal mask (query i of
S new tokens sees keys 0 .. P + i of P past and S new); fusing a block into it is exact only when
the model's mask hides at least those keys. Exporters build the mask from index ranges:
transformers compares the key positions `arange(T) + kv_offset` with the query positions
`arange(S) + past_length` (`kv_idx <= q_idx`), ANDs padding and other masks onto it and turns
the result into a -inf bias or a masked fill. `proves_causal` follows one bias term of the scores
back to such a comparison: it writes each side as an affine function of the query index i and
the key index j (`IndexForm`: Range along an axis, symbolic sizes read from shapes, constants,
Add/Sub, Unsqueeze, broadcasting, full Slices, Casts) and checks that the comparison keeps a key
only where `j - i <= T - S`, with the key Range spanning the scores' T axis. A mask that keeps
no more than that is exact under the op's own causal mask (the op then adds the whole mask as
its bias). Anything else is not a proof (the block is then not fused into GroupQueryAttention).

Nothing here changes the graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes.transformer._match import BiasTerm
from slimgraph.passes.transformer._symbolic import Dim, ShapeInfo, scalar

__all__ = ["proves_causal", "IndexForm", "linear"]

_MAX_DEPTH = 24
_INT_MAX = 2**62
_FILL_LIMIT = -1e4

Linear = dict[str, int]  # symbol (or "" for the constant) -> coefficient


def linear(dim: Dim) -> Linear:
    """A dimension as a linear form over symbols; a sum named `a + b` (`_symbolic.sum_dim`, or
    the exporter's own name) counts as its terms."""
    if dim.static:
        return {"": dim.coef} if dim.coef else {}
    if len(dim.syms) != 1:
        return {"*".join(dim.syms): dim.coef}
    out: Linear = {}
    for term in dim.syms[0].split(" + "):
        term = term.strip()
        key, coef = ("", int(term)) if term.lstrip("-").isdigit() else (term, 1)
        out[key] = out.get(key, 0) + coef * dim.coef
    return {k: v for k, v in out.items() if v}


def _add(a: Linear, b: Linear, sign: int = 1) -> Linear:
    out = dict(a)
    for key, coef in b.items():
        out[key] = out.get(key, 0) + sign * coef
    return {k: v for k, v in out.items() if v}


@dataclasses.dataclass(frozen=True)
class IndexForm:
    """`value[..., i_1, i_0] = sum(coef[a] * i_a) + offset`: an integer tensor affine in its
    indices, axes counted from the last (`lengths[a]`: the size of axis a where it matters)."""

    coefs: tuple[tuple[int, int], ...]
    offset: tuple[tuple[str, int], ...]
    lengths: tuple[tuple[int, Dim], ...] = ()

    @classmethod
    def make(cls, coefs: dict[int, int], offset: Linear,
             lengths: dict[int, Dim] | None = None) -> IndexForm:
        return cls(tuple(sorted((a, c) for a, c in coefs.items() if c)),
                   tuple(sorted(offset.items())), tuple(sorted((lengths or {}).items())))

    def plus(self, other: IndexForm, sign: int = 1) -> IndexForm | None:
        coefs = dict(self.coefs)
        for axis, coef in other.coefs:
            coefs[axis] = coefs.get(axis, 0) + sign * coef
        lengths = dict(self.lengths)
        for axis, size in other.lengths:
            if lengths.setdefault(axis, size) != size:
                return None
        return IndexForm.make(coefs, _add(dict(self.offset), dict(other.offset), sign), lengths)


def _index_form(value: ir.Value | None, shapes: ShapeInfo, depth: int = 0) -> IndexForm | None:
    """`value` as an `IndexForm`, or None when it is not evidently affine in its indices."""
    if value is None or depth > _MAX_DEPTH:
        return None
    number = scalar(value)
    if number is not None:
        return IndexForm.make({}, {"": int(number)}) if float(number).is_integer() else None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op in ("Cast", "CastLike", "Identity", "Expand"):
        return _index_form(node.inputs[0], shapes, depth + 1)
    if op in ("Add", "Sub"):
        a = _index_form(node.inputs[0], shapes, depth + 1)
        b = _index_form(node.inputs[1], shapes, depth + 1)
        return None if a is None or b is None else a.plus(b, 1 if op == "Add" else -1)
    if op == "Range":
        start, delta = _index_form(node.inputs[0], shapes, depth + 1), scalar(node.inputs[2])
        dims = shapes.shape(value)
        if start is None or start.coefs or delta != 1 or dims is None or len(dims) != 1:
            return None
        return IndexForm.make({0: 1}, dict(start.offset), {0: dims[0]})
    if op == "Unsqueeze":
        inner = _index_form(node.inputs[0], shapes, depth + 1)
        rank, axes = shapes.rank(node.inputs[0]), shapes.array(node.inputs[1])
        if inner is None or rank is None or axes is None:
            return None
        new_rank = rank + axes.size
        added = {int(a) % new_rank for a in axes.reshape(-1)}
        kept = [i for i in range(new_rank) if i not in added]  # new position of old axis k
        move = {rank - 1 - k: new_rank - 1 - kept[k] for k in range(rank)}  # from the right
        return IndexForm.make({move[a]: c for a, c in inner.coefs}, dict(inner.offset),
                              {move[a]: d for a, d in inner.lengths})
    if op == "Slice" and _full_slice(node, shapes):
        return _index_form(node.inputs[0], shapes, depth + 1)
    ints = shapes.ints(value)  # a size read from a shape (`past_length = Shape(past)[2]`)
    if ints is not None and len(ints) == 1:
        return IndexForm.make({}, linear(ints[0]))
    return None


def _full_slice(node: ir.Node, shapes: ShapeInfo) -> bool:
    """A Slice that keeps every element."""
    parts = [shapes.array(v) if v is not None else None for v in node.inputs[1:5]]
    parts += [None] * (4 - len(parts))
    starts, ends, _, steps = parts
    return starts is not None and ends is not None and not np.any(starts != 0) and not np.any(
        ends < _INT_MAX) and (steps is None or not np.any(steps != 1))


def _factors(value: ir.Value | None, keep: bool, depth: int = 0) -> Iterator[tuple[ir.Node, bool]]:
    """The comparisons whose conjunction keeps a key: (node, keep where the node is `keep`)."""
    if value is None or depth > _MAX_DEPTH:
        return
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return
    op = node.op_type
    if (op == "And" and keep) or (op == "Or" and not keep):
        for item in node.inputs:
            yield from _factors(item, keep, depth + 1)
    elif op == "Not":
        yield from _factors(node.inputs[0], not keep, depth + 1)
    elif op in ("Expand", "Identity") or (op == "Cast" and node.inputs[0] is not None
                                           and node.inputs[0].dtype == ir.DataType.BOOL):
        yield from _factors(node.inputs[0], keep, depth + 1)
    elif op in ("LessOrEqual", "Less", "GreaterOrEqual", "Greater"):
        yield node, keep


def _kept(term: BiasTerm) -> tuple[ir.Value, bool] | None:
    """(condition, keep where it is this) of a mask term: a masked fill, or a bias
    `Where(c, 0, fill)` / `Where(c, fill, 0)` whose fill hides the key."""
    if term.fill is not None:
        return term.value, not term.fill_if
    node = term.value.producer()
    if node is None or not is_onnx_op(node, "Where") or node.inputs[0] is None:
        return None
    a, b = scalar(node.inputs[1]), scalar(node.inputs[2])
    if a == 0.0 and b is not None and b * term.factor <= _FILL_LIMIT:
        return node.inputs[0], True
    if b == 0.0 and a is not None and a * term.factor <= _FILL_LIMIT:
        return node.inputs[0], False
    return None


def proves_causal(terms: list[BiasTerm], queries: Dim, keys: Dim, shapes: ShapeInfo) -> bool:
    """Whether one of the scores' mask terms keeps key j for query i only where
    `j - i <= keys - queries` (the last `queries` of `keys` positions are the queries: a causal
    mask over a cache), so a causal fused op computes the same.

    Args:
        terms: the bias terms added to the scores (`AttentionMatch.bias`).
        queries, keys: the scores' S and T sizes.
        shapes: the graph's symbolic shapes.
    """
    offset = _add(linear(keys), linear(queries), -1)  # T - S: the past length
    for term in terms:
        axes = term.layout.axes
        if len(axes) < 2 or [a.axis for a in axes[-1]] != [3] or (
                [a.axis for a in axes[-2]] not in ([2], [])):
            continue  # the mask's last axes are not [S, T]
        kept = _kept(term)
        if kept is None:
            continue
        for node, keep in _factors(kept[0], kept[1]):
            if _causal_comparison(node, keep, offset, keys, shapes):
                return True
    return False


def _causal_comparison(node: ir.Node, keep: bool, offset: Linear, keys: Dim,
                       shapes: ShapeInfo) -> bool:
    """Whether keeping where `node` is `keep` keeps exactly `j - i - offset <= 0`, j running
    over all `keys` (a query Range of length 1 broadcast over the queries keeps fewer keys,
    which a causal op computes the same)."""
    a = _index_form(node.inputs[0], shapes)
    b = _index_form(node.inputs[1], shapes)
    if a is None or b is None:
        return False
    op = node.op_type
    # normalize to "kept where diff <= 0"
    if op in ("LessOrEqual", "Less"):
        diff, strict = a.plus(b, -1), op == "Less"
    else:
        diff, strict = b.plus(a, -1), op == "Greater"
    if not keep:  # kept where the comparison fails: a > b is b - a < 0
        if diff is None:
            return False
        diff = IndexForm.make({}, {}).plus(diff, -1)
        strict = not strict
    if diff is None:
        return False
    if strict:  # x < 0 is x + 1 <= 0 for integers
        diff = diff.plus(IndexForm.make({}, {"": 1}))
        if diff is None:
            return False
    if dict(diff.coefs) != {0: 1, 1: -1} or dict(diff.lengths).get(0) != keys:
        return False
    return _add(dict(diff.offset), offset) == {}
