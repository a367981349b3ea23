"""MACs of fused attention ops, counted as the MatMuls they replace.

A fused attention computes, per batch and query head, the scores Q K^T (S x T, each a dot product
over the head size H) and the context P V (S x H_v, each a sum over T keys): S x T x H and
S x T x H_v multiply-accumulates, where S is the query length and T the key length (past keys
included). Summed over batch and query heads that is T x (the query's elements) and
T x (the output's elements), so a fusion that is exact reports the MACs of the MatMuls it
replaced; with grouped-query attention the query heads count (the shared key and value heads are
multiplied once per query head). `Attention` and `QAttention` also take the packed input
projection: [B, S, D_in] x [D_in, D_q + D_k + D_v], counted as that MatMul.

Input layouts (onnxruntime's docs/ContribOperators.md; onnx's Attention-23):

- com.microsoft MultiHeadAttention: query [B, S, D] or packed QKV [B, S, N, 3, H]; key [B, L, D],
  [B, N, L, H] or packed KV [B, L, N, 2, H] (absent with packed QKV: L = S); past_key
  [B, N, P, H] (input 6, with a 3-D key: T = P + L); output [B, S, D_v].
- com.microsoft GroupQueryAttention: query [B, S, N x H] (or packed (N + 2 kv_N) x H with no
  key); past_key [B, kv_N, P, H] (input 3: T = P + S); output [B, S, N x H].
- com.microsoft Attention / QAttention: input [B, S, D_in], weight [D_in, D_q + D_k + D_v]
  (`qkv_hidden_sizes`, else three equal parts); past [2, B, N, P, H] (input 4, QAttention's
  input 8: T = P + S); output [B, S, D_v].
- Attention (onnx opset 23): Q [B, N_q, S, H] or [B, S, N_q x H]; K [B, N_kv, L, H] or
  [B, L, N_kv x H]; past_key [B, N_kv, P, H] (input 4: T = P + L); output like Q with H_v.

A shape that stays unknown gives None (the node is left out of the count, as other MAC ops are).
"""

from __future__ import annotations

import math

import onnx_ir as ir

__all__ = ["ATTENTION_OPS", "attention_macs"]

MS_DOMAIN = "com.microsoft"

# (domain, op type) of the fused attention ops `attention_macs` counts.
ATTENTION_OPS = frozenset({
    (MS_DOMAIN, "MultiHeadAttention"),
    (MS_DOMAIN, "GroupQueryAttention"),
    (MS_DOMAIN, "Attention"),
    (MS_DOMAIN, "QAttention"),
    ("", "Attention"),
})


def _shape(node: ir.Node, index: int) -> tuple[int, ...] | None:
    """Input `index`'s shape if it is given and every dimension is a known integer."""
    inputs = node.inputs
    value = inputs[index] if index < len(inputs) else None
    if value is None or value.shape is None:
        return None
    dims = tuple(d for d in value.shape if isinstance(d, int))
    return dims if len(dims) == len(value.shape) else None


def _given(node: ir.Node, index: int) -> bool:
    return index < len(node.inputs) and node.inputs[index] is not None


def _past(node: ir.Node, index: int, axis: int) -> int | None:
    """The past length along `axis` of input `index` (0 when there is no past)."""
    if not _given(node, index):
        return 0
    past = _shape(node, index)
    return past[axis] if past is not None and len(past) > axis else None


def attention_macs(node: ir.Node) -> int | None:
    """Multiply-accumulates of one fused attention node (`ATTENTION_OPS`) with static shapes:
    T x (query elements + output elements), plus the packed projection of `Attention` and
    `QAttention` (module docstring). None for other ops or unknown shapes."""
    key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
    if key not in ATTENTION_OPS or not node.outputs:
        return None
    output = node.outputs[0].shape
    out_dims = tuple(d for d in output if isinstance(d, int)) if output is not None else ()
    query = _shape(node, 0)
    if output is None or len(out_dims) != len(output) or query is None or len(query) < 3:
        return None
    out_size = math.prod(out_dims)
    op = node.op_type
    if key[0] == "":  # onnx Attention: 4-D [B, N, S, H] or 3-D [B, S, D]
        k = _shape(node, 1)
        past = _past(node, 4, 2)
        if k is None or past is None:
            return None
        length = k[2] if len(k) == 4 else k[1]
        return (length + past) * (math.prod(query) + out_size)
    if op == "MultiHeadAttention":
        if len(query) == 5:  # packed QKV: a third of it is the query, keys as long as it
            return query[1] * (math.prod(query) // 3 + out_size)
        k = _shape(node, 1)
        if k is None:
            return None
        past = _past(node, 6, 2) if len(k) == 3 else 0
        if past is None:
            return None
        length = k[2] if len(k) == 4 else k[1]  # [B, N, L, H], else [B, L, ...]
        return (length + past) * (math.prod(query) + out_size)
    if op == "GroupQueryAttention":
        past = _past(node, 3, 2)
        if past is None:
            return None
        # the query's own elements (packed QKV holds more) equal the output's: D = N x H
        return (query[1] + past) * 2 * out_size
    # Attention / QAttention: the projection, then scores and context over T = P + S
    weight = _shape(node, 1)
    past = _past(node, 8 if op == "QAttention" else 4, 3)
    if weight is None or len(weight) != 2 or past is None:
        return None
    sizes = node.attributes.get_ints("qkv_hidden_sizes", None)
    q_width = int(sizes[0]) if sizes else weight[1] // 3
    rows = math.prod(query[:-1])
    return rows * query[-1] * weight[1] + (query[1] + past) * (rows * q_width + out_size)
