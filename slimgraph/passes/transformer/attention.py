"""`fuse-attention`: every attention block into onnxruntime's fused attention op; exact.

Each match of the dataflow matcher (`slimgraph.passes.transformer._match`) becomes one
`com.microsoft.MultiHeadAttention(q, k, v, key_padding_mask, attention_bias)` (num_heads and
the scale as attributes) between the projections and the output projection, which stay MatMuls
(quantization treats them as any other):

- q, k, v: the projections' outputs [B, S, N*H] (a packed projection split once; a [S, B, D]
  source transposed; heads packed per head, as GPT-NeoX does, gathered);
- rotary embeddings: `com.microsoft.RotaryEmbedding` on q and k, its cos/sin caches the graph's
  own tables (so the positions and any scaling are the model's);
- grouped-query attention (fewer key/value heads): by default `com.microsoft.
  GroupQueryAttention` (non-causal, the whole mask as attention_bias, every key valid:
  `seqlens_k = T - 1`), which reads each key/value head once; `gqa="repeat"` repeats the
  key/value heads into MultiHeadAttention instead;
- a soft cap on the scores (`c * tanh(scores / c)` before the mask, Gemma 2): the `softcap`
  attribute of GroupQueryAttention (the only fused op with one; onnxruntime applies it after
  the scale and before attention_bias, as the model does), also for blocks whose key/value
  heads are not grouped; a soft-capped cross-attention, or one with `gqa="repeat"`, is not
  fused (reason named);
- masks and biases: a padding mask over keys becomes the [B, T] `key_padding_mask`; anything
  else (causal and padding masks combined, ALiBi or relative position biases, Swin's window
  masks) the [B|1, N|1, S, T] `attention_bias`, built once per mask and shared by the layers.

Exact: the fused kernels compute the same arithmetic (verified at rtol 1e-4). Two limits, both
outside what a model computes for real tokens: rows whose mask keeps no key at all (a sequence
that is all padding) give the mean of the values instead of the model's own degenerate output,
and a masked fill above -1e4 is not fused (its softmax weight would not underflow). The output
runs only on onnxruntime (contrib ops), which is why this pass is in the `transformer` preset,
not in `lossless`.

Every Softmax that looks like attention (a MatMul of two activations into it, its output into
another) and is not fused is reported with its layer name and reason (`skipped`, and the
`summary` line the command line prints).

Source: onnxruntime contrib op specs (MultiHeadAttention, GroupQueryAttention,
RotaryEmbedding); Vaswani et al. 2017; Su et al. 2021; Ainslie et al. 2023.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import layer_name
from slimgraph.passes._graph_utils import replace_output
from slimgraph.passes._kit import Names
from slimgraph.passes.base import Skipped, SlimgraphPass, SlimgraphPassResult
from slimgraph.passes.registry import register_pass
from slimgraph.passes.transformer._cached import gqa_rotary, rewrite_cached
from slimgraph.passes.transformer._causal import proves_causal
from slimgraph.passes.transformer._emit import (
    MS_DOMAIN,
    BiasPlan,
    Emitter,
    attention_bias,
    bias_plan,
    check_operand,
    check_rotary,
    inert,
    key_padding_mask,
    operand_input,
    padding_term,
    rebuild_output,
    rotary_input,
)
from slimgraph.passes.transformer._match import (
    AttentionMatch,
    BiasTerm,
    NoMatch,
    find_attention,
)
from slimgraph.passes.transformer._symbolic import ShapeInfo

__all__ = ["FuseAttentionPass", "AttentionFusionResult", "TransformerFusionResult", "GQA_MODES",
           "fusion_summary", "has_fused_attention"]

logger = logging.getLogger(__name__)

GQA_MODES = ("op", "repeat")

# the reason a soft-capped block is not fused: only GroupQueryAttention has a softcap attribute
_SOFTCAP = "a soft cap (tanh) on the scores"


@dataclasses.dataclass
class TransformerFusionResult(SlimgraphPassResult):
    """How many patterns each transformer fusion rewrote (`fused`: kind -> count)."""

    fused: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class AttentionFusionResult(TransformerFusionResult):
    """What `fuse-attention` did: blocks found and fused, and a one-line summary.

    Attributes:
        fused: rewrites by kind ({"attention": n}; "grouped_query", "rotary" among them).
        blocks: attention blocks found (matched or attention-like Softmaxes that did not).
        summary: "fuse-attention: 11 of 12 attention blocks fused; <layer>: <reason>", or
            "fuse-attention: no attention found".
    """

    blocks: int = 0
    summary: str = ""


def fusion_summary(fused: int, skipped: list[Skipped], label: str = "fuse-attention") -> str:
    """The one line the command line prints for an attention fusion."""
    total = fused + len(skipped)
    if not total:
        return f"{label}: no attention found"
    line = f"{label}: {fused} of {total} attention blocks fused"
    if skipped:
        first = skipped[0]
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        line += f"; {first.node}: {first.reason}{more}"
    return line


@dataclasses.dataclass
class _Plan:
    match: AttentionMatch
    padding: tuple[BiasPlan, bool, float] | None
    biases: list[BiasPlan]
    grouped: bool
    cache: str = ""  # a cached block: "gqa" (GroupQueryAttention) or "mha" (with past)
    do_rotary: bool = False  # rotary inside GroupQueryAttention


@register_pass("fuse-attention", exact=True)
class FuseAttentionPass(SlimgraphPass):
    """Rewrite each attention block into onnxruntime's fused attention ops; exact.

    See the module docstring. Args:
        gqa: grouped-query attention as "op" (GroupQueryAttention, default) or "repeat"
            (key/value heads repeated into MultiHeadAttention).
        require: a model whose attention blocks none can be fused is an error (the
            `transformer` preset and explicit steps); False where the fusion is a bonus
            (quantization's transformer path). A model without attention is not an error:
            the summary says none was found.

    Raises:
        UnsupportedModelError: `require` and the model has attention of which no block could
            be fused (the message names the first block and why).
    """

    exact: ClassVar[bool] = True

    def __init__(self, *, gqa: str = "op", require: bool = True) -> None:
        super().__init__()
        self.gqa = gqa
        self.require = require

    def requires(self, model: ir.Model) -> None:
        if self.gqa not in GQA_MODES:
            raise BadOptionError(f"unknown gqa mode '{self.gqa}' (choose {', '.join(GQA_MODES)})")

    def call(self, model: ir.Model) -> AttentionFusionResult:
        graph = model.graph
        shapes = ShapeInfo()
        matches, failed = find_attention(graph, shapes)
        skipped = [Skipped(_layer(node), "Softmax", reason) for node, reason in failed]
        plans: list[_Plan] = []
        for match in matches:
            try:
                plans.append(self._plan(match, shapes))
            except NoMatch as reason:
                skipped.append(Skipped(match.name, "Softmax", str(reason)))
        if self.require and skipped and not plans:
            first = skipped[0]
            raise UnsupportedModelError(
                f"fuse-attention: none of the {len(skipped)} attention blocks can be fused; "
                f"{first.node}: {first.reason}")
        emitter = Emitter(graph, Names(graph), shapes)
        fused = {"attention": 0}
        for plan in plans:
            kind = _rewrite(emitter, plan)
            fused["attention"] += 1
            for extra in kind:
                fused[extra] = fused.get(extra, 0) + 1
        for item in skipped:
            logger.info("attention %s not fused: %s", item.node, item.reason)
        summary = fusion_summary(fused["attention"], skipped)
        logger.info("%s", summary)
        count = fused["attention"]
        if count:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            common.RemoveUnusedNodesPass()(model)
            common.TopologicalSortPass()(model)
        return AttentionFusionResult(model, bool(count), skipped=skipped,
                                     fused={k: v for k, v in fused.items() if v},
                                     blocks=count + len(skipped), summary=summary)

    def _plan(self, match: AttentionMatch, shapes: ShapeInfo) -> _Plan:
        """Everything that can refuse the block, before anything is written."""
        for operand in (match.q, match.k, match.v):
            check_operand(operand)
            check_rotary(operand, shapes)
        terms = [t for t in match.bias if not inert(t)]
        if match.cached:
            return self._plan_cached(match, terms, shapes)
        # a soft cap: only GroupQueryAttention takes one (with every key/value head its own)
        grouped = match.kv_heads != match.heads or bool(match.softcap)
        if grouped and self.gqa == "op":
            q_dims, k_dims = shapes.shape(match.q.source), shapes.shape(match.k.source)
            assert q_dims is not None and k_dims is not None
            if q_dims[match.q.seq_axis] != k_dims[match.k.seq_axis]:
                grouped = False  # GroupQueryAttention needs self-attention: repeat instead
        if match.softcap and not (grouped and self.gqa == "op"):
            raise NoMatch(_SOFTCAP + " (only GroupQueryAttention takes one, and " + (
                "gqa='repeat' was asked)" if self.gqa != "op" else
                "only for self-attention)"))
        padding = padding_term(terms, shapes)
        biases = [] if padding is not None else [bias_plan(t, shapes) for t in terms]
        if match.v.head_size != match.head_size and grouped:
            raise NoMatch("grouped-query attention with a value head size unlike the key's"
                          if match.kv_heads != match.heads else
                          _SOFTCAP + " and a value head size unlike the key's")
        return _Plan(match, padding, biases, grouped and self.gqa == "op")

    def _plan_cached(self, match: AttentionMatch, terms: list[BiasTerm],
                     shapes: ShapeInfo) -> _Plan:
        """A block over a key/value cache: GroupQueryAttention (causal, past and present
        buffers, the mask as attention_bias) when its mask is evidently causal and its keys are
        grouped or rotated, else MultiHeadAttention with past_key/past_value."""
        q, k = match.q, match.k
        if (q.rotary is None) != (k.rotary is None):
            raise NoMatch("only one of query and key is rotated")
        if match.v.head_size != match.head_size:
            raise NoMatch("a cache whose value head size differs from the key's")
        grouped = match.kv_heads != match.heads
        assert k.cache is not None
        causal = proves_causal(terms, q.source_dims[q.seq_axis], k.cache.total, shapes)
        if (grouped or q.rotary is not None or match.softcap) and causal and self.gqa == "op":
            return _Plan(match, None, [bias_plan(t, shapes) for t in terms], True, "gqa",
                         gqa_rotary(match))
        if match.softcap:
            raise NoMatch(_SOFTCAP + " over a key/value cache (only GroupQueryAttention takes "
                          "one, and " + ("gqa='repeat' was asked)" if self.gqa != "op" else
                                         "the mask is not evidently causal: that op masks "
                                         "causally)"))
        if grouped:
            raise NoMatch("grouped-query attention over a key/value cache needs "
                          "GroupQueryAttention, and "
                          + ("gqa='repeat' was asked" if self.gqa != "op" else
                             "the mask is not evidently causal (that op masks causally)"))
        padding = padding_term(terms, shapes)
        biases = [] if padding is not None else [bias_plan(t, shapes) for t in terms]
        return _Plan(match, padding, biases, False, "mha")


def _layer(node: ir.Node) -> str:
    return layer_name(node) or node.name or "<unnamed Softmax>"


def _rewrite(em: Emitter, plan: _Plan) -> list[str]:
    """Build the fused op of one planned match; returns the extra kinds it used."""
    match = plan.match
    anchor = match.output.producer()
    assert anchor is not None
    em.anchor = anchor
    em.metadata = dict(match.softmax.metadata_props)
    if plan.cache:
        return rewrite_cached(em, plan.match, plan.cache, plan.biases, plan.padding,
                              plan.do_rotary)
    dtype = match.q.source.dtype.numpy() if match.q.source.dtype is not None else np.float32
    inputs = {o.role: operand_input(em, match, o) for o in (match.q, match.k, match.v)}
    q_in, k_in = inputs["q"], inputs["k"]
    kv_len = em.dim(k_in, 1)
    kinds = []
    q = rotary_input(em, match, match.q, q_in)
    k = rotary_input(em, match, match.k, k_in)
    v = inputs["v"]
    if match.q.rotary is not None or match.k.rotary is not None:
        kinds.append("rotary")
    mask = key_padding_mask(em, plan.padding, q_in, kv_len, match.heads) if plan.padding else None
    bias = attention_bias(em, plan.biases, q_in, kv_len, match.heads, np.dtype(dtype))
    attrs: dict[str, int | float] = {"num_heads": match.heads, "scale": float(match.scale)}
    if match.softcap:
        attrs["softcap"] = float(match.softcap)
    if plan.grouped:  # GroupQueryAttention (for a soft cap also without grouped heads)
        if match.kv_heads != match.heads:
            kinds.append("grouped_query")
        if mask is not None:  # GroupQueryAttention takes no key padding mask: as a bias
            assert plan.padding is not None
            bias = attention_bias(em, [as_bias(plan.padding)], q_in, kv_len, match.heads,
                                  np.dtype(dtype))
        seqlens, total = _sequence_lengths(em, k_in)
        out = em.one("GroupQueryAttention",
                     [q, k, v, None, None, seqlens, total, None, None, None, bias],
                     domain=MS_DOMAIN, kv_num_heads=match.kv_heads, causal=0, **attrs)
    else:
        if match.kv_heads != match.heads:
            kinds.append("grouped_query")
            k = _repeat_heads(em, k, match.kv_heads, match.k.repeat, match.head_size)
            v = _repeat_heads(em, v, match.kv_heads, match.v.repeat, match.v.head_size)
        if mask is not None:
            assert plan.padding is not None
            attrs["mask_filter_value"] = float(plan.padding[2])
        extra: list[ir.Value | None] = [None, mask, bias]
        while extra and extra[-1] is None:
            extra.pop()
        out = em.one("MultiHeadAttention", [q, k, v, *extra], domain=MS_DOMAIN, **attrs)
    if match.output.dtype is not None:
        out.dtype = match.output.dtype
    result = rebuild_output(em, out, match.output_layout)
    result.type, result.shape = match.output.type, match.output.shape
    replace_output(match.output, result)
    return kinds


def as_bias(found: tuple[BiasPlan, bool, float]) -> BiasPlan:
    """A key padding mask (plan, kept where, fill) as a bias term's plan."""
    plan, keep_if, fill = found
    term = dataclasses.replace(plan.term, value=plan.value, fill=fill, fill_if=not keep_if,
                               factor=1.0)
    return dataclasses.replace(plan, term=term)


def _sequence_lengths(em: Emitter, k_in: ir.Value) -> tuple[ir.Value, ir.Value]:
    """GroupQueryAttention's seqlens_k (T - 1 for every row, int32 [B]) and total length."""
    key = ("seqlens", id(k_in))
    if key not in em.cache:
        length = em.op("Cast", [em.dim(k_in, 1)], to=ir.DataType.INT32,
                       dtype=ir.DataType.INT32)[0]
        minus = em.one("Sub", [length, em.const("attention_one_i32", np.array([1], np.int32))])
        em.cache[key] = em.one("Expand", [minus, em.dim(k_in, 0)])
        em.cache[(*key, "total")] = em.one("Squeeze", [length, em.ints([0])])
    return em.cache[key], em.cache[(*key, "total")]


def _repeat_heads(em: Emitter, value: ir.Value, heads: int, repeat: int, size: int) -> ir.Value:
    """[B, T, heads * size] -> [B, T, heads * repeat * size], each head repeated `repeat`x."""
    split = em.one("Reshape", [value, em.ints([0, 0, heads, 1, size])])
    wide = em.one("Expand", [split, em.ints([1, 1, 1, repeat, 1])])
    return em.one("Reshape", [wide, em.ints([0, 0, heads * repeat * size])])


def has_fused_attention(model: ir.Model) -> bool:
    """Whether `model` has one of onnxruntime's fused attention ops."""
    return any(n.domain == MS_DOMAIN and n.op_type in ("MultiHeadAttention",
                                                       "GroupQueryAttention", "Attention")
               for n in model.graph)

