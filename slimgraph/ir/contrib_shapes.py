"""Shapes through onnxruntime's contrib ops, which onnx's shape inference does not know.

onnx's inference stops at a `com.microsoft` node: its outputs get no shape, and nor does anything
downstream. After a pass changes channel or head counts and clears the shapes, `infer_shapes`
runs onnx's inference, states the output shape of the contrib ops the transformer passes write
from their inputs' shapes, and runs it again, until nothing new is found (one round per fused
block in a chain of blocks).

The rules (onnxruntime's contrib op definitions, docs/ContribOperators.md):

- elementwise and normalization ops (SimplifiedLayerNormalization, in the default domain,
  BiasGelu, FastGelu, Gelu, QuickGelu, BiasAdd,
  RotaryEmbedding, SkipLayerNormalization and SkipSimplifiedLayerNormalization's output 0 and
  their input + skip sum): input 0's shape;
- MultiHeadAttention: [batch, sequence, value hidden], the hidden size read from the 3-D value
  ([B, L, Dv]), a 4-D value ([B, N, L, H]: N x H) or the packed 5-D query ([B, S, N, 3, H]);
- GroupQueryAttention: [batch, sequence, num_heads x head size], the head size from the query
  (separate, or packed as (num_heads + 2 x kv_num_heads) heads);
- Attention / QAttention (packed weight): [batch, sequence, value hidden], from
  `qkv_hidden_sizes` or a third of the weight's columns.

Present key/value outputs are left alone (their sequence is a sum of symbols).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

__all__ = ["MS_DOMAIN", "contrib_output_shape", "has_contrib_ops", "infer_shapes"]

Dim = int | ir.SymbolicDim

MS_DOMAIN = "com.microsoft"

_LIKE_INPUT = frozenset(
    {"BiasGelu", "FastGelu", "Gelu", "QuickGelu", "BiasAdd", "RotaryEmbedding"}
)
_SKIP_NORMS = frozenset({"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})
# onnxruntime's ops in the default domain that onnx does not define (RMS norm before opset 23)
_DEFAULT_DOMAIN = frozenset({"SimplifiedLayerNormalization"})


def _is_contrib(node: ir.Node) -> bool:
    return node.domain == MS_DOMAIN or (
        node.domain in ("", "ai.onnx") and node.op_type in _DEFAULT_DOMAIN
    )


def has_contrib_ops(model: ir.Model) -> bool:
    """Whether `model`'s main graph has ops whose shapes onnx's inference cannot state."""
    return any(_is_contrib(node) for node in model.graph)


def _dims(value: ir.Value | None) -> list[Dim] | None:
    if value is None or value.shape is None:
        return None
    return list(value.shape)


def _hidden(
    batch_seq: Sequence[Dim], heads: int | None, per_head: Dim | None
) -> list[Dim] | None:
    if heads is None or not isinstance(per_head, int):
        return None
    return [*batch_seq, heads * per_head]


def contrib_output_shape(node: ir.Node, index: int) -> list[Dim] | None:
    """The shape of output `index` of a `com.microsoft` node from its inputs' shapes, or None
    when the rules above do not state it (or the inputs' shapes are not known yet)."""
    op = node.op_type
    inputs = list(node.inputs)
    first = _dims(inputs[0]) if inputs else None
    if op in _DEFAULT_DOMAIN:  # output 0 like the input; mean and inverse deviation left alone
        return first if index == 0 else None
    if op in _LIKE_INPUT or (op in _SKIP_NORMS and index in (0, 3)):
        return first if index == 0 or op in _SKIP_NORMS else None
    if index != 0 or first is None or len(first) < 3:
        return None
    heads = node.attributes.get_int("num_heads", 0) or None
    if op == "MultiHeadAttention":
        value = _dims(inputs[2]) if len(inputs) > 2 else None
        if value is not None and len(value) == 3:
            return [first[0], first[1], value[2]]
        if value is not None and len(value) == 4:
            return _hidden(first[:2], heads, value[3])
        if len(first) == 5:  # packed [B, S, N, 3, H]
            return _hidden(first[:2], heads, first[4])
        return None
    if op == "GroupQueryAttention":
        packed = len(inputs) < 2 or inputs[1] is None
        kv_heads = node.attributes.get_int("kv_num_heads", 0)
        width = first[2]
        if heads is None or not isinstance(width, int):
            return None
        per_head = width // (heads + 2 * kv_heads) if packed else width // heads
        return _hidden(first[:2], heads, per_head)
    if op in ("Attention", "QAttention"):
        sizes = node.attributes.get_ints("qkv_hidden_sizes", None)
        if sizes:
            return [first[0], first[1], int(sizes[2])]
        weight = _dims(inputs[1]) if len(inputs) > 1 else None
        if weight is not None and len(weight) == 2 and isinstance(weight[1], int):
            return [first[0], first[1], weight[1] // 3]
    return None


def _better(rule: Sequence[Dim], current: ir.Shape | None) -> bool:
    """Whether the rule's shape says more than `current`: no shape yet, another rank, more
    sizes, or other sizes. Symbols are not compared: onnx names an unknown dimension anew on
    every inference (`unk__5`), which would restate the same shape forever."""
    if current is None or len(current) != len(rule):
        return True
    sizes = [d for d in rule if isinstance(d, int)]
    known = [d for d in current if isinstance(d, int)]
    if len(sizes) != len(known):
        return len(sizes) > len(known)
    pairs = zip(rule, current, strict=True)
    return any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in pairs)


def infer_shapes(model: ir.Model) -> None:
    """onnx's shape inference on `model`, continued through the contrib ops (module docstring).

    A contrib op's output shape is stated where the rule says more than the shape it has
    (`_better`); the values after it are then inferred again from scratch, since onnx keeps a
    symbol it made up before (`unk__1` for the batch after an op of unknown shape) over what it
    could infer now.
    """
    rounds = 2 + sum(_is_contrib(node) for node in model.graph)
    for _ in range(rounds):  # a chain of fused ops takes one round each at most
        ir_common.ShapeInferencePass(strict_mode=False)(model)
        stated = []
        for node in model.graph:
            if not _is_contrib(node):
                continue
            for index, out in enumerate(node.outputs):
                shape = contrib_output_shape(node, index)
                if shape is not None and _better(shape, out.shape):
                    out.shape = ir.Shape(shape)
                    if out.type is None and node.op_type != "QAttention" and node.inputs[0]:
                        out.type = node.inputs[0].type  # the others keep their input's dtype
                    stated.append(out)
        if not stated:
            return
        _forget_below(stated)
    ir_common.ShapeInferencePass(strict_mode=False)(model)


def _forget_below(values: list[ir.Value]) -> None:
    """Clear the shapes computed from `values` (not graph outputs, not contrib ops' own).

    A fully static shape stays: onnx makes up symbols, never sizes, so it is right, and it may
    have come from folding shape arithmetic that plain inference cannot repeat (a Reshape whose
    target is computed from the batch).
    """
    seen: set[int] = set()
    stack = list(values)
    while stack:
        value = stack.pop()
        for use in value.uses():
            node = use.node
            if id(node) in seen:
                continue
            seen.add(id(node))
            for out in node.outputs:
                if not _is_contrib(node) and not out.is_graph_output() and not _static(out):
                    out.shape = None
                stack.append(out)


def _static(value: ir.Value) -> bool:
    return value.shape is not None and all(isinstance(d, int) for d in value.shape)
