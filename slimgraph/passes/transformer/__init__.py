"""Transformer passes: one attention matcher, and what is built on it.

- `fuse-attention` (`attention`): attention blocks into onnxruntime's fused ops
  (MultiHeadAttention, GroupQueryAttention, RotaryEmbedding), exact;
- `pack-attention` (`packing`): Q/K/V projections into `com.microsoft.Attention` (QAttention
  after dynamic quantization), exact;
- `standard-attention` (`standard`): encoder MultiHeadAttention as the standard opset-23
  `Attention` (what dynamic quantization writes for it, faster than QAttention), exact;
- `fuse-bias-gelu`, `fuse-rms-norm`, `fuse-skip-layernorm`, `residual-sum` (`norms`), exact;
- `tanh-gelu` (`gelu`): GELU's erf form into its faster tanh form (FastGelu), approximate;
  dynamic int8 quantization applies it to transformers;
- head pruning (`heads`): whole attention heads (and key/value groups) removed, head counts
  restated (the `prune-heads` pass and `prune(heads=...)` run it from `slimgraph.passes.prune`);
- SmoothQuant's rewrite (`smoothing`): normalization outputs' outlier channels moved into the
  projections that read them (`slimgraph.passes.quantize.smoothquant` calibrates and searches).

The matcher (`match_attention`, `find_attention`, `AttentionMatch`) follows the data from each
Softmax to the projections and the head merge, whatever the exporter's spelling; its record
says which projection columns each head owns, so fusion and head pruning share it.
"""

from __future__ import annotations

from slimgraph.passes.transformer._emit import MS_DOMAIN
from slimgraph.passes.transformer._match import (
    AttentionMatch,
    BiasTerm,
    NoMatch,
    Operand,
    Rotary,
    find_attention,
    match_attention,
)
from slimgraph.passes.transformer.attention import (
    AttentionFusionResult,
    FuseAttentionPass,
    TransformerFusionResult,
    fusion_summary,
    has_fused_attention,
)
from slimgraph.passes.transformer.gelu import MAX_GELU_DIFFERENCE, TanhGeluPass
from slimgraph.passes.transformer.heads import (
    HeadPruning,
    HeadReport,
    head_scores,
    head_sites,
    remove_heads,
)
from slimgraph.passes.transformer.norms import (
    FuseBiasGeluPass,
    FuseRmsNormPass,
    FuseSkipLayerNormPass,
    ResidualSumPass,
    has_residual_sums,
)
from slimgraph.passes.transformer.packing import PackAttentionPass
from slimgraph.passes.transformer.standard import StandardAttentionPass

__all__ = [
    "MS_DOMAIN",
    "AttentionMatch",
    "BiasTerm",
    "NoMatch",
    "Operand",
    "Rotary",
    "find_attention",
    "match_attention",
    "AttentionFusionResult",
    "FuseAttentionPass",
    "TransformerFusionResult",
    "fusion_summary",
    "has_fused_attention",
    "MAX_GELU_DIFFERENCE",
    "TanhGeluPass",
    "HeadPruning",
    "HeadReport",
    "head_scores",
    "head_sites",
    "remove_heads",
    "FuseBiasGeluPass",
    "FuseRmsNormPass",
    "FuseSkipLayerNormPass",
    "ResidualSumPass",
    "has_residual_sums",
    "PackAttentionPass",
    "StandardAttentionPass",
]
