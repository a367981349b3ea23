"""The fused op of an attention block over a key/value cache (a decode step), exact.

The block reads past keys/values (graph inputs [B, KVH, P, H]), concatenates the new tokens' to
them (the present, graph outputs [B, KVH, P + S, H]) and attends over both. It becomes one of
onnxruntime's ops that take the past and write the present themselves:

- `GroupQueryAttention` (grouped keys/values or rotary embeddings, when the mask is evidently
  causal: `_causal.proves_causal`): `causal=1`; `seqlens_k = P + S - 1` and
  `query_seqlens = S` for every row and `total_sequence_length = P + S`, so each row's new
  keys go to positions P .. P + S - 1, as the Concat put them; padding and the model's causal
  mask as `attention_bias` (all the model adds, so a mask that keeps fewer keys than the
  causal one stays exact; a query whose keys are all masked, a padding token, gets the mean
  of the values in its causal window: the attention pass's limit); the rotary embedding
  inside (`do_rotary`, cos/sin caches the graph's own tables, `position_ids` indexing them,
  see `_emit.rotary_caches`) where onnxruntime's CPU kernel takes it (head size and rotated
  features multiples of 16), else `RotaryEmbedding` ops before;
- `MultiHeadAttention` with `past_key`/`past_value` (one key/value head per query head, no
  causal proof needed: the whole mask is the bias), its NaN rows (all keys masked) set to 0
  where the model's softmax was guarded the same way.

Source: onnxruntime contrib op specs (GroupQueryAttention, MultiHeadAttention); Ainslie et al.
2023 (grouped-query attention).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.passes._graph_utils import replace_output
from slimgraph.passes.transformer._emit import (
    MS_DOMAIN,
    BiasPlan,
    Emitter,
    attention_bias,
    key_padding_mask,
    operand_input,
    rebuild_output,
    rotary_caches,
    rotary_input,
    rotary_positions,
)
from slimgraph.passes.transformer._match import AttentionMatch
from slimgraph.passes.transformer._symbolic import Dim

__all__ = ["rewrite_cached", "gqa_rotary"]

# onnxruntime's CPU GroupQueryAttention rotates inside only for head sizes and rotated widths
# that are multiples of this.
_GQA_ROTARY_MULTIPLE = 16


def gqa_rotary(match: AttentionMatch) -> bool:
    """Whether GroupQueryAttention can apply the block's rotary embedding itself: q and k
    rotated by the same tables, the same way, in widths its CPU kernel takes."""
    q, k = match.q.rotary, match.k.rotary
    if q is None or k is None:
        return False
    return (q.cos is k.cos and q.sin is k.sin and q.dim == k.dim
            and q.interleaved == k.interleaved and q.batched == k.batched
            and match.head_size % _GQA_ROTARY_MULTIPLE == 0
            and q.dim % _GQA_ROTARY_MULTIPLE == 0)


def rewrite_cached(em: Emitter, match: AttentionMatch, op: str, biases: list[BiasPlan],
                   padding: tuple[BiasPlan, bool, float] | None, do_rotary: bool) -> list[str]:
    """Build the fused op ("gqa" or "mha") of a planned cached block, before `em.anchor`;
    returns the extra kinds it used ("cache", "grouped_query", "rotary")."""
    k_cache, v_cache = match.k.cache, match.v.cache
    assert k_cache is not None and v_cache is not None
    dtype = np.dtype(match.q.source.dtype.numpy() if match.q.source.dtype is not None
                     else np.float32)
    inputs = {o.role: operand_input(em, match, o) for o in (match.q, match.k, match.v)}
    q_in, k_in, v = inputs["q"], inputs["k"], inputs["v"]
    kv_len = _total_length(em, match, k_cache.past, q_in)
    kinds = ["cache"]
    if match.q.rotary is not None:
        kinds.append("rotary")
    bias = attention_bias(em, biases, q_in, kv_len, match.heads, dtype)
    attrs: dict[str, Any] = {"num_heads": match.heads, "scale": float(match.scale)}
    if match.softcap:
        attrs["softcap"] = float(match.softcap)
    if op == "gqa":
        if match.kv_heads != match.heads:
            kinds.append("grouped_query")
        rotary: list[ir.Value | None] = [None, None, None]
        q, k = q_in, k_in
        if do_rotary:
            assert match.q.rotary is not None
            cos, sin = rotary_caches(em, match.q.rotary, rows=kv_len)
            rotary = [cos, sin, rotary_positions(em, match.q.rotary, q_in, full=True)]
        else:
            q = rotary_input(em, match, match.q, q_in)
            k = rotary_input(em, match, match.k, k_in)
        seqlens, total, queries = _gqa_lengths(em, kv_len, q_in)
        out, key, value = em.op(
            "GroupQueryAttention",
            [q, k, v, k_cache.past, v_cache.past, seqlens, total, *rotary, bias,
             None, None, None, None, None, queries],
            domain=MS_DOMAIN, outputs=3, kv_num_heads=match.kv_heads, causal=1,
            do_rotary=int(do_rotary),
            rotary_interleaved=int(do_rotary and bool(match.q.rotary.interleaved
                                                      if match.q.rotary else False)),
            **attrs)
    else:
        q = rotary_input(em, match, match.q, q_in)
        k = rotary_input(em, match, match.k, k_in)
        mask = key_padding_mask(em, padding, q_in, kv_len, match.heads) if padding else None
        if padding is not None:
            attrs["mask_filter_value"] = float(padding[2])
        out, key, value = em.op(
            "MultiHeadAttention", [q, k, v, None, mask, bias, k_cache.past, v_cache.past],
            domain=MS_DOMAIN, outputs=3, **attrs)
        if match.guarded:  # all keys masked: NaN in the op, 0 after the model's guard
            zero = em.const("attention_zero", np.array(0, dtype))
            out = em.one("Where", [em.one("IsNaN", [out]), zero, out])
    if match.output.dtype is not None:
        out.dtype = match.output.dtype
    for cache, present in ((k_cache, key), (v_cache, value)):
        present.type, present.shape = cache.present.type, cache.present.shape
        replace_output(cache.present, present)
    result = rebuild_output(em, out, match.output_layout)
    result.type, result.shape = match.output.type, match.output.shape
    replace_output(match.output, result)
    return kinds


def _total_length(em: Emitter, match: AttentionMatch, past: ir.Value,
                  q_in: ir.Value) -> ir.Value:
    """P + S (past and new tokens) as a 1-element int64 tensor, shared by the layers whose past
    and new lengths are the same symbols."""
    assert match.k.cache is not None
    dims = (match.k.cache.past_length, match.q.source_dims[match.q.seq_axis])
    key: tuple[object, ...] = ("total", *map(str, dims))
    if not all(_named(d) for d in dims):  # unknown sizes are only equal to themselves
        key = (*key, id(past), id(q_in))
    if key not in em.cache:
        past_length = em.one("Shape", [past], start=2, end=3)
        em.cache[key] = em.one("Add", [past_length, em.dim(q_in, 1)])
    return em.cache[key]


def _named(dim: Dim) -> bool:
    """A static size, or one of symbols the graph names (not a placeholder for an unknown)."""
    return not any(sym.startswith("?") for sym in dim.syms)


def _gqa_lengths(em: Emitter, kv_len: ir.Value,
                 q_in: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """GroupQueryAttention's seqlens_k (T - 1 per row), total_sequence_length (T) and
    query_seqlens (S per row), int32."""
    key = ("gqa_lengths", id(kv_len))
    if key not in em.cache:
        int32 = ir.DataType.INT32
        total = em.op("Cast", [kv_len], to=int32, dtype=int32)[0]
        one = em.const("attention_one_i32", np.array([1], np.int32))
        batch = em.dim(q_in, 0)
        seqlens = em.one("Expand", [em.one("Sub", [total, one]), batch])
        queries = em.one("Expand", [em.op("Cast", [em.dim(q_in, 1)], to=int32,
                                           dtype=int32)[0], batch])
        em.cache[key] = seqlens
        em.cache[(*key, "total")] = em.one("Squeeze", [total, em.ints([0])])
        em.cache[(*key, "queries")] = queries
    return em.cache[key], em.cache[(*key, "total")], em.cache[(*key, "queries")]
