"""Moved: head pruning lives in `slimgraph.passes.transformer.heads`; this module keeps the
old import path working."""

from __future__ import annotations

from slimgraph.passes.transformer.heads import (
    CRITERIA,
    HeadReport,
    PruneHeadsPass,
    PruneHeadsResult,
    prune_heads,
)

__all__ = ["HeadReport", "PruneHeadsResult", "PruneHeadsPass", "prune_heads", "CRITERIA"]
