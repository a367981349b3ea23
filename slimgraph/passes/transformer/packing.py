"""`pack-attention`: the Q/K/V projections folded into the fused op; exact.

`MultiHeadAttention(q, k, v)` whose q, k, v are MatMul (+ bias Add) of one input (separately,
or one packed MatMul + Split as in GPT-2) becomes `com.microsoft.Attention(x, W[D, 3*N*H],
b[3*N*H])`: one GEMM instead of three, and the form onnxruntime's int8 `QAttention` takes
(dynamic quantization turns Attention into QAttention with int8 weights).

Source: onnxruntime contrib op specs (Attention, QAttention).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from slimgraph.passes._graph_utils import is_onnx_op, replace_output
from slimgraph.passes._kit import Names, add_initializer, constant_array
from slimgraph.passes.base import Skipped, SlimgraphPass
from slimgraph.passes.registry import register_pass
from slimgraph.passes.transformer._emit import MS_DOMAIN
from slimgraph.passes.transformer._match import NoMatch
from slimgraph.passes.transformer.attention import TransformerFusionResult

__all__ = ["PackAttentionPass"]


@dataclasses.dataclass
class _Projection:
    source: ir.Value
    weight: np.ndarray  # [D, 3 * N * H] in q, k, v column order
    bias: np.ndarray  # [3 * N * H]
    nodes: list[ir.Node]


def _linear(value: ir.Value | None) -> tuple[ir.Value, np.ndarray, np.ndarray, list[ir.Node]]:
    """`Add(MatMul(x, W), b)` or `MatMul(x, W)` with constant W [D, M] (b [M]) -> x, W, b."""
    node = value.producer() if value is not None else None
    nodes: list[ir.Node] = []
    bias: np.ndarray | None = None
    if node is not None and is_onnx_op(node, "Add"):
        a, b = node.inputs
        for mm_out, other in ((a, b), (b, a)):
            producer = mm_out.producer() if mm_out is not None else None
            array = constant_array(other)
            if producer is not None and is_onnx_op(producer, "MatMul") and array is not None:
                bias, nodes, node = array, [node], producer
                break
        else:
            raise NoMatch("projection Add has no MatMul and constant bias")
    if node is None or not is_onnx_op(node, "MatMul"):
        raise NoMatch("projection is not a MatMul")
    weight = constant_array(node.inputs[1])
    x = node.inputs[0]
    if weight is None or weight.ndim != 2 or x is None or weight.dtype != np.float32:
        raise NoMatch("projection weight is not a constant float32 matrix")
    if bias is None:
        bias = np.zeros(weight.shape[1], weight.dtype)
    if bias.shape != (weight.shape[1],) or bias.dtype != weight.dtype:
        raise NoMatch("projection bias is not one value per column")
    return x, weight, bias, [*nodes, node]


def _packed_projection(mha: ir.Node) -> _Projection:
    q, k, v = mha.inputs[:3]
    if q is None or k is None or v is None:
        raise NoMatch("MultiHeadAttention without separate q, k, v")
    split = q.producer()
    if split is not None and split is k.producer() is v.producer() and is_onnx_op(split, "Split"):
        axis = split.attributes.get_int("axis", 0)
        packed = split.inputs[0]
        rank = len(packed.shape) if packed is not None and packed.shape is not None else 0
        sizes = constant_array(split.inputs[1]) if len(split.inputs) > 1 else None
        if (axis % max(rank, 1)) != rank - 1 or list(split.outputs) != [q, k, v] or (
            sizes is not None and len(set(sizes.tolist())) != 1
        ):
            raise NoMatch("Split is not three equal parts of the last axis")
        x, weight, bias, nodes = _linear(split.inputs[0])
        if weight.shape[1] % 3:
            raise NoMatch("packed projection width is not divisible by 3")
        return _Projection(x, weight, bias, [split, *nodes])
    parts = [_linear(t) for t in (q, k, v)]
    if not parts[0][0] is parts[1][0] is parts[2][0]:
        raise NoMatch("q, k and v are projections of different inputs (cross attention)")
    if len({p[1].shape for p in parts}) != 1:
        raise NoMatch("q, k and v projections differ in shape")
    return _Projection(parts[0][0], np.concatenate([p[1] for p in parts], 1),
                       np.concatenate([p[2] for p in parts]),
                       [n for p in parts for n in p[3]])


def _private(projection: _Projection, mha: ir.Node) -> bool:
    """Every value between x and the MultiHeadAttention is read only on that path."""
    inside = set(projection.nodes) | {mha}
    return all(
        not out.is_graph_output() and all(u.node in inside for u in out.uses())
        for node in projection.nodes for out in node.outputs
    )


@register_pass("pack-attention", exact=True)
class PackAttentionPass(SlimgraphPass):
    """Fold the Q/K/V projections into the fused op: `MultiHeadAttention(q, k, v)` whose q, k, v
    are MatMul (+ bias Add) of one input (separately, or one packed MatMul + Split as in GPT-2)
    becomes `com.microsoft.Attention(x, W[D, 3*N*H], b[3*N*H])`; exact.

    One GEMM instead of three, and the form onnxruntime's int8 `QAttention` takes (dynamic
    quantization turns Attention into QAttention with int8 weights). Run it only before dynamic
    quantization or for fp32 deployment: static QDQ quantizes the projections as MatMuls, which
    the fused op would hide. Masks carry over (key_padding_mask -> mask_index, attention_bias).
    """

    exact: ClassVar[bool] = True

    def __init__(self, *, with_bias: bool = True) -> None:
        """Args: with_bias: also pack attentions with an `attention_bias` input (causal masks);
        dynamic quantization passes False, as `QAttention` takes no attention_bias."""
        super().__init__()
        self.with_bias = with_bias

    def call(self, model: ir.Model) -> TransformerFusionResult:
        graph = model.graph
        names = Names(graph)
        count, skipped = 0, []
        found = [n for n in graph if n.domain == MS_DOMAIN and n.op_type == "MultiHeadAttention"]
        for mha in found:
            try:
                extra = list(mha.inputs)[3:]
                if any(v is not None for i, v in enumerate(extra) if i + 3 not in (4, 5)):
                    raise NoMatch("MultiHeadAttention with bias, past or other extra inputs")
                if not self.with_bias and len(extra) > 2 and extra[2] is not None:
                    raise NoMatch("attention_bias (QAttention takes none)")
                projection = _packed_projection(mha)
                if not _private(projection, mha):
                    raise NoMatch("a projection output is read outside the attention")
            except NoMatch as reason:
                skipped.append(Skipped(mha.name or "", mha.op_type, str(reason)))
                continue
            base = mha.name or "attention"
            weight = add_initializer(graph, names.fresh(f"{base}_qkv_weight"), projection.weight)
            bias = add_initializer(graph, names.fresh(f"{base}_qkv_bias"), projection.bias)
            mask = mha.inputs[4] if len(mha.inputs) > 4 else None
            attention_bias = mha.inputs[5] if len(mha.inputs) > 5 else None
            inputs: list[ir.Value | None] = [projection.source, weight, bias, mask]
            if attention_bias is not None:
                inputs += [None, attention_bias]
            while inputs[-1] is None:
                inputs.pop()
            attrs = {name: attr.value for name, attr in mha.attributes.items()
                     if name in ("num_heads", "scale", "mask_filter_value")}
            node = ir.node("Attention", inputs, attributes=attrs, domain=MS_DOMAIN,
                           name=names.fresh(f"{mha.name or 'attention'}_packed"))
            node.metadata_props.update(mha.metadata_props)
            out = node.outputs[0]
            out.type, out.shape = mha.outputs[0].type, mha.outputs[0].shape
            graph.insert_before(mha, node)
            replace_output(mha.outputs[0], node.outputs[0])
            count += 1
        if count:
            common.RemoveUnusedNodesPass()(model)
        fused = {"packed_attention": count} if count else {}
        return TransformerFusionResult(model, bool(count), skipped=skipped, fused=fused)


