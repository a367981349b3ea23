"""Low-rank factorization: SVD split of Gemm/MatMul layers, Tucker-2 or CP of convolutions.

Approximate passes (`exact = False`): they report each layer's weight error and, with sample
feeds, the output SQNR. See docs/architecture.md ("Low-rank factorization") and seed 001 ("Low
Rank Matrix Factorization"). The public verb is `slimgraph.factorize` (`slimgraph.api.factorize`).
"""

from __future__ import annotations

from slimgraph.passes.lowrank._allocate import RANK_GRID, RankAllocation, allocate_ranks
from slimgraph.passes.lowrank._base import LayerReport, LowRankResult
from slimgraph.passes.lowrank._cp import CPConv, cp_als, exact_rank
from slimgraph.passes.lowrank._factorize import FactorizeReport, factorize_layers, fold_weights
from slimgraph.passes.lowrank._linear import LowRankLinear
from slimgraph.passes.lowrank._options import METHODS, FactorizeOptions
from slimgraph.passes.lowrank._rank import AUTO_MAX_MACS_RATIO, AUTO_MIN_SAVED_MACS, RankPolicy
from slimgraph.passes.lowrank._tucker import TuckerConv, tucker2

__all__ = [
    "LowRankLinear",
    "TuckerConv",
    "CPConv",
    "METHODS",
    "RANK_GRID",
    "RankAllocation",
    "allocate_ranks",
    "cp_als",
    "exact_rank",
    "LayerReport",
    "LowRankResult",
    "FactorizeOptions",
    "FactorizeReport",
    "RankPolicy",
    "AUTO_MAX_MACS_RATIO",
    "AUTO_MIN_SAVED_MACS",
    "factorize_layers",
    "fold_weights",
    "tucker2",
]
