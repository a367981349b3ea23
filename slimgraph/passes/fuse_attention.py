"""Exact transformer fusions into onnxruntime's contrib ops (`com.microsoft` domain).

The dynamo exporter writes attention as plain ops; onnxruntime's own transformer optimizer does not
recognise that form, so the attention core runs as a dozen kernels with a broadcast mask. These
passes rewrite it into the fused forms onnxruntime's CPU kernels run in one go:

- `fuse-attention`: the attention core between the Q/K/V projections and the output projection,
  `Reshape(q, [B, S, N, H]) -> Transpose -> MatMul(q, k^T) -> Div/Mul by a scale -> mask ->
  Softmax -> MatMul(., v) -> Transpose -> Reshape([B, S, N*H])`, becomes one
  `com.microsoft.MultiHeadAttention(q, k, v)` with `num_heads = N` and the scale. The Q/K/V and
  output projections stay MatMul (+ Add) outside the fused op, so quantization handles them as
  any other MatMul. The mask is reduced to what the fused op takes:

  * a padding bias `Where(keep[B, 1, 1, T], 0, c)` added to the scores (BERT, HF) becomes the
    2-D `key_padding_mask` (int32 [B, T], 1 = keep) with `mask_filter_value = c`; the broadcast
    [B, N, S, T] bias, its Expand and the float Where are gone;
  * a `masked_fill` (`Where(masked, c, scores)`) or an additive bias of shape [S, T] (a causal
    mask) becomes the `attention_bias` input [1, 1, S, T] (`Where(masked, c, 0)` computed once
    on [S, T]);
  * no mask: nothing.

  Patterns whose head split, scale or mask do not have one of these forms are left alone.
- `fuse-skip-layernorm`: residual Add (+ bias) + LayerNormalization becomes
  `com.microsoft.SkipLayerNormalization` (onnxscript's rules, `onnxscript.rewriter.ort_fusions`).
  Not in the `transformer` preset: onnxruntime 1.32's CPU kernel for it is several times slower
  than Add + LayerNormalization (measured, see `slimgraph.passes.TRANSFORMER_STEPS`); for other
  execution providers or versions, add it to a recipe.
- `fuse-bias-gelu`: Add(bias) + Gelu (erf form) becomes `com.microsoft.BiasGelu` (onnxscript's).

onnxscript's own SDPA/MHA rules (`ort_fusions.sdpa`, `mha`) cover the padding-mask form only
with an expanded [B, 1, S, T] float bias and do not match masked_fill or a packed QKV Split (GPT);
the matcher here covers the three forms above with one walk. All three passes are exact: the fused
kernels compute the same arithmetic up to float rounding (verified at rtol 1e-4). The output is
onnxruntime-only (contrib ops), which is why fuse-attention and fuse-bias-gelu form the
`transformer` preset, not `lossless`.

Source: onnxruntime contrib op specs (MultiHeadAttention, SkipLayerNormalization, BiasGelu);
Vaswani et al. 2017 for the attention arithmetic.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from slimgraph.passes._graph_utils import is_onnx_op, replace_output
from slimgraph.passes._kit import Names, add_initializer, constant_array
from slimgraph.passes.base import Skipped, SlimgraphPass, SlimgraphPassResult
from slimgraph.passes.registry import register_pass

__all__ = [
    "AttentionMatch",
    "FuseAttentionPass",
    "FuseSkipLayerNormPass",
    "FuseBiasGeluPass",
    "PackAttentionPass",
    "ResidualSumPass",
    "has_residual_sums",
    "TransformerFusionResult",
    "match_attention",
    "MS_DOMAIN",
]

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


@dataclasses.dataclass
class TransformerFusionResult(SlimgraphPassResult):
    """How many patterns each fusion rewrote."""

    fused: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class AttentionMatch:
    """One attention core found in the graph (values are the graph's own).

    Attributes:
        q, k, v: the projections' outputs, float [B, S, N*H] (k, v: [B, T, N*H]).
        heads: N; head_size: H.
        scale: the factor applied to q @ k^T before the mask.
        softmax: the Softmax node; output: the head-merge Reshape's output [B, S, N*H].
        mask_kind: "none", "padding" (mask_value is the 4-D boolean keep/masked tensor),
            "bias" ([S, T] additive float bias) or "fill" ([S, T] boolean masked positions).
        mask_value, mask_keep, fill: the mask tensor, whether True means keep, the fill constant.
        nodes: every node of the core (removed after the rewrite when nothing else reads them).
    """

    q: ir.Value
    k: ir.Value
    v: ir.Value
    heads: int
    head_size: int
    scale: float
    softmax: ir.Node
    output: ir.Value
    mask_kind: str = "none"
    mask_value: ir.Value | None = None
    mask_keep: bool = True
    fill: float = 0.0
    nodes: list[ir.Node] = dataclasses.field(default_factory=list)


class _NoMatch(Exception):
    """Raised inside the matcher with the reason the pattern does not apply."""


def _producer(value: ir.Value | None, *op_types: str) -> ir.Node:
    node = value.producer() if value is not None else None
    if node is None or not is_onnx_op(node, *op_types):
        raise _NoMatch(f"expected {'/'.join(op_types)}")
    return node


def _perm(node: ir.Node) -> tuple[int, ...]:
    attr = node.attributes.get("perm")
    return tuple(attr.value) if attr is not None else ()


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_array(value)
    if array is None or array.size != 1 or array.dtype.kind != "f":
        return None
    return float(array.reshape(()))


def _dims(value: ir.Value) -> tuple[object, ...] | None:
    shape = value.shape
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else d.value for d in shape)


def _same(a: object, b: object) -> bool:
    return a is not None and a == b


def _head_split(value: ir.Value, perm: tuple[int, ...], nodes: list[ir.Node]) -> tuple[
    ir.Value, int, int]:
    """`Transpose(Reshape(x, [B, S, N, H]), perm)` -> (x, N, H); x must be [B, S, N*H]."""
    transpose = _producer(value, "Transpose")
    got = _perm(transpose)
    if got != perm:
        # k^T may be Transpose(0, 1, 3, 2) of the usual (0, 2, 1, 3) head split
        if perm == (0, 2, 3, 1) and got == (0, 1, 3, 2):
            inner = _producer(transpose.inputs[0], "Transpose")
            if _perm(inner) != (0, 2, 1, 3):
                raise _NoMatch("unexpected head transpose")
            nodes.append(transpose)
            transpose = inner
        else:
            raise _NoMatch(f"head transpose perm {got}, expected {perm}")
    reshape = _producer(transpose.inputs[0], "Reshape")
    x = reshape.inputs[0]
    assert x is not None
    split, source = _dims(reshape.outputs[0]), _dims(x)
    if split is None or source is None or len(split) != 4 or len(source) != 3:
        raise _NoMatch("head split shapes unknown (run shape inference)")
    heads, head_size = split[2], split[3]
    if not isinstance(heads, int) or not isinstance(head_size, int):
        raise _NoMatch("head count or size not static")
    if not (_same(split[0], source[0]) and _same(split[1], source[1])):
        raise _NoMatch("head split does not keep batch and sequence")
    if source[2] != heads * head_size:
        raise _NoMatch("head split does not cover the hidden dimension")
    nodes += [transpose, reshape]
    return x, heads, head_size


def _mask(scores_in: ir.Value, match_nodes: list[ir.Node]) -> tuple[ir.Value, dict[str, object]]:
    """Peel the mask off the Softmax input; returns the scaled scores and the mask fields."""
    node = scores_in.producer()
    if node is None:
        raise _NoMatch("softmax input has no producer")
    if is_onnx_op(node, "Where"):
        cond, fill_value, scores = node.inputs
        fill = _scalar(fill_value)
        if fill is None or cond is None or scores is None:
            raise _NoMatch("masked_fill with a non-constant fill")
        match_nodes.append(node)
        return scores, _mask_fields(cond, keep=False, fill=fill, additive=False)
    if is_onnx_op(node, "Add"):
        for scores, bias in (node.inputs, reversed(node.inputs)):
            if scores is None or bias is None:
                continue
            producer = scores.producer()
            if producer is not None and is_onnx_op(producer, "Div", "Mul", "MatMul"):
                match_nodes.append(node)
                where = bias.producer()
                if where is not None and is_onnx_op(where, "Where"):
                    cond, a, b = where.inputs
                    va, vb = _scalar(a), _scalar(b)
                    if cond is not None and va == 0.0 and vb is not None:
                        return scores, _mask_fields(cond, keep=True, fill=vb, additive=True,
                                                    bias=bias)
                    if cond is not None and vb == 0.0 and va is not None:
                        return scores, _mask_fields(cond, keep=False, fill=va, additive=True,
                                                    bias=bias)
                dims = _dims(bias)
                if dims is None or len(dims) != 2:
                    raise _NoMatch(f"additive mask of shape {dims} is not [S, T] nor a "
                                   "Where(keep, 0, c) padding mask")
                return scores, {"mask_kind": "bias", "mask_value": bias}
        raise _NoMatch("Add before Softmax does not add a mask to the scores")
    return scores_in, {"mask_kind": "none"}


def _mask_fields(cond: ir.Value, *, keep: bool, fill: float, additive: bool,
                 bias: ir.Value | None = None) -> dict[str, object]:
    dims = _dims(cond)
    if dims is not None and len(dims) == 4 and dims[1] == 1 and dims[2] == 1:
        return {"mask_kind": "padding", "mask_value": cond, "mask_keep": keep, "fill": fill}
    if dims is not None and len(dims) == 2:
        if additive:
            if _dims(bias) is None or len(_dims(bias)) != 2:  # type: ignore[arg-type]
                raise _NoMatch("additive mask is not [S, T]")
            return {"mask_kind": "bias", "mask_value": bias}
        return {"mask_kind": "fill", "mask_value": cond, "mask_keep": keep, "fill": fill}
    raise _NoMatch(f"mask of shape {dims} is neither [B, 1, 1, T] nor [S, T]")


def match_attention(softmax: ir.Node) -> AttentionMatch:
    """Match the attention core around `softmax` (see the module docstring).

    Raises:
        _NoMatch: with the reason, when the pattern does not apply.
    """
    if not is_onnx_op(softmax, "Softmax"):
        raise _NoMatch("not a Softmax")
    axis = softmax.attributes.get_int("axis", -1)
    probs = softmax.outputs[0]
    if axis not in (-1, 3) or probs.is_graph_output():
        raise _NoMatch("softmax axis is not the key axis")
    nodes: list[ir.Node] = [softmax]
    scaled, fields = _mask(softmax.inputs[0], nodes)  # type: ignore[arg-type]
    scale = 1.0
    node = _producer(scaled, "Div", "Mul", "MatMul")
    if not is_onnx_op(node, "MatMul"):
        factor = _scalar(node.inputs[1])
        if factor is None:
            raise _NoMatch("score scale is not a constant scalar")
        scale = 1.0 / factor if node.op_type == "Div" else factor
        nodes.append(node)
        node = _producer(node.inputs[0], "MatMul")
    nodes.append(node)
    q, heads, head_size = _head_split(node.inputs[0], (0, 2, 1, 3), nodes)  # type: ignore[arg-type]
    k, k_heads, _ = _head_split(node.inputs[1], (0, 2, 3, 1), nodes)  # type: ignore[arg-type]
    uses = list(probs.uses())
    if len(uses) != 1 or not is_onnx_op(uses[0].node, "MatMul") or uses[0].idx != 0:
        raise _NoMatch("softmax output is not read by one MatMul")
    context = uses[0].node
    nodes.append(context)
    v, v_heads, _ = _head_split(context.inputs[1], (0, 2, 1, 3), nodes)  # type: ignore[arg-type]
    if not heads == k_heads == v_heads:
        raise _NoMatch("q, k and v have different head counts")
    merge_uses = list(context.outputs[0].uses())
    if len(merge_uses) != 1 or not is_onnx_op(merge_uses[0].node, "Transpose"):
        raise _NoMatch("context is not merged by a Transpose")
    merge = merge_uses[0].node
    reshape_uses = list(merge.outputs[0].uses())
    if _perm(merge) != (0, 2, 1, 3) or len(reshape_uses) != 1:
        raise _NoMatch("unexpected head merge")
    reshape = reshape_uses[0].node
    out_dims, q_dims = _dims(reshape.outputs[0]), _dims(q)
    if not is_onnx_op(reshape, "Reshape") or out_dims is None or q_dims is None:
        raise _NoMatch("head merge Reshape missing or shapes unknown")
    if len(out_dims) != 3 or out_dims[2] != heads * head_size or not (
        _same(out_dims[0], q_dims[0]) and _same(out_dims[1], q_dims[1])
    ):
        raise _NoMatch("head merge does not give [B, S, N*H]")
    nodes += [merge, reshape]
    if fields.get("mask_kind") == "padding":
        mask_dims, k_dims = _dims(fields["mask_value"]), _dims(k)  # type: ignore[arg-type]
        if mask_dims is None or k_dims is None or not (
            _same(mask_dims[0], q_dims[0]) and _same(mask_dims[3], k_dims[1])
        ):
            raise _NoMatch("padding mask is not [B, 1, 1, T] of this attention's batch and keys")
    for inner in nodes[1:]:  # intermediate values read only inside the core
        if inner is reshape:
            continue
        for out in inner.outputs:
            if out.is_graph_output() or any(u.node not in nodes for u in out.uses()):
                raise _NoMatch("an intermediate value of the attention is read elsewhere")
    return AttentionMatch(q, k, v, heads, head_size, scale, softmax, reshape.outputs[0],
                          nodes=nodes, **fields)  # type: ignore[arg-type]


def _const(graph: ir.Graph, array: np.ndarray, hint: str) -> ir.Value:
    return add_initializer(graph, hint, array)


class _MaskCache:
    """One reduced mask per source mask (layers sharing a mask share its reduction)."""

    def __init__(self, graph: ir.Graph, names: Names) -> None:
        self.graph, self.names = graph, names
        self.done: dict[tuple[str, int, bool, float], ir.Value] = {}

    def _add(self, before: ir.Node, op: str, inputs: list[ir.Value], **attrs: object) -> ir.Value:
        node = ir.node(op, inputs, attributes=attrs, name=self.names.fresh(f"attention_mask_{op}"))
        node.outputs[0].name = self.names.fresh(f"attention_mask_{op.lower()}")
        self.graph.insert_before(before, node)
        return node.outputs[0]

    def padding(self, match: AttentionMatch, first: ir.Node) -> ir.Value:
        """int32 [B, T], 1 where the key is kept."""
        cond = match.mask_value
        assert cond is not None
        key = ("padding", id(cond), match.mask_keep, match.fill)
        if key not in self.done:
            shape = _const(self.graph, np.array([0, -1], np.int64), "attention_mask_2d")
            flat = self._add(first, "Reshape", [cond, shape])
            if not match.mask_keep:
                flat = self._add(first, "Not", [flat])
            mask = self._add(first, "Cast", [flat], to=ir.DataType.INT32)
            mask.dtype = ir.DataType.INT32
            self.done[key] = mask  # type: ignore[index]
        return self.done[key]  # type: ignore[index]

    def bias(self, match: AttentionMatch, first: ir.Node) -> ir.Value:
        """float [1, 1, S, T] additive bias."""
        source = match.mask_value
        assert source is not None
        key = (match.mask_kind, id(source), match.mask_keep, match.fill)
        if key not in self.done:
            if match.mask_kind == "fill":
                dtype = match.q.dtype.numpy() if match.q.dtype is not None else np.float32
                fill = _const(self.graph, np.array(match.fill, dtype), "attention_mask_fill")
                zero = _const(self.graph, np.array(0, dtype), "attention_mask_zero")
                source = self._add(first, "Where", [source, fill, zero])
            axes = _const(self.graph, np.array([0, 1], np.int64), "attention_mask_axes")
            self.done[key] = self._add(first, "Unsqueeze", [source, axes])  # type: ignore[index]
        return self.done[key]  # type: ignore[index]


def _rewrite(graph: ir.Graph, match: AttentionMatch, masks: _MaskCache, names: Names) -> None:
    first = match.nodes[-1]  # insert just before the head-merge Reshape: all inputs exist there
    inputs: list[ir.Value | None] = [match.q, match.k, match.v]
    attrs: dict[str, object] = {"num_heads": match.heads, "scale": float(match.scale)}
    if match.mask_kind == "padding":
        inputs += [None, masks.padding(match, first)]
        attrs["mask_filter_value"] = float(match.fill)
    elif match.mask_kind in ("bias", "fill"):
        inputs += [None, None, masks.bias(match, first)]
    merge = match.nodes[-1]
    node = ir.node("MultiHeadAttention", inputs, attributes=attrs, domain=MS_DOMAIN,
                   name=names.fresh(f"{merge.name or 'attention'}_mha"))
    node.metadata_props.update(match.softmax.metadata_props)
    out = node.outputs[0]
    out.dtype, out.shape = match.output.dtype, match.output.shape
    graph.insert_before(first, node)
    replace_output(match.output, out)


@register_pass("fuse-attention", exact=True)
class FuseAttentionPass(SlimgraphPass):
    """Rewrite each attention core into `com.microsoft.MultiHeadAttention`; exact.

    See the module docstring for the pattern and the mask forms. Needs value shapes (the dynamo
    exporter writes them; otherwise run `shape-inference` first). The projections stay outside.
    """

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> TransformerFusionResult:
        graph = model.graph
        names = Names(graph)
        masks = _MaskCache(graph, names)
        count, skipped = 0, []
        for softmax in [n for n in graph if is_onnx_op(n, "Softmax")]:
            try:
                match = match_attention(softmax)
            except _NoMatch as reason:
                skipped.append(Skipped(softmax.name or "<unnamed Softmax>", "Softmax",
                                       str(reason)))
                logger.debug("attention at %s not fused: %s", softmax.name, reason)
                continue
            _rewrite(graph, match, masks, names)
            count += 1
        if count:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            common.RemoveUnusedNodesPass()(model)
        fused = {"attention": count} if count else {}
        return TransformerFusionResult(model, bool(count), skipped=skipped, fused=fused)


def _onnxscript_fusion(model: ir.Model, rules: object, label: str) -> TransformerFusionResult:
    count = rules.apply_to_model(model)  # type: ignore[attr-defined]
    if count:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        common.RemoveUnusedNodesPass()(model)
    return TransformerFusionResult(model, bool(count), fused={label: count} if count else {})


@register_pass("fuse-skip-layernorm", exact=True)
class FuseSkipLayerNormPass(SlimgraphPass):
    """Residual Add (+ bias Add) + LayerNormalization over the last axis becomes
    `com.microsoft.SkipLayerNormalization`; exact. onnxscript's rules (they check [B, S, D]
    shapes, 1-D gamma/beta/bias and stash_type 1)."""

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> TransformerFusionResult:
        from onnxscript.rewriter.ort_fusions.skip_normalization import (
            skip_layer_normalization_ruleset,
        )

        return _onnxscript_fusion(model, skip_layer_normalization_ruleset, "skip_layernorm")


@register_pass("fuse-bias-gelu", exact=True)
class FuseBiasGeluPass(SlimgraphPass):
    """Add(x, bias[D]) + Gelu (exact erf form) becomes `com.microsoft.BiasGelu`; exact.
    onnxscript's rule (`approximate="tanh"` is left alone)."""

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> TransformerFusionResult:
        from onnxscript.rewriter.ort_fusions.bias_gelu import bias_gelu_rules

        return _onnxscript_fusion(model, bias_gelu_rules, "bias_gelu")


# ---------------------------------------------------------------- packed QKV: Attention


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
            raise _NoMatch("projection Add has no MatMul and constant bias")
    if node is None or not is_onnx_op(node, "MatMul"):
        raise _NoMatch("projection is not a MatMul")
    weight = constant_array(node.inputs[1])
    x = node.inputs[0]
    if weight is None or weight.ndim != 2 or x is None or weight.dtype != np.float32:
        raise _NoMatch("projection weight is not a constant float32 matrix")
    if bias is None:
        bias = np.zeros(weight.shape[1], weight.dtype)
    if bias.shape != (weight.shape[1],) or bias.dtype != weight.dtype:
        raise _NoMatch("projection bias is not one value per column")
    return x, weight, bias, [*nodes, node]


def _packed_projection(mha: ir.Node) -> _Projection:
    q, k, v = mha.inputs[:3]
    if q is None or k is None or v is None:
        raise _NoMatch("MultiHeadAttention without separate q, k, v")
    split = q.producer()
    if split is not None and split is k.producer() is v.producer() and is_onnx_op(split, "Split"):
        axis = split.attributes.get_int("axis", 0)
        packed = split.inputs[0]
        rank = len(packed.shape) if packed is not None and packed.shape is not None else 0
        sizes = constant_array(split.inputs[1]) if len(split.inputs) > 1 else None
        if (axis % max(rank, 1)) != rank - 1 or list(split.outputs) != [q, k, v] or (
            sizes is not None and len(set(sizes.tolist())) != 1
        ):
            raise _NoMatch("Split is not three equal parts of the last axis")
        x, weight, bias, nodes = _linear(split.inputs[0])
        if weight.shape[1] % 3:
            raise _NoMatch("packed projection width is not divisible by 3")
        return _Projection(x, weight, bias, [split, *nodes])
    parts = [_linear(t) for t in (q, k, v)]
    if not parts[0][0] is parts[1][0] is parts[2][0]:
        raise _NoMatch("q, k and v are projections of different inputs (cross attention)")
    if len({p[1].shape for p in parts}) != 1:
        raise _NoMatch("q, k and v projections differ in shape")
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
                    raise _NoMatch("MultiHeadAttention with bias, past or other extra inputs")
                if not self.with_bias and len(extra) > 2 and extra[2] is not None:
                    raise _NoMatch("attention_bias (QAttention takes none)")
                projection = _packed_projection(mha)
                if not _private(projection, mha):
                    raise _NoMatch("a projection output is read outside the attention")
            except _NoMatch as reason:
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
            out.dtype, out.shape = mha.outputs[0].dtype, mha.outputs[0].shape
            graph.insert_before(mha, node)
            replace_output(mha.outputs[0], node.outputs[0])
            count += 1
        if count:
            common.RemoveUnusedNodesPass()(model)
        fused = {"packed_attention": count} if count else {}
        return TransformerFusionResult(model, bool(count), skipped=skipped, fused=fused)


# ---------------------------------------------------------------- residual Add -> Sum


def _residual_add(node: ir.Node) -> bool:
    """An Add of two computed values whose output a LayerNormalization normalizes."""
    if not is_onnx_op(node, "Add") or len(node.inputs) != 2:
        return False
    if any(v is None or v.const_value is not None or v.is_graph_input() for v in node.inputs):
        return False
    return any(is_onnx_op(u.node, "LayerNormalization") and u.idx == 0
               for u in node.outputs[0].uses())


def has_residual_sums(model: ir.Model) -> bool:
    """Whether `model` has a `Sum` feeding a LayerNormalization (`residual-sum` ran on it)."""
    return any(is_onnx_op(n, "Sum") and any(is_onnx_op(u.node, "LayerNormalization")
                                            for u in n.outputs[0].uses()) for n in model.graph)


@register_pass("residual-sum", exact=True)
class ResidualSumPass(SlimgraphPass):
    """The residual `Add(a, b)` in front of a LayerNormalization becomes `Sum(a, b)`; exact.

    Same arithmetic, different op type: onnxruntime's graph optimizer rewrites Add (+ bias Add)
    + LayerNormalization into its SkipLayerNormalization at session creation, and in onnxruntime
    1.32 that CPU kernel is slower than the plain ops. On the 6x384 BERT-style encoder after
    dynamic int8, blocking the fusion this way (`disabled_optimizers=["SkipLayerNormFusion"]`
    gave the same) cut CPU time per run to 0.84x at batch 8 and 0.83x at batch 1 (one thread).
    Quantization keeps it: `quantize` re-applies it when its input had such Sums.
    """

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> TransformerFusionResult:
        graph = model.graph
        count = 0
        for node in [n for n in graph if _residual_add(n)]:
            total = ir.node("Sum", list(node.inputs), name=node.name, doc_string=node.doc_string)
            total.metadata_props.update(node.metadata_props)
            total.outputs[0].dtype = node.outputs[0].dtype
            total.outputs[0].shape = node.outputs[0].shape
            graph.insert_before(node, total)
            replace_output(node.outputs[0], total.outputs[0])
            graph.remove(node, safe=True)
            count += 1
        fused = {"residual_sum": count} if count else {}
        return TransformerFusionResult(model, bool(count), fused=fused)
