"""Attention-head pruning: remove whole heads, with every head count in the graph updated.

One head of an attention block is a channel group that the generic channel tracer cannot form
(the head split Reshape mixes the channel axis): the head's H output columns of the Q, K and V
projections (and biases) together with the H input rows of the output projection. Removing it
shrinks all four weights, and the head count wherever the graph states it:

- fused form (`fuse-attention` ran): `num_heads` of `com.microsoft.MultiHeadAttention`;
- plain dynamo form: the head split Reshapes `[B, S, N, H]` and the head merge Reshape
  `[B, S, N*H]` get constant shapes `[0, 0, N', H]` / `[0, 0, N'*H]` (allowzero=0: copy batch
  and sequence, which the matcher checked they keep); a packed QKV Split (GPT-2) gets its sizes.

Importance per head: the L2 (or L1) norm of the head's Q/K/V columns and output-projection rows.
A head whose output-projection rows (or V columns and V bias) are all zero contributes nothing:
its score is 0, it goes first, and removing it is exact. `ratio` is the fraction of heads removed
per attention block (at least one head stays). The output shapes never change (the output
projection keeps its width). The FFN hidden dimension is pruned by the `prune` pass as before.

Approximate (`exact = False`) in general; exact for dead heads (tested).
Source: Michel et al. 2019, "Are Sixteen Heads Really Better than One?" (head importance and
pruning); Torch-Pruning's head groups (where `num_heads` must be fixed by hand).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from slimgraph.errors import BadOptionError
from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes._kit import Names, add_initializer, constant_array
from slimgraph.passes.base import Skipped, SlimgraphFunctionalPass, SlimgraphPassResult
from slimgraph.passes.fuse_attention import MS_DOMAIN, _NoMatch, match_attention
from slimgraph.passes.prune import prepare_for_pruning
from slimgraph.passes.registry import register_pass

__all__ = ["HeadReport", "PruneHeadsResult", "PruneHeadsPass", "prune_heads", "CRITERIA"]

logger = logging.getLogger(__name__)

CRITERIA = ("l2", "l1")


@dataclasses.dataclass(frozen=True)
class HeadReport:
    """One attention block: heads before and after, which were removed, their scores."""

    node: str
    heads: int
    kept: int
    removed: tuple[int, ...]
    scores: tuple[float, ...]


@dataclasses.dataclass
class PruneHeadsResult(SlimgraphPassResult):
    blocks: list[HeadReport] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Weight:
    """A constant matrix input (or bias) of a node and the axis that holds the head positions."""

    node: ir.Node
    index: int
    axis: int
    offset: int = 0  # column offset of this part in a packed QKV weight


@dataclasses.dataclass
class _Site:
    name: str
    heads: int
    head_size: int
    qkv: list[_Weight]  # weights and biases of q, k, v (axis = head columns)
    out: _Weight  # output projection rows
    v_parts: list[_Weight]  # V weight and bias only (dead-head test)
    mha: ir.Node | None = None
    split_reshapes: list[ir.Node] = dataclasses.field(default_factory=list)
    merge_reshape: ir.Node | None = None
    split: ir.Node | None = None
    core: list[ir.Node] = dataclasses.field(default_factory=list)  # matched attention nodes


def _projection(value: ir.Value, offset: int = 0) -> list[_Weight]:
    """Weight (+ bias) of `Add(MatMul(x, W), b)` / `MatMul(x, W)` producing `value`."""
    node = value.producer()
    parts: list[_Weight] = []
    if node is not None and is_onnx_op(node, "Add"):
        for i in (0, 1):
            operand = node.inputs[i]
            mm = operand.producer() if operand is not None else None
            bias = constant_array(node.inputs[1 - i])
            if mm is not None and is_onnx_op(mm, "MatMul") and bias is not None and bias.ndim == 1:
                parts.append(_Weight(node, 1 - i, 0, offset))
                node = mm
                break
        else:
            raise _NoMatch("projection Add without a constant 1-D bias")
    if node is None or not is_onnx_op(node, "MatMul"):
        raise _NoMatch("q/k/v is not a MatMul projection")
    weight = constant_array(node.inputs[1])
    if weight is None or weight.ndim != 2:
        raise _NoMatch("projection weight is not a constant matrix")
    return [_Weight(node, 1, 1, offset), *parts]


def _private(value: ir.Value, reader: ir.Node) -> None:
    if value.is_graph_output() or any(u.node is not reader for u in value.uses()):
        raise _NoMatch("a projection output is read outside the attention")


def _qkv(q: ir.Value, k: ir.Value, v: ir.Value, readers: Sequence[ir.Node], width: int) -> tuple[
        list[_Weight], list[_Weight], ir.Node | None]:
    split = q.producer()
    if split is not None and is_onnx_op(split, "Split") and split is k.producer() is v.producer():
        if list(split.outputs) != [q, k, v]:
            raise _NoMatch("Split outputs are not q, k, v in order")
        packed = split.inputs[0]
        assert packed is not None
        for out, reader in zip((q, k, v), readers, strict=True):
            _private(out, reader)
        qkv = _projection(packed)
        parts: list[_Weight] = []
        for offset in (0, width, 2 * width):
            parts += [dataclasses.replace(w, offset=offset) for w in qkv]
        return parts, [dataclasses.replace(w, offset=2 * width) for w in qkv], split
    parts = []
    for out, reader in zip((q, k, v), readers, strict=True):
        _private(out, reader)
        parts += _projection(out)
    return parts, _projection(v), None


def _out_projection(value: ir.Value) -> _Weight:
    uses = list(value.uses())
    if value.is_graph_output() or len(uses) != 1:
        raise _NoMatch("attention output is not read by one output projection")
    node = uses[0].node
    weight = constant_array(node.inputs[1]) if is_onnx_op(node, "MatMul") else None
    if uses[0].idx != 0 or weight is None or weight.ndim != 2:
        raise _NoMatch("attention output does not feed a MatMul with a constant weight")
    return _Weight(node, 1, 0)


def _sites(graph: ir.Graph) -> tuple[list[_Site], list[Skipped]]:
    sites, skipped = [], []
    for node in graph:
        try:
            if node.domain == MS_DOMAIN and node.op_type == "MultiHeadAttention":
                q, k, v = node.inputs[:3]
                if q is None or k is None or v is None or (len(node.inputs) > 3
                                                           and node.inputs[3] is not None):
                    raise _NoMatch("MultiHeadAttention with packed inputs or a bias input")
                heads = node.attributes.get_int("num_heads", 0)
                total = q.shape[-1] if q.shape is not None and len(q.shape) == 3 else None
                if not heads or not isinstance(total, int) or total % heads:
                    raise _NoMatch("head size unknown (q is not [B, S, N*H] with static N*H)")
                qkv, v_parts, split = _qkv(q, k, v, [node] * 3, total)
                sites.append(_Site(node.name or "MultiHeadAttention", heads, total // heads, qkv,
                                   _out_projection(node.outputs[0]), v_parts, mha=node,
                                   split=split))
            elif is_onnx_op(node, "Softmax"):
                match = match_attention(node)
                split_reshapes = [n for n in match.nodes if is_onnx_op(n, "Reshape")][:-1]
                by_input = {id(r.inputs[0]): r for r in split_reshapes}
                readers = [by_input[id(t)] for t in (match.q, match.k, match.v)]
                width = match.heads * match.head_size
                qkv, v_parts, split = _qkv(match.q, match.k, match.v, readers, width)
                sites.append(_Site(match.output.name or "attention", match.heads,
                                   match.head_size, qkv, _out_projection(match.output), v_parts,
                                   split_reshapes=split_reshapes, merge_reshape=match.nodes[-1],
                                   split=split, core=match.nodes))
        except (_NoMatch, KeyError) as reason:
            if node.op_type in ("Softmax", "MultiHeadAttention"):
                skipped.append(Skipped(node.name or "", node.op_type, str(reason)))
    return sites, skipped


def _positions(site: _Site, heads: Sequence[int], offset: int = 0) -> np.ndarray:
    h = site.head_size
    return np.concatenate([np.arange(offset + i * h, offset + (i + 1) * h) for i in heads])


def _array(w: _Weight) -> np.ndarray:
    array = constant_array(w.node.inputs[w.index])
    assert array is not None
    return array


def _head_scores(site: _Site, criterion: str) -> np.ndarray:
    scores = np.zeros(site.heads)
    dead = np.zeros(site.heads, bool)
    out = _array(site.out)
    for head in range(site.heads):
        rows = _positions(site, [head])
        chunks = [np.take(_array(w), rows + w.offset, axis=w.axis) for w in site.qkv]
        chunks.append(out[rows])
        values = np.concatenate([c.ravel() for c in chunks]).astype(np.float64)
        scores[head] = np.abs(values).sum() if criterion == "l1" else np.sqrt((values**2).sum())
        v_zero = all(not np.any(np.take(_array(w), rows + w.offset, axis=w.axis))
                     for w in site.v_parts)
        dead[head] = v_zero or not np.any(out[rows])
    scores[dead] = 0.0
    return scores


def _slice(graph: ir.Graph, names: Names, w: _Weight, keep: np.ndarray) -> None:
    array = _array(w)
    old = w.node.inputs[w.index]
    assert old is not None
    base = old.name or "weight"
    new = add_initializer(graph, names.fresh(f"{base}_heads"),
                          np.ascontiguousarray(np.take(array, keep, axis=w.axis)))
    w.node.replace_input_with(w.index, new)


def _shape_constant(graph: ir.Graph, names: Names, node: ir.Node, dims: list[int]) -> None:
    value = add_initializer(graph, names.fresh("heads_shape"), np.array(dims, np.int64))
    node.replace_input_with(1, value)
    node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)


def _rewrite(graph: ir.Graph, names: Names, site: _Site, kept_heads: list[int]) -> None:
    width = site.heads * site.head_size
    keep = _positions(site, kept_heads)
    done: set[tuple[int, int]] = set()
    for w in site.qkv:
        if site.split is not None:
            continue
        if (id(w.node), w.index) not in done:
            _slice(graph, names, w, keep)
            done.add((id(w.node), w.index))
    if site.split is not None:  # packed q|k|v columns: one weight, one bias
        packed = np.concatenate([keep, keep + width, keep + 2 * width])
        for w in {(id(w.node), w.index): w for w in site.qkv}.values():
            _slice(graph, names, dataclasses.replace(w, offset=0), packed)
        kept = len(keep)
        sizes = add_initializer(graph, names.fresh("heads_split"), np.array([kept] * 3, np.int64))
        if len(site.split.inputs) > 1:
            site.split.replace_input_with(1, sizes)
        else:
            site.split.attributes.pop("num_outputs", None)
            site.split.resize_inputs(2)
            site.split.replace_input_with(1, sizes)
    _slice(graph, names, site.out, keep)
    new_heads = len(kept_heads)
    if site.mha is not None:
        site.mha.attributes["num_heads"] = ir.AttrInt64("num_heads", new_heads)
    _fix_shapes(site, new_heads)
    for reshape in site.split_reshapes:
        _shape_constant(graph, names, reshape, [0, 0, new_heads, site.head_size])
    if site.merge_reshape is not None:
        _shape_constant(graph, names, site.merge_reshape, [0, 0, new_heads * site.head_size])


def _with_dim(value: ir.Value, axis: int, size: int) -> None:
    if value.shape is not None and len(value.shape) > axis:
        dims = list(value.shape)
        dims[axis] = size
        value.shape = ir.Shape(dims)


def _fix_shapes(site: _Site, heads: int) -> None:
    """Set the new head count in the recorded shapes of the values it changed (re-running
    shape inference would lose the exporter's symbolic batch/sequence names, which the attention
    matcher relies on)."""
    width = heads * site.head_size
    projections = {w.node for w in site.qkv}
    for node in projections:
        _with_dim(node.outputs[0], -1 % max(len(node.outputs[0].shape or [0]), 1),
                  3 * width if site.split is not None else width)
    if site.split is not None:
        for out in site.split.outputs:
            _with_dim(out, 2, width)
    if site.mha is not None:
        _with_dim(site.mha.outputs[0], 2, width)
    merge_transpose = site.core[-2] if site.core else None
    for node in site.core:
        for out in node.outputs:
            rank = len(out.shape) if out.shape is not None else 0
            if node is site.merge_reshape:
                _with_dim(out, 2, width)
            elif rank == 4:
                axis = 2 if node in site.split_reshapes or node is merge_transpose else 1
                _with_dim(out, axis, heads)


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
        sites, skipped = _sites(graph)
        blocks = []
        for site in sites:
            scores = _head_scores(site, self.criterion)
            order = list(np.argsort(scores, kind="stable"))
            if self.dead_only:
                removed = [h for h in order if scores[h] == 0.0][: site.heads - 1]
            else:
                count = min(int(np.floor(site.heads * self.ratio + 1e-9)), site.heads - 1)
                removed = order[:count]
            kept = sorted(set(range(site.heads)) - set(removed))
            if removed:
                _rewrite(graph, names, site, kept)
            blocks.append(HeadReport(site.name, site.heads, len(kept),
                                     tuple(sorted(int(h) for h in removed)),
                                     tuple(float(s) for s in scores)))
            logger.info("%s: %d -> %d heads", site.name, site.heads, len(kept))
        modified = any(b.removed for b in blocks)
        if modified:
            ir_common.RemoveUnusedNodesPass()(pruned)
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
