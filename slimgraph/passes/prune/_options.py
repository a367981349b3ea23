"""`PruneOptions`: what `PrunePass` takes, written once.

The public `slimgraph.PruneOptions` (`slimgraph.api.prune`) adds a MAC target instead of a ratio
and the accuracy budget."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from slimgraph.errors import BadOptionError
from slimgraph.passes.transformer.heads import CRITERIA as HEAD_CRITERIA

__all__ = ["CRITERIA", "HEAD_CRITERIA", "SCOPES", "PruneOptions"]

CRITERIA = ("l1", "l2", "bn", "random")
SCOPES = ("local", "global")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneOptions:
    """What to prune and how; see `slimgraph.prune` for each option.

    Sequences are stored as tuples and `layer_ratios` as a dict copy, so an options object can
    be shared and compared. `check()` raises on values out of range (the pass calls it in
    `requires`).

    Example:
        >>> PruneOptions(ratio=0.5, exclude=["fc*"]).exclude
        ('fc*',)
    """

    ratio: float | None
    criterion: str = "l1"
    scope: str = "local"
    round_to: int | None = None
    pad: bool = False
    exclude: Sequence[str] = ()
    exclude_ops: Sequence[str] = ()
    unstructured: bool = False
    prune_outputs: Sequence[str] = ()
    seed: int = 0
    layer_ratios: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        for name in ("exclude", "exclude_ops", "prune_outputs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.layer_ratios is not None:
            object.__setattr__(self, "layer_ratios", dict(self.layer_ratios))

    @property
    def base_ratio(self) -> float:
        """The ratio of every group not named in `layer_ratios` (0: keep all without a ratio)."""
        return 0.0 if self.ratio is None else self.ratio

    def check(self) -> None:
        """Raise on an option out of range.

        Raises:
            BadOptionError: ratio not in (0, 1) (per-layer ratios: [0, 1), structured local
                only), an unknown criterion or scope, a `round_to` that is not a positive int.
        """
        ratio = self.ratio
        if self.layer_ratios is not None:
            if self.unstructured or self.scope != "local":
                raise BadOptionError("per-layer ratios apply to structured, local pruning")
            bad = {k: v for k, v in self.layer_ratios.items() if not 0 <= v < 1}
            if bad or not 0 <= (ratio or 0.0) < 1:
                raise BadOptionError(f"per-layer ratios must be in [0, 1), got {bad or ratio}")
        elif isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise BadOptionError.worded("{ratio} must be strictly between 0 and 1, got "
                                        + repr(ratio), ratio=("ratio", "--ratio"))
        if self.criterion not in CRITERIA:
            raise BadOptionError(
                f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}"
            )
        if self.scope not in SCOPES:
            raise BadOptionError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise BadOptionError(f"round_to must be a positive integer, got {self.round_to!r}")
