"""`FactorizeOptions`: what low-rank factorization splits and how, written once.

The factorization passes and `factorize_layers` read it; the public `slimgraph.FactorizeOptions`
(`slimgraph.api.factorize`) adds the accuracy budget."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from slimgraph.errors import BadOptionError
from slimgraph.passes.lowrank._rank import RankPolicy
from slimgraph.passes.lowrank._select import SUPPORTED_OPS, LayerFilter

__all__ = ["FactorizeOptions", "Feeds", "METHODS"]

METHODS = ("tucker", "cp", "svd")

Feeds = Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FactorizeOptions:
    """What `slimgraph.factorize` splits and how (see it for each keyword).

    Attributes:
        rank_ratio, energy, rank, error_budget: the rank rule (one of them, or "auto" with one).
        include, exclude: fnmatch patterns on layer or node names.
        op_types: which of Gemm, MatMul, Conv to factorize.
        feeds: sample inputs to measure fidelity.
        pointwise_convs: also split 1x1 convs by SVD.
        allow_growth: factorize even where the factors are larger than the weight.
        fold: fold constant weight subgraphs first (`PrepareWeightsPass`).
        method: how KxK convs are split: "tucker" (Tucker-2), "cp" (CP, `CPConv`) or "svd"
            (an SVD of the output-channel unfolding: KxK conv to k channels, then 1x1).
            Gemm/MatMul are split by SVD under every method.
        layer_ratios: a rank ratio per node name, replacing the rule for those layers (what a
            MAC target allocates; `allocate_ranks`).
    """

    rank_ratio: float | None = None
    energy: float | None = None
    rank: int | Literal["auto"] | None = None
    error_budget: float | None = None
    include: str | Iterable[str] | None = None
    exclude: str | Iterable[str] | None = None
    op_types: str | Sequence[str] = SUPPORTED_OPS
    feeds: Feeds | None = None
    pointwise_convs: bool = False
    allow_growth: bool = False
    fold: bool = True
    method: Literal["svd", "tucker", "cp"] = "tucker"
    layer_ratios: Mapping[str, float] | None = None

    def rule(self) -> dict[str, Any]:
        """The options that decide the factorized model (no feeds, no budget), as keywords."""
        return {
            name: getattr(self, name)
            for name in ("rank_ratio", "energy", "rank", "error_budget", "include", "exclude",
                         "op_types", "pointwise_convs", "allow_growth", "fold", "method",
                         "layer_ratios")
        }

    def check_method(self) -> None:
        """Raises BadOptionError: an unknown `method`."""
        if self.method not in METHODS:
            raise BadOptionError(
                f"method must be one of {', '.join(METHODS)}, got '{self.method}'"
            )

    def policy(self) -> RankPolicy:
        """The rank rule.

        Raises:
            BadOptionError: no rule or several, or a value out of range.
        """
        return RankPolicy(
            self.rank_ratio, self.energy, self.error_budget, self.rank, self.allow_growth
        )

    def layer_filter(self) -> LayerFilter:
        """Which layers are candidates.

        Raises:
            BadOptionError: an unsupported or empty `op_types`.
        """
        return LayerFilter.create(self.include, self.exclude, self.op_types)
