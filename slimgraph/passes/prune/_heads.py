"""`prune-heads`: attention-head pruning as a pass, on a copy prepared like channel pruning.

The mechanics (which columns each head owns, how head counts are restated, importance) live
with the attention matcher in `slimgraph.passes.transformer.heads`; this module prepares the
copy (`prepare_for_pruning`) and runs it, for pipelines and recipes (`prune-heads`) and for
`prune(heads=...)`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import onnx_ir as ir

from slimgraph.passes.base import SlimgraphFunctionalPass, SlimgraphPassResult
from slimgraph.passes.prune._prepare import prepare_for_pruning
from slimgraph.passes.registry import register_pass
from slimgraph.passes.transformer.heads import HeadReport, remove_heads

__all__ = ["PruneHeadsPass", "PruneHeadsResult", "prune_heads"]


@dataclasses.dataclass
class PruneHeadsResult(SlimgraphPassResult):
    """`PassResult` plus one `HeadReport` per attention block (`skipped`: the blocks left
    alone, with the reason)."""

    blocks: list[HeadReport] = dataclasses.field(default_factory=list)


@register_pass("prune-heads", exact=False)
class PruneHeadsPass(SlimgraphFunctionalPass):
    """Remove the least important `ratio` of the heads of every attention block
    (`slimgraph.passes.transformer.heads`); approximate, exact for dead heads.

    Args:
        ratio: fraction of each block's heads to remove, in [0, 1); at least one head stays.
        criterion: "l1" (default, as `prune --criterion`) or "l2" norm of the head's weights.
        dead_only: remove only heads that contribute nothing (exact), whatever the ratio.
    """

    exact: ClassVar[bool] = False

    def __init__(self, *, ratio: float = 0.5, criterion: str = "l1",
                 dead_only: bool = False) -> None:
        super().__init__()
        self.ratio, self.criterion, self.dead_only = ratio, criterion, dead_only

    def call(self, model: ir.Model) -> PruneHeadsResult:
        pruned = prepare_for_pruning(model)  # a copy
        found = remove_heads(pruned, self.ratio, criterion=self.criterion,
                             dead_only=self.dead_only)
        return PruneHeadsResult(pruned, bool(found.pruned), skipped=found.skipped,
                                blocks=found.blocks)


def prune_heads(model: ir.Model, ratio: float = 0.5, *, criterion: str = "l1",
                dead_only: bool = False) -> PruneHeadsResult:
    """Remove attention heads from a copy of `model`; see `PruneHeadsPass`.

    Raises:
        BadOptionError: `ratio` out of range or an unknown criterion.

    Example:
        >>> result = prune_heads(model, 0.5)  # doctest: +SKIP
        >>> [(b.heads, b.kept) for b in result.blocks]  # doctest: +SKIP
    """
    result = PruneHeadsPass(ratio=ratio, criterion=criterion, dead_only=dead_only)(model)
    assert isinstance(result, PruneHeadsResult)
    return result
