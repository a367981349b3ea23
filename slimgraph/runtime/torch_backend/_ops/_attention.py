"""Attention kernels of the op table: onnxruntime's fused attention ops and ONNX's own.

The `com.microsoft` ops are MultiHeadAttention, Attention, QAttention, GroupQueryAttention and
RotaryEmbedding; ONNX's are the opset-23 Attention and RotaryEmbedding.

Every form computes scaled dot-product attention (Vaswani et al., 2017) per head:
`softmax(scale * Q K^T + bias) V`, scale 1/sqrt(head_size) unless given. What differs is where
Q, K and V come from and how the bias is built; each kernel follows onnxruntime's CPU kernel
(onnxruntime's docs/ContribOperators.md and contrib_ops/cpu/bert):

- masks of the contrib ops are additive: a masked position gets `mask_filter_value` (-10000 by
  default), not -inf. A key padding mask is 1-D key lengths [B] (right padding), 1-D [2B]
  (end positions, then start positions), 2-D [B, T] or 3-D [B, S, T] (1 keeps, 0 masks);
  `unidirectional` masks key j for query i when j > past_length + i, only when S > 1;
  `attention_bias` [B or 1, N or 1, S, T] is added on top;
- GroupQueryAttention: query head h reads KV head h // (N / kv_num_heads); row b holds
  `seqlens_k[b] + 1` valid tokens (past and new); query s attends the valid keys up to its
  own position (causal; with `causal=0` all valid keys), only the last `local_window_size` of
  them when set (a padded query
  row attends all valid keys); masked keys get no
  weight at all (softmax over the allowed keys only); the new keys and values are written at
  each row's own past length; with `do_rotary` the rotary embedding is applied to the new Q and
  K first, at positions s (first prompt: sequence length == total_sequence_length) or
  past_length + s;
- rotary embeddings (Su et al., 2021, "RoFormer"): the first `rotary_embedding_dim` channels of
  each head rotate in pairs, halves (x_i, x_{i+d/2}) or interleaved neighbours (x_2i,
  x_2i+1), by the angles of the cos/sin caches at each token's position;
- opset-23 Attention: boolean masks keep True, masked positions are -inf, scale applied as
  sqrt(scale) to Q and to K, softcap before the mask; `is_causal` aligns the triangle with the
  past (key j for query i allowed when j <= past_length + i); K/V heads repeat for grouped
  query attention.
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir
import torch

from slimgraph.runtime.torch_backend._ops._quant import (
    integer_codes,
    integer_matmul,
    quantized_weight,
)
from slimgraph.runtime.torch_backend._ops._registry import (
    MS_DOMAIN,
    Kernel,
    LowerContext,
    Tensor,
    attr,
    op,
    optional,
    unsupported,
)

__all__: list[str] = []


# --- shared arithmetic -------------------------------------------------------------------------


def _heads(x: Tensor, heads: int) -> Tensor:
    """[B, S, N * H] -> [B, N, S, H]."""
    b, s, d = x.shape
    return x.reshape(b, s, heads, d // heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """[B, N, S, H] -> [B, S, N * H]."""
    b, n, s, h = x.shape
    return x.transpose(1, 2).reshape(b, s, n * h)


def _attend(
    q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """softmax(scale * q k^T + bias) v and the scores before the softmax; q [B, N, S, H],
    k/v [B, N, T, H] (fewer KV heads repeat), bias broadcast to [B, N, S, T]."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    return torch.matmul(torch.softmax(scores, -1), v), scores


def _scale(node: ir.Node, head_size: int) -> float:
    given = attr(node, "scale", 0.0)
    return given if given else 1.0 / math.sqrt(head_size)


def _masked_keys(
    mask: Tensor | None, batch: int, queries: int, keys: int, causal: bool, past: int
) -> Tensor | None:
    """Boolean [B, 1, S or 1, T] of the masked (query, key) pairs of a contrib-op mask (see the
    module docstring), or None when nothing is masked."""
    masked: Tensor | None = None
    j = torch.arange(keys)
    if mask is not None:
        if mask.dim() == 1 and mask.shape[0] == batch:
            masked = j >= mask.to(torch.int64).reshape(batch, 1)
        elif mask.dim() == 1 and mask.shape[0] == 2 * batch:
            bounds = mask.to(torch.int64).reshape(2, batch, 1)
            masked = (j >= bounds[0]) | (j < bounds[1])
        elif mask.dim() == 2:
            masked = mask == 0
        elif mask.dim() == 3:
            masked = (mask == 0).unsqueeze(1)
        else:
            raise ValueError(f"mask of rank {mask.dim()}")
        if masked.dim() == 2:
            masked = masked.reshape(batch, 1, 1, keys)
    if causal and queries > 1:
        future = j.reshape(1, keys) > torch.arange(queries).reshape(queries, 1) + past
        masked = future if masked is None else masked | future
    return masked


def _contrib_bias(
    masked: Tensor | None, attention_bias: Tensor | None, fill: float, dtype: torch.dtype
) -> Tensor | None:
    """mask_filter_value where masked, plus the attention bias."""
    bias = None
    if masked is not None:
        bias = torch.where(masked, torch.tensor(fill, dtype=dtype), torch.zeros((), dtype=dtype))
    if attention_bias is not None:
        bias = attention_bias if bias is None else attention_bias + bias
    return bias


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate the first 2 * cos.shape[-1] channels of x [..., H] by the angles of cos/sin
    (broadcast against x[..., :rot / 2]); the other channels pass."""
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1)
    return torch.cat((out, rest), -1) if rest.shape[-1] else out


def _optional_inputs(xs: list[Any], count: int) -> list[Any]:
    return [optional(xs, i) for i in range(count)]


# --- com.microsoft.MultiHeadAttention ----------------------------------------------------------


def _split_qkv(
    query: Tensor, key: Tensor | None, value: Tensor | None, bias: Tensor | None, heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K, V as [B, N, S, H] from MultiHeadAttention's input forms onnxruntime's CPU kernel
    runs: separate [B, S, D] (bias added), or K/V already split in heads [B, N, L, H]."""
    d = query.shape[-1]
    if bias is not None:
        query = query + bias[:d]
    q = _heads(query, heads)
    assert key is not None and value is not None
    if key.dim() == 3:
        key = _heads(key if bias is None else key + bias[d:2 * d], heads)
    if value.dim() == 3:
        value = _heads(value if bias is None else value + bias[2 * d:], heads)
    return q, key, value


@op("MultiHeadAttention", domain=MS_DOMAIN)
def _multi_head_attention(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    heads = attr(node, "num_heads")
    fill = attr(node, "mask_filter_value", -10000.0)
    causal = bool(attr(node, "unidirectional", 0))
    if optional(list(node.inputs), 8) is not None or optional(list(node.inputs), 9) is not None:
        raise unsupported(node, "a shared past/present buffer or a cache indirection")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        query, key, value, bias, mask, attention_bias, past_key, past_value = (
            _optional_inputs(xs, 8))
        if query.dim() != 3 or key is None or value is None or key.dim() == 5:
            raise unsupported(node, "packed Q/K/V inputs")
        q, k, v = _split_qkv(query, key, value, bias, heads)
        past = 0
        if past_key is not None and past_value is not None:
            past = past_key.shape[2]
            k, v = torch.cat((past_key, k), 2), torch.cat((past_value, v), 2)
        batch, _, queries, head_size = q.shape
        masked = _masked_keys(mask, batch, queries, k.shape[2], causal, past)
        total = _contrib_bias(masked, attention_bias, fill, q.dtype)
        out, scores = _attend(q, k, v, _scale(node, head_size), total)
        return [_merge(out), k, v, scores]

    return run


# --- com.microsoft.Attention and QAttention ----------------------------------------------------


def _packed_attention(node: ir.Node) -> Any:
    """The part Attention and QAttention share: from the packed projection [B, S, Dq+Dk+Dv] to
    the output, with mask_index, past [2, B, N, P, H] and attention_bias."""
    heads = attr(node, "num_heads")
    fill = attr(node, "mask_filter_value", -10000.0)
    causal = bool(attr(node, "unidirectional", 0))
    sizes = attr(node, "qkv_hidden_sizes")
    if attr(node, "do_rotary", 0) or attr(node, "past_present_share_buffer", 0):
        raise unsupported(node, "do_rotary or past_present_share_buffer")

    def attend(
        projected: Tensor, mask: Tensor | None, past: Tensor | None, bias: Tensor | None
    ) -> list[Any]:
        width = projected.shape[-1]
        split = list(sizes) if sizes is not None else [width // 3] * 3
        q, k, v = (_heads(t, heads) for t in torch.split(projected, split, -1))
        past_length = 0
        if past is not None:
            past_length = past.shape[3]
            k, v = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
        batch, _, queries, head_size = q.shape
        masked = _masked_keys(mask, batch, queries, k.shape[2], causal, past_length)
        out, _ = _attend(q, k, v, _scale(node, head_size),
                         _contrib_bias(masked, bias, fill, q.dtype))
        present = torch.stack((k, v)) if k.shape == v.shape else None
        return [_merge(out), present]

    return attend


@op("Attention", domain=MS_DOMAIN)
def _contrib_attention(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """input @ weights + bias split into Q, K, V (qkv_hidden_sizes, else equal thirds), then
    multi-head attention with mask_index, past and attention_bias."""
    attend = _packed_attention(node)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, weights, bias, mask, past, attention_bias = _optional_inputs(xs, 6)
        projected = torch.matmul(x, weights)
        if bias is not None:
            projected = projected + bias
        return attend(projected, mask, past, attention_bias)

    return run


@op("QAttention", domain=MS_DOMAIN)
def _quantized_attention(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """Attention whose projection is integer: ((input - input_zero_point) @ (weight -
    weight_zero_point)) * input_scale * weight_scale + bias, weight per tensor or per column."""
    attend = _packed_attention(node)
    weight = quantized_weight(ctx, node, 1)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, w, bias, x_scale, w_scale, mask, x_zero, w_zero, past = _optional_inputs(xs, 9)
        acc = integer_matmul(m, integer_codes(m, x, None), integer_codes(m, w, weight),
                             x_zero, w_zero)
        projected = (acc * (x_scale * w_scale).to(acc.dtype)).to(bias.dtype) + bias
        return attend(projected, mask, past, None)

    return run


# --- com.microsoft.GroupQueryAttention ---------------------------------------------------------


@op("GroupQueryAttention", domain=MS_DOMAIN)
def _group_query_attention(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    heads, kv_heads = attr(node, "num_heads"), attr(node, "kv_num_heads")
    window = attr(node, "local_window_size", -1)
    rotary = bool(attr(node, "do_rotary", 0))
    interleaved = bool(attr(node, "rotary_interleaved", 0))
    softcap = attr(node, "softcap", 0.0)
    causal = bool(attr(node, "causal", 1))
    if attr(node, "smooth_softmax", 0) or attr(node, "qk_output", 0):
        raise unsupported(node, "smooth_softmax or qk_output")
    if any(optional(list(node.inputs), i) is not None for i in range(11, 16)):
        raise unsupported(node, "a head sink, a quantized KV cache or Q/K norm weights")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        query, key, value, past_key, past_value, seqlens, total, cos, sin, positions, bias = (
            _optional_inputs(xs, 11))
        if key is None:  # packed QKV
            head_size = query.shape[-1] // (heads + 2 * kv_heads)
            query, key, value = torch.split(
                query, [heads * head_size, kv_heads * head_size, kv_heads * head_size], -1)
        q, k, v = _heads(query, heads), _heads(key, kv_heads), _heads(value, kv_heads)
        batch, _, queries, head_size = q.shape
        total_length = int(total.reshape(-1)[0].item())
        lengths = seqlens.to(torch.int64).reshape(batch) + 1  # valid tokens per row
        first_prompt = queries == total_length
        pasts = torch.zeros_like(lengths) if first_prompt else lengths - queries
        if rotary:
            pos = (positions.to(torch.int64) if positions is not None
                   else pasts.reshape(batch, 1) + torch.arange(queries))
            angles = (cos[pos].unsqueeze(1), sin[pos].unsqueeze(1))  # [B, 1, S, rot / 2]
            q, k = _rotate(q, *angles, interleaved), _rotate(k, *angles, interleaved)
        k, v = _with_past(k, v, past_key, past_value, pasts, total_length)
        # query s of row b sits at position past_b + s: it sees keys j <= that (in its window)
        own = (pasts.reshape(batch, 1, 1) + torch.arange(queries).reshape(1, queries, 1))
        j = torch.arange(k.shape[2]).reshape(1, 1, -1)
        allowed = (j < lengths.reshape(batch, 1, 1)).expand(batch, queries, -1)
        if causal:
            allowed = allowed & (j <= own)
        if window > 0:
            allowed = allowed & (j > own - window)
        masked = ~allowed.unsqueeze(1)  # [B, 1, S, T]
        scores_bias = torch.where(masked, -math.inf, 0.0).to(q.dtype)
        if bias is not None:
            scores_bias = scores_bias + bias
        out = _gqa_attend(q, k, v, _scale(node, head_size), softcap, scores_bias)
        return [_merge(out), k, v]

    return run


def _with_past(
    k: Tensor, v: Tensor, past_key: Tensor | None, past_value: Tensor | None, pasts: Tensor,
    total: int,
) -> tuple[Tensor, Tensor]:
    """Present K/V [B, KVN, T, H]: each row's past (its first pasts[b] positions) then its new
    tokens; T = max(total_sequence_length, past buffer length); unused positions zero."""
    if past_key is None or past_value is None:
        return k, v
    length = max(total, past_key.shape[2])
    if bool((pasts == past_key.shape[2]).all()) and length == past_key.shape[2] + k.shape[2]:
        return torch.cat((past_key, k), 2), torch.cat((past_value, v), 2)
    rows_k, rows_v = [], []
    for b in range(k.shape[0]):
        p = int(pasts[b].item())
        pad = length - p - k.shape[2]
        rows_k.append(torch.cat((past_key[b, :, :p], k[b], k.new_zeros(k.shape[1], pad,
                                                                         k.shape[3])), 1))
        rows_v.append(torch.cat((past_value[b, :, :p], v[b], v.new_zeros(v.shape[1], pad,
                                                                           v.shape[3])), 1))
    return torch.stack(rows_k), torch.stack(rows_v)


def _gqa_attend(
    q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float, bias: Tensor
) -> Tensor:
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores + bias
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with no allowed key: zeros
    return torch.matmul(probs, v)


# --- rotary embeddings -------------------------------------------------------------------------


@op("RotaryEmbedding", domain=MS_DOMAIN)
def _contrib_rotary(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """input [B, S, D] (heads of `rotary_embedding_dim` or cos_cache width * 2, or D / num_heads)
    or [B, N, S, H]; position_ids [B, S], or [1] holding the first position."""
    heads, rot_dim = attr(node, "num_heads", 0), attr(node, "rotary_embedding_dim", 0)
    interleaved = bool(attr(node, "interleaved", 0))
    if attr(node, "is_packed_batching", 0):
        raise unsupported(node, "is_packed_batching")

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, positions, cos, sin = xs[0], xs[1].to(torch.int64), xs[2], xs[3]
        seq = x.shape[2] if x.dim() == 4 else x.shape[1]
        if positions.numel() == 1 and positions.dim() == 1:
            positions = positions.reshape(1, 1) + torch.arange(seq).reshape(1, seq)
        half = rot_dim // 2 if rot_dim else cos.shape[-1]
        angles = (cos[positions][..., :half], sin[positions][..., :half])  # [B, S, half]
        if x.dim() == 4:
            return [_rotate(x, angles[0].unsqueeze(1), angles[1].unsqueeze(1), interleaved)]
        b, s, d = x.shape
        head_size = d // heads if heads else 2 * half
        split = x.reshape(b, s, d // head_size, head_size)
        out = _rotate(split, angles[0].unsqueeze(2), angles[1].unsqueeze(2), interleaved)
        return [out.reshape(b, s, d)]

    return run


@op("RotaryEmbedding")
def _rotary(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """Opset 23: X [B, N, S, H] or [B, S, N * H] (num_heads); cos/sin [max_position, rot / 2]
    read at position_ids [B, S], or [B, S, rot / 2] without position_ids."""
    heads, rot_dim = attr(node, "num_heads", 0), attr(node, "rotary_embedding_dim", 0)
    interleaved = bool(attr(node, "interleaved", 0))

    def run(m: Any, xs: list[Any]) -> list[Any]:
        x, cos, sin, positions = xs[0], xs[1], xs[2], optional(xs, 3)
        if positions is not None:
            cos, sin = cos[positions.to(torch.int64)], sin[positions.to(torch.int64)]
        if rot_dim:
            cos, sin = cos[..., : rot_dim // 2], sin[..., : rot_dim // 2]
        if x.dim() == 4:  # [B, N, S, H]
            return [_rotate(x, cos.unsqueeze(1), sin.unsqueeze(1), interleaved)]
        b, s, d = x.shape
        split = x.reshape(b, s, heads, d // heads)
        out = _rotate(split, cos.unsqueeze(2), sin.unsqueeze(2), interleaved)
        return [out.reshape(b, s, d)]

    return run


# --- opset-23 Attention ------------------------------------------------------------------------


@op("Attention")
def _attention(node: ir.Node, opset: int, ctx: LowerContext) -> Kernel:
    """Opset 23: Q [B, Nq, S, H] / K, V [B, Nkv, L, H] (or 3-D with q_num_heads and
    kv_num_heads), attn_mask boolean (True attends) or additive, past_key/past_value."""
    causal = bool(attr(node, "is_causal", 0))
    q_heads, kv_heads = attr(node, "q_num_heads"), attr(node, "kv_num_heads")
    softcap = attr(node, "softcap", 0.0)
    mode = attr(node, "qk_matmul_output_mode", 0)

    def run(m: Any, xs: list[Any]) -> list[Any]:
        q, k, v, mask, past_key, past_value = _optional_inputs(xs, 6)
        three_d = q.dim() == 3
        if three_d:
            q, k, v = _heads(q, q_heads), _heads(k, kv_heads), _heads(v, kv_heads)
        past = 0
        if past_key is not None and past_value is not None:
            past = past_key.shape[2]
            k, v = torch.cat((past_key, k), 2), torch.cat((past_value, v), 2)
        queries, keys = q.shape[2], k.shape[2]
        bias = torch.zeros((queries, keys), dtype=q.dtype)
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.where(mask, 0.0, -math.inf).to(q.dtype)
            if mask.shape[-1] < keys:
                mask = torch.nn.functional.pad(mask, (0, keys - mask.shape[-1]), value=-math.inf)
            bias = bias + mask
        if causal:
            future = (torch.arange(keys).reshape(1, keys)
                      > torch.arange(queries).reshape(queries, 1) + past)
            bias = bias.masked_fill(future, -math.inf)
        given = attr(node, "scale")
        root = math.sqrt(given if given is not None else 1.0 / math.sqrt(q.shape[-1]))
        k_all, v_all = k, v
        if k.shape[1] != q.shape[1]:
            k_all = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v_all = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scores = torch.matmul(q * root, (k_all * root).transpose(-1, -2))
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        qk = scores
        scores = scores + bias
        if mode == 2:
            qk = scores
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
        if mode == 3:
            qk = probs
        out = torch.matmul(probs, v_all)
        return [_merge(out) if three_d else out, k, v, qk]

    return run
