"""The `prune` options, written once: what the pass takes and what the public functions take.

`PruneOptions` is what `PrunePass` takes; `PruneCallOptions` what `prune` and
`prune_with_report` take: those, a MAC target instead of a ratio, and the accuracy budget."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from slimgraph.errors import BadOptionError
from slimgraph.passes._options import BudgetOptions
from slimgraph.passes.transformer.heads import CRITERIA as HEAD_CRITERIA

__all__ = ["CRITERIA", "HEAD_CRITERIA", "SCOPES", "PruneOptions", "MacTarget",
           "PruneCallOptions"]

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
            raise BadOptionError(f"ratio must be strictly between 0 and 1, got {ratio!r}")
        if self.criterion not in CRITERIA:
            raise BadOptionError(
                f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}"
            )
        if self.scope not in SCOPES:
            raise BadOptionError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise BadOptionError(f"round_to must be a positive integer, got {self.round_to!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MacTarget:
    """A MAC target instead of a ratio.

    Attributes:
        target_macs: the MACs to reach as a fraction of the model's (0.6: 0.6x); per-group
            ratios are then allocated from sensitivity on the budget's `data`
            (`slimgraph.passes.budgeted.allocate_prune_ratios`).
    """

    target_macs: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneCallOptions(BudgetOptions, MacTarget, PruneOptions):
    """The keywords of `prune` and `prune_with_report`, in their order: `ratio`, `heads`, the
    other `PruneOptions`, `target_macs`, then the budget (`BudgetOptions`). `ratio` may be
    left out when `target_macs` or `layer_ratios` gives the ratios, or when only heads are
    pruned.

    Attributes:
        heads: the fraction of each attention block's heads (key/value groups under
            grouped-query attention) to remove before any channel pruning, in (0, 1);
            `criterion` ("l1" or "l2") scores them.
    """

    ratio: float | None = None
    heads: float | None = None

    @property
    def channels(self) -> bool:
        """Whether channels are pruned too (a ratio, per-layer ratios or a MAC target)."""
        return self.ratio is not None or self.layer_ratios is not None or (
            self.target_macs is not None)

    def check_heads(self) -> None:
        """Raise on a head ratio out of range or a criterion that cannot score heads.

        Raises:
            BadOptionError: `heads` not in (0, 1), `criterion` not "l1" or "l2", or
                `unstructured` with `heads`.
        """
        heads = self.heads
        if isinstance(heads, bool) or not isinstance(heads, (int, float)) or not 0 < heads < 1:
            raise BadOptionError.worded("{heads} must be strictly between 0 and 1, got {got}",
                                        heads=("heads", "--heads"), got=repr(heads))
        if self.criterion not in HEAD_CRITERIA:
            raise BadOptionError.worded(
                "{criterion} does not score attention heads: use l1 or l2 with {heads}",
                criterion=(f"criterion={self.criterion!r}", f"--criterion {self.criterion}"),
                heads=("heads=", "--heads"))
        if self.unstructured:
            raise BadOptionError.worded("{heads} removes whole heads: it does not combine with "
                                        "{unstructured}", heads=("heads=", "--heads"),
                                        unstructured=("unstructured=True", "--unstructured"))

    def pass_options(self, **changes: object) -> PruneOptions:
        """The `PruneOptions` part (what `PrunePass` takes), with `changes` applied."""
        own = {field.name: getattr(self, field.name) for field in dataclasses.fields(PruneOptions)}
        return PruneOptions(**{**own, **changes})  # type: ignore[arg-type]
