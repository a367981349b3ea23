"""`standard-attention`: MultiHeadAttention as the standard ONNX `Attention` (opset 23); exact.

`com.microsoft.MultiHeadAttention(q, k, v, key_padding_mask=mask)` with q, k, v as
[B, S, N * H] (what `fuse-attention` writes for encoders) becomes `Attention(q, k, v,
attn_mask)` with `q_num_heads = kv_num_heads = N` and the same scale; the [B, T] key mask
(1 keep, 0 padding) becomes one boolean [B, 1, S, T] `attn_mask` (`Greater(mask, 0)`, as
onnxruntime reads a 2-D key mask), built once per mask and query length and shared by the
layers. The projections stay MatMuls beside it, so dynamic quantization gives three int8
GEMMs behind one shared DynamicQuantizeLinear instead of `QAttention`.

Why (onnxruntime 1.32, CPU): its `Attention` kernel reads q, k and v in place in their
[B, S, N * H] layout, where `QAttention` runs one int8 GEMM per head and q/k/v (N = head size)
and `MultiHeadAttention` transposes each to [B, N, S, H] first; the attention arithmetic is the
same (outputs bit-identical on the 6 x 384 BERT benchmark). Measured on that model side by side
(`benchmarks/transformers.py`, 1-thread CPU time): 0.95-0.96x of the QAttention graph at batch
8 and batch 1.

Exact, except for rows whose mask keeps no key at all, where both ops give the mean of the
values (as `fuse-attention` documents). Needs opset >= 23 (`convert-opset`; dynamic
quantization converts first); skipped with the reason: an input bias, past or present
key/values, `attention_bias`, a unidirectional op, q/k/v not 3-D, a mask that is not [B, T].

Source: ONNX Attention (opset 23) and onnxruntime's MultiHeadAttention contrib spec.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from slimgraph.passes._graph_utils import is_onnx_op, opset_version, replace_output
from slimgraph.passes._kit import Names, add_initializer, constant_array
from slimgraph.passes.base import Skipped, SlimgraphPass
from slimgraph.passes.registry import register_pass
from slimgraph.passes.transformer._emit import MS_DOMAIN
from slimgraph.passes.transformer._match import NoMatch
from slimgraph.passes.transformer.attention import TransformerFusionResult

__all__ = ["StandardAttentionPass", "STANDARD_ATTENTION_OPSET", "standard_attention_candidates"]

STANDARD_ATTENTION_OPSET = 23


def _rank(value: ir.Value | None) -> int | None:
    """The rank of `value`: its shape's, else (the masks `fuse-attention` writes, whose shape
    is not inferred) through Cast to a Reshape to a constant shape."""
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    node = value.producer()
    while node is not None and is_onnx_op(node, "Cast"):
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    if node is not None and is_onnx_op(node, "Reshape"):
        shape = constant_array(node.inputs[1])
        if shape is not None and shape.ndim == 1:
            return int(shape.size)
    return None


def _check(mha: ir.Node) -> None:
    """Raise NoMatch unless `mha` is q, k, v [B, S, D] with at most a [B, T] key mask."""
    inputs = list(mha.inputs)
    q, k, v = (inputs + [None, None, None])[:3]
    if q is None or k is None or v is None:
        raise NoMatch("MultiHeadAttention without separate q, k, v")
    if any(_rank(t) != 3 for t in (q, k, v)):
        raise NoMatch("q, k, v are not 3-D [B, S, N * H]")
    if any(x is not None for i, x in enumerate(inputs) if i == 3 or i >= 5):
        raise NoMatch("input bias, attention_bias or past key/values")
    if any(out.uses() or out.is_graph_output() for out in list(mha.outputs)[1:]):
        raise NoMatch("present key/values are read")
    if mha.attributes.get_int("unidirectional", 0):
        raise NoMatch("unidirectional (causal) MultiHeadAttention")
    mask = inputs[4] if len(inputs) > 4 else None
    if mask is not None:
        if _rank(mask) != 2 or mask.dtype != ir.DataType.INT32:
            raise NoMatch("key_padding_mask is not an int32 [B, T] mask")


def standard_attention_candidates(model: ir.Model) -> list[ir.Node]:
    """The MultiHeadAttention nodes `StandardAttentionPass` would rewrite (any opset)."""
    found = []
    for node in model.graph:
        if node.domain == MS_DOMAIN and node.op_type == "MultiHeadAttention":
            try:
                _check(node)
            except NoMatch:
                continue
            found.append(node)
    return found


def _seq_key(q: ir.Value) -> object:
    """What identifies q's sequence length across layers: its dimension (int or symbol), or
    q itself when unknown (then the mask is not shared)."""
    assert q.shape is not None
    dim = q.shape[1]
    if isinstance(dim, int):
        return dim
    return ("sym", dim.value) if isinstance(dim, ir.SymbolicDim) and dim.value else q


@register_pass("standard-attention", exact=True)
class StandardAttentionPass(SlimgraphPass):
    """`com.microsoft.MultiHeadAttention(q, k, v[, key_padding_mask])` on [B, S, N * H] inputs
    becomes the standard `Attention` (opset >= 23) with a boolean [B, 1, S, T] mask; exact
    (see the module docstring for why and what is skipped)."""

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> TransformerFusionResult:
        graph = model.graph
        found = [n for n in graph if n.domain == MS_DOMAIN and n.op_type == "MultiHeadAttention"]
        if opset_version(model, default=0) < STANDARD_ATTENTION_OPSET:
            skipped = [Skipped(n.name or "", n.op_type,
                               f"the model's opset is below {STANDARD_ATTENTION_OPSET}")
                       for n in found]
            return TransformerFusionResult(model, False, skipped=skipped)
        names = Names(graph)
        masks: dict[tuple[int, object], ir.Value] = {}
        count, skipped = 0, []
        for mha in found:
            try:
                _check(mha)
            except NoMatch as reason:
                skipped.append(Skipped(mha.name or "", mha.op_type, str(reason)))
                continue
            q, k, v = list(mha.inputs)[:3]
            assert q is not None and k is not None and v is not None
            mask = mha.inputs[4] if len(mha.inputs) > 4 else None
            inputs: list[ir.Value | None] = [q, k, v]
            if mask is not None:
                key = (id(mask), _seq_key(q))
                if key not in masks:
                    masks[key] = self._bool_mask(graph, names, mask, q, k, mha)
                inputs.append(masks[key])
            heads = mha.attributes.get_int("num_heads")
            attrs: dict[str, int | float] = {"q_num_heads": heads, "kv_num_heads": heads}
            if "scale" in mha.attributes:
                attrs["scale"] = mha.attributes.get_float("scale")
            node = ir.node("Attention", inputs, attributes=attrs,
                           name=names.fresh(f"{mha.name or 'attention'}_standard"))
            node.metadata_props.update(mha.metadata_props)
            out = node.outputs[0]
            out.type, out.shape = mha.outputs[0].type, mha.outputs[0].shape
            out.name = names.fresh(f"{mha.outputs[0].name or 'attention'}_standard")
            graph.insert_before(mha, node)
            replace_output(mha.outputs[0], out)
            count += 1
        if count:
            common.RemoveUnusedNodesPass()(model)
        fused = {"standard_attention": count} if count else {}
        return TransformerFusionResult(model, bool(count), skipped=skipped, fused=fused)

    @staticmethod
    def _bool_mask(
        graph: ir.Graph, names: Names, mask: ir.Value, q: ir.Value, k: ir.Value,
        before: ir.Node,
    ) -> ir.Value:
        """[B, T] int32 key mask -> bool [B, 1, S, T] (S: q's axis 1), built before `before`
        (every input exists there: the mask feeds `before`, q too)."""
        base = f"{mask.name or 'mask'}_attn"

        def const(suffix: str, array: np.ndarray) -> ir.Value:
            return add_initializer(graph, f"{base}_{suffix}", array, names=names)

        zero = const("zero", np.array(0, np.int32))
        axes = const("axes", np.array([1, 2], np.int64))
        one = const("one", np.array([1], np.int64))
        start, end = const("start", np.array([1], np.int64)), const("end", np.array([2], np.int64))
        nodes = [
            ir.node("Greater", [mask, zero], name=names.fresh(f"{base}_keep")),
        ]
        nodes.append(ir.node("Unsqueeze", [nodes[-1].outputs[0], axes],
                             name=names.fresh(f"{base}_4d")))
        nodes.append(ir.node("Shape", [q], name=names.fresh(f"{base}_qshape")))
        nodes.append(ir.node("Slice", [nodes[-1].outputs[0], start, end],
                             name=names.fresh(f"{base}_seq")))
        nodes.append(ir.node("Concat", [one, one, nodes[-1].outputs[0], one],
                             attributes={"axis": 0}, name=names.fresh(f"{base}_shape")))
        nodes.append(ir.node("Expand", [nodes[1].outputs[0], nodes[-1].outputs[0]],
                             name=names.fresh(f"{base}_expand")))
        for node in nodes:
            node.outputs[0].name = names.fresh(node.name or base)
            graph.insert_before(before, node)
        result = nodes[-1].outputs[0]
        result.type = ir.TensorType(ir.DataType.BOOL)
        assert q.shape is not None and k.shape is not None
        result.shape = ir.Shape([q.shape[0], 1, q.shape[1], k.shape[1]])
        return result
