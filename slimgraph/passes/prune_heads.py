"""Moved: head pruning is `slimgraph.passes.prune` (the pass) on the mechanics of
`slimgraph.passes.transformer.heads`; this module keeps the old import path working."""

from __future__ import annotations

from slimgraph.passes.prune import HEAD_CRITERIA as CRITERIA
from slimgraph.passes.prune import PruneHeadsPass, PruneHeadsResult, prune_heads
from slimgraph.passes.transformer.heads import HeadReport

__all__ = ["HeadReport", "PruneHeadsResult", "PruneHeadsPass", "prune_heads", "CRITERIA"]
