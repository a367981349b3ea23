"""Attention-head pruning: remove whole heads, with every head count in the graph updated.

One head of an attention block is a channel group that the generic channel tracer cannot form
(the head split mixes the channel axis): the head's columns of the Q, K and V projections (and
biases) together with the rows of the output projection its values feed. The attention matcher
says where they are, whatever the exporter's spelling (`_headsites`: separate projections, one
packed projection split three ways, GPT-NeoX's per-head packing, the fused ops fuse-attention
writes). Removing a head shrinks those weights, and the head count wherever the graph states it
(`_headshapes`):

- fused form: `num_heads` (and `kv_num_heads`) of MultiHeadAttention / GroupQueryAttention,
  `num_heads` of the RotaryEmbedding ops feeding them;
- plain form: every Reshape, Expand, Split and Slice between the projections, the scores and
  the head merge gets shapes for the kept heads (static sizes where they are static, `0` to copy
  a batch or sequence dimension, `-1` for one, sizes computed at run time restated from the
  same arithmetic, or read from the input's shape);
- values carrying the heads read beside the core (`_headregion`: DeBERTa's relative-position
  terms, a rotary embedding's own Reshapes, a mask built from the heads' shape) shrink with
  them, per-head constants they read keep the kept heads' rows;
- per-head biases added to the scores (T5's and Swin's relative position biases) keep the kept
  heads' rows;
- a decode step's key/value cache (past inputs, present outputs [B, KVH, T, H]), read by the
  fused op or concatenated with the new keys/values in plain ops, declares the kept key/value
  heads: the step's interface changes with the model, which produces and consumes the cache.

Grouped-query attention (fewer key/value heads) prunes whole groups: a key/value head and the
query heads that read it, so every key/value head keeps as many query heads as before.
Importance per head (per group): the L2 (or L1) norm of its Q/K/V columns and output-projection
rows. A head whose output-projection rows (or V columns and V bias) are all zero contributes
nothing: its score is 0, it goes first, and removing it is exact. `ratio` is the fraction of
heads (groups) removed per attention block (at least one stays). The output shapes never change
(the output projection keeps its width).

`remove_heads` edits a model prepared for pruning in place (`slimgraph.passes.prune` prepares it
and registers the `prune-heads` pass). Approximate in general; exact for dead heads (tested).
Source: Michel et al. 2019, "Are Sixteen Heads Really Better than One?" (head importance and
pruning); Torch-Pruning's head groups (where `num_heads` must be fixed by hand).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from slimgraph.errors import BadOptionError, SlimgraphError
from slimgraph.ir import copy_model, layer_name
from slimgraph.ir._dims import io_shapes, restore_dim_names
from slimgraph.ir.contrib_shapes import infer_shapes
from slimgraph.passes._kit import Names
from slimgraph.passes.base import Skipped
from slimgraph.passes.transformer._emit import MS_DOMAIN
from slimgraph.passes.transformer._headshapes import (
    Done,
    out_rows,
    plan,
    removed_heads,
    rewrite,
    unit_columns,
)
from slimgraph.passes.transformer._headsites import (
    FUSED_OPS,
    HeadSite,
    site_of_fused,
    site_of_match,
)
from slimgraph.passes.transformer._match import NoMatch, find_attention
from slimgraph.passes.transformer._symbolic import ShapeInfo
from slimgraph.passes.transformer.attention import FuseAttentionPass

__all__ = ["HeadReport", "HeadPruning", "CRITERIA", "head_sites", "head_scores", "remove_heads",
           "fusing_first_prunes"]

logger = logging.getLogger(__name__)

CRITERIA = ("l2", "l1")


@dataclasses.dataclass(frozen=True)
class HeadReport:
    """One attention block: query heads before and after, which were removed, their scores
    (a grouped-query block's heads share their group's score), and key/value heads before and
    after.

    Attributes:
        block: the block's torch module path (or its node's name).
        heads, kept: query heads before and after.
        removed: the removed query heads (indices into the original heads).
        scores: each query head's importance.
        kv_heads, kv_kept: key/value heads before and after (equal to the query heads without
            grouped-query attention).
    """

    block: str
    heads: int
    kept: int
    removed: tuple[int, ...]
    scores: tuple[float, ...]
    kv_heads: int = 0
    kv_kept: int = 0

    @property
    def kept_heads(self) -> tuple[int, ...]:
        """The query heads that stay (indices into the original heads)."""
        return tuple(h for h in range(self.heads) if h not in self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "kept_heads": list(self.kept_heads)}


@dataclasses.dataclass
class HeadPruning:
    """What `remove_heads` did: every block it could edit (pruned or not) and those it could
    not, with the reason."""

    blocks: list[HeadReport] = dataclasses.field(default_factory=list)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)

    @property
    def pruned(self) -> list[HeadReport]:
        return [b for b in self.blocks if b.kept < b.heads]


def head_sites(graph: ir.Graph, shapes: ShapeInfo | None = None) -> tuple[
        list[HeadSite], list[Skipped]]:
    """Every attention block of `graph` as a `HeadSite` (plain or fused), and those that head
    pruning cannot edit, with the reason."""
    shapes = shapes or ShapeInfo()
    sites, skipped = [], []
    matches, failed = find_attention(graph, shapes)
    skipped += [Skipped(layer_name(n) or n.name or "Softmax", "Softmax", reason)
                for n, reason in failed]
    for match in matches:
        try:
            sites.append(site_of_match(match, shapes, graph))
        except NoMatch as reason:
            skipped.append(Skipped(match.name, "Softmax", str(reason)))
    for node in graph:
        if node.domain in ("", "ai.onnx") and node.op_type == "Attention":
            # what dynamic int8 writes for encoders (`standard-attention`): int8 projections
            skipped.append(Skipped(layer_name(node) or node.name or node.op_type, node.op_type,
                                   "standard Attention: prune heads before quantizing"))
        if node.domain == MS_DOMAIN and node.op_type in FUSED_OPS:
            try:
                sites.append(site_of_fused(node, shapes, graph))
            except NoMatch as reason:
                skipped.append(Skipped(layer_name(node) or node.name or node.op_type,
                                       node.op_type, str(reason)))
    return sites, skipped


def head_scores(site: HeadSite, criterion: str) -> np.ndarray:
    """Importance of each pruning unit of `site` (a head, or a key/value group): the `criterion`
    norm of its Q/K/V columns and output-projection rows; 0 for a unit whose values or output
    rows are all zero (it contributes nothing)."""
    out = site.out.array()
    scores = np.zeros(site.kv_heads)
    for unit in range(site.kv_heads):
        columns = unit_columns(site, unit)
        chunks = []
        for role in ("q", "k", "v"):
            projection = getattr(site, role)[0]
            for w in projection.weights:
                chunks.append(np.take(w.array(), columns[role], axis=w.axis).ravel())
        heads = list(range(unit * site.repeat, (unit + 1) * site.repeat))
        rows = np.take(out, out_rows(site, heads), axis=site.out.axis)
        chunks.append(rows.ravel())
        values = np.concatenate(chunks).astype(np.float64)
        score = np.abs(values).sum() if criterion == "l1" else np.sqrt((values ** 2).sum())
        v_dead = all(not np.any(np.take(w.array(), columns["v"], axis=w.axis))
                     for w in site.v[0].weights)
        scores[unit] = 0.0 if v_dead or not np.any(rows) else score
    return scores


def remove_heads(model: ir.Model, ratio: float, *, criterion: str = "l1",
                 dead_only: bool = False) -> HeadPruning:
    """Remove the least important `ratio` of the heads of every attention block of `model`, in
    place (`model` prepared by `slimgraph.passes.prune.prepare_for_pruning`: weights folded to
    initializers, shapes inferred). See the module docstring.

    Args:
        model: the prepared model, edited in place.
        ratio: fraction of each block's heads (key/value groups) to remove, in [0, 1); at least
            one stays.
        criterion: "l1" (default, as `prune --criterion`) or "l2" norm of the head's weights.
        dead_only: remove only heads that contribute nothing (exact), whatever the ratio.

    Returns:
        `HeadPruning`: per block heads before and after, removed heads, scores; blocks that
        could not be edited with the reason (also those whose rewrite was refused).

    Raises:
        BadOptionError: `ratio` out of range or an unknown criterion.
    """
    if isinstance(ratio, bool) or not 0.0 <= ratio < 1.0:
        raise BadOptionError(f"head ratio must be in [0, 1) (got {ratio})")
    if criterion not in CRITERIA:
        raise BadOptionError(
            f"unknown head importance '{criterion}' (choose {', '.join(CRITERIA)})")
    graph = model.graph
    names = Names(graph)
    shapes = ShapeInfo()
    sites, skipped = head_sites(graph, shapes)
    found = HeadPruning(skipped=skipped)
    done: Done = {}
    rewritten = []
    for site in sites:
        scores = head_scores(site, criterion)
        order = list(np.argsort(scores, kind="stable"))
        units = site.kv_heads
        if dead_only:
            chosen = [u for u in order if scores[u] == 0.0][: units - 1]
        else:
            chosen = order[: min(int(np.floor(units * ratio + 1e-9)), units - 1)]
        removed = sorted(int(u) for u in chosen)
        heads = tuple(removed_heads(site, removed))
        if removed:
            try:
                plans = plan(site, removed, shapes)
            except NoMatch as reason:
                found.skipped.append(Skipped(site.name, "attention", str(reason)))
                continue
            rewrite(graph, names, site, removed, plans, done)
            rewritten.append(site)
        per_head = tuple(float(scores[h // site.repeat]) for h in range(site.heads))
        found.blocks.append(HeadReport(site.name, site.heads, site.heads - len(heads), heads,
                                       per_head, site.kv_heads, site.kv_heads - len(removed)))
        logger.info("%s: %d -> %d heads", site.name, site.heads, site.heads - len(heads))
    if rewritten:
        _refresh_shapes(model, rewritten)
    return found


def fusing_first_prunes(model: ir.Model, ratio: float, *, criterion: str = "l1") -> bool:
    """Whether `remove_heads(model, ratio)`, which edited no block, would prune heads once
    `fuse-attention` has fused the model's attention (tried on a copy; `model` is not changed).
    Some plain forms head pruning cannot follow are plain to the fused op (BLOOM's ALiBi bias,
    merged with the batch, becomes a [1, N, S, T] attention_bias)."""
    fused = copy_model(model)
    try:
        if not FuseAttentionPass(require=False)(fused).modified:
            return False
        return bool(remove_heads(fused, ratio, criterion=criterion).pruned)
    except SlimgraphError:
        return False


def _refresh_shapes(model: ir.Model, sites: list[HeadSite]) -> None:
    """Shapes again after the head counts changed: inferred where onnx can, through the fused
    ops by their own rules (`contrib_shapes.infer_shapes`); a decode step's present key/value
    outputs keep the shapes head pruning gave them."""
    fused_outputs = {id(site.fused.outputs[0]) for site in sites if site.fused is not None}
    before = io_shapes(model)  # the user's dimension names, restored after inference
    for node in model.graph:
        for value in node.outputs:
            if node.domain != MS_DOMAIN or id(value) in fused_outputs:
                value.shape = None
    ir_common.RemoveUnusedNodesPass()(model)
    infer_shapes(model)
    restore_dim_names(model, before)
