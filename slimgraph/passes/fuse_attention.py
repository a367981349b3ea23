"""Moved: the transformer fusions live in `slimgraph.passes.transformer`; this module keeps
the old import path working."""

from __future__ import annotations

from slimgraph.passes.transformer import (
    MS_DOMAIN,
    AttentionMatch,
    FuseAttentionPass,
    FuseBiasGeluPass,
    FuseSkipLayerNormPass,
    PackAttentionPass,
    ResidualSumPass,
    TransformerFusionResult,
    has_residual_sums,
    match_attention,
)

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
