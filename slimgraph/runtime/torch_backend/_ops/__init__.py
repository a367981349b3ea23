"""The op table: one torch kernel builder per ONNX op, keyed by (domain, op_type).

A builder receives the node, the opset version of its domain and the lowering context, reads the
node's attributes once (honouring the opset's semantics: axes as attribute or input, Softmax's
2-D coercion before opset 13, ...) and returns a kernel: a function of the module (for
`training`, and `value(name)` for constants such as a weight's scale) and the node's input
tensors (None for a missing optional input) that returns the node's output tensors. Semantics
follow the ONNX operator specification (onnx.ai/onnx/operators) and, where the specification
leaves room, onnxruntime's CPU kernels; the `com.microsoft` ops follow onnxruntime's contrib op
specifications (docs/ContribOperators.md) and its CPU kernels.

One registry (`_registry.op`), the kernels grouped by kind:

| module | ops |
| --- | --- |
| `_math` | element-wise ops, activations (Gelu, BiasGelu, FastGelu, ...), MatMul, Gemm, Einsum |
| `_shape` | Shape, Reshape, Slice, Split, Pad, Concat, ..., the sequence ops |
| `_index` | Gather, GatherND, ScatterND, OneHot, TopK, CumSum, Trilu, ... |
| `_nn` | reductions, Softmax, the normalizations (Layer, Group, RMS, Skip...) |
| `_conv` | Conv, ConvTranspose, pooling, Resize |
| `_quant` | QuantizeLinear, DequantizeLinear and the dynamic int8 ops |
| `_attention` | MultiHeadAttention, Attention, QAttention, GroupQueryAttention, RotaryEmbedding |

This package imports torch; it is only imported by `_lower` (lazily).
"""

from __future__ import annotations

# The kernel modules register their builders when imported (each through `_registry.op`).
from slimgraph.runtime.torch_backend._ops import (  # noqa: F401
    _attention,
    _conv,
    _index,
    _math,
    _nn,
    _quant,
    _shape,
)
from slimgraph.runtime.torch_backend._ops._quant import (
    dequantize_values,
    fake_quantize,
    q_dtype,
    quantize_values,
)
from slimgraph.runtime.torch_backend._ops._registry import (
    MS_DOMAIN,
    QOPERATOR_OPS,
    TORCH_DTYPES,
    Builder,
    Kernel,
    LowerContext,
    QuantizedWeight,
    attr,
    known_ops,
    lookup,
    to_torch,
)
from slimgraph.runtime.torch_backend._ops._shape import SEQUENCE_PRODUCERS

__all__ = [
    "MS_DOMAIN",
    "Kernel",
    "Builder",
    "LowerContext",
    "QuantizedWeight",
    "lookup",
    "known_ops",
    "attr",
    "QOPERATOR_OPS",
    "SEQUENCE_PRODUCERS",
    "TORCH_DTYPES",
    "q_dtype",
    "quantize_values",
    "dequantize_values",
    "fake_quantize",
    "to_torch",
]
