"""Rank selection: how many singular values a layer keeps, and when factorizing pays.

Every rule works on the singular values `s` (sorted, largest first) of one matrix:
- `rank_ratio`: k = max(1, round(ratio * len(s))).
- `energy`: the smallest k with sum(s[:k]^2) >= energy * sum(s^2).
- `error_budget`: the smallest k whose dropped values give a relative Frobenius error
  sqrt(sum(s[k:]^2) / sum(s^2)) <= budget (Eckart-Young: the best rank-k error).
- `rank`: a fixed k (clipped to len(s)), or "auto" (see `RankPolicy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from slimgraph.errors import BadOptionError

__all__ = [
    "RankPolicy",
    "AUTO_MAX_MACS_RATIO",
    "AUTO_MIN_SAVED_MACS",
    "AUTO_RANK_MULTIPLE",
    "aligned_rank",
    "tail_energy",
]

# rank="auto" factorizes a layer only if its estimated MACs drop to at most this share of the
# original: two smaller products (and one more node) must win by a margin to be faster.
AUTO_MAX_MACS_RATIO = 0.8

# ... and only if at least this many MACs are saved per run: below it, the extra node's fixed
# cost (a few microseconds in onnxruntime) outweighs the arithmetic saved.
AUTO_MIN_SAVED_MACS = 200_000

# ... with ranks that are multiples of this: onnxruntime's blocked conv layout (NCHWc) and its
# GEMM packing work in blocks of 16 on AVX-512, and an odd rank is slower than the full layer
# (measured here: a 64->64 3x3 conv at 64x64 ran 1.8x slower at Tucker ranks 50/50, 0.7x at 48/48).
AUTO_RANK_MULTIPLE = 16


def aligned_rank(rank: float, limit: int, *, down: bool = False) -> int:
    """`rank` rounded to a multiple of `AUTO_RANK_MULTIPLE` (at least one multiple), at most
    `limit` (the full rank, which needs no alignment). `down=True` floors instead of rounding.
    """
    step = AUTO_RANK_MULTIPLE
    blocks = math.floor(rank / step) if down else math.floor(rank / step + 0.5)
    return min(limit, max(step, blocks * step))


def tail_energy(singular: np.ndarray) -> np.ndarray:
    """`tails[k] = sum(singular[k:]^2)` for k = 0..len, computed without cancellation."""
    squares = np.asarray(singular, dtype=np.float64) ** 2
    return np.concatenate([np.cumsum(squares[::-1])[::-1], [0.0]])


@dataclass(frozen=True)
class RankPolicy:
    """The rank rule for a factorization pass (exactly one of ratio, energy, budget or rank).

    `rank="auto"` may be combined with one of the other rules: each layer then gets that rule's
    rank rounded to a multiple of `AUTO_RANK_MULTIPLE`, and is factorized only where the estimated
    MACs fall to at most `AUTO_MAX_MACS_RATIO` of the original and at least `AUTO_MIN_SAVED_MACS`
    are saved (so the result is not slower). Alone, "auto" picks the largest aligned rank that
    passes the same test: the most accurate factorization that is still estimated to be faster.

    `allow_growth=True` factorizes even where the factors hold more parameters than the weight
    (used to check that full rank reproduces the model); by default such layers are skipped.
    """

    rank_ratio: float | None = None
    energy: float | None = None
    error_budget: float | None = None
    rank: int | Literal["auto"] | None = None
    allow_growth: bool = False

    def __post_init__(self) -> None:
        fixed = self.rank if not isinstance(self.rank, str) else None
        rules = {
            "rank_ratio": self.rank_ratio,
            "energy": self.energy,
            "error_budget": self.error_budget,
            "rank": fixed,
        }
        given = [name for name, value in rules.items() if value is not None]
        if len(given) > 1:
            raise BadOptionError(f"give only one of {', '.join(given)}")
        if isinstance(self.rank, str) and self.rank != "auto":
            raise BadOptionError(f"rank must be an integer >= 1 or 'auto', got '{self.rank}'")
        if not given and self.rank is None:
            raise BadOptionError("give one of rank_ratio, energy, error_budget or rank ('auto')")
        for name in ("rank_ratio", "energy"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise BadOptionError.worded(
                    "{name} must be in (0, 1], got " + str(value),
                    name=(name, "--" + name.replace("_", "-")))
        budget = self.error_budget
        if budget is not None and not (isinstance(budget, (int, float)) and 0 <= budget < 1):
            raise BadOptionError.worded("{name} must be in [0, 1), got " + str(budget),
                                        name=("error_budget", "--error-budget"))
        if fixed is not None and (isinstance(fixed, bool) or not isinstance(fixed, int)):
            raise BadOptionError(f"rank must be an integer >= 1 or 'auto', got {fixed!r}")
        if fixed is not None and fixed < 1:
            raise BadOptionError(f"rank must be an integer >= 1 or 'auto', got {fixed}")

    @property
    def auto(self) -> bool:
        return self.rank == "auto"

    @property
    def auto_only(self) -> bool:
        """True when "auto" alone decides the rank (no ratio, energy, budget)."""
        return self.auto and self.rank_ratio is None and self.energy is None and (
            self.error_budget is None
        )

    def keep(self, singular: np.ndarray, *, budget_share: float = 1.0) -> int:
        """The rank kept for singular values `singular` (descending), at least 1.

        `budget_share` scales the squared error budget (Tucker-2 splits it over two modes).
        Not for `auto_only` policies, whose rank depends on the layer's cost.
        """
        size = len(singular)
        if size == 0:
            return 0
        if self.rank_ratio is not None:
            return min(size, max(1, math.floor(self.rank_ratio * size + 0.5)))
        if isinstance(self.rank, int):
            return min(size, self.rank)
        tails = tail_energy(singular)
        total = tails[0]
        if total == 0:
            return 1
        if self.energy is not None:
            allowed = (1.0 - self.energy) * total
        elif self.error_budget is not None:
            allowed = self.error_budget**2 * budget_share * total
        else:
            raise BadOptionError("rank='auto' alone picks ranks from the layer's cost")
        # smallest k >= 1 with tails[k] <= allowed (tails is non-increasing)
        for k in range(1, size + 1):
            if tails[k] <= allowed * (1 + 1e-12):
                return k
        return size

    def describe(self) -> str:
        parts = []
        for name in ("rank_ratio", "energy", "error_budget"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name)}")
        if self.rank is not None:
            parts.append(f"rank={self.rank}")
        return ", ".join(parts)
