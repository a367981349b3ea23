"""Structured pruning that physically removes channels from the ONNX graph, and magnitude pruning.

Structured (approximate in general, exact for channels whose producing weights are zero):
1. prepare a copy (`_prepare`): common subexpressions merged (a shared weight transposed per use
   folds to one initializer), constants folded (weights built by ConstantOfShape, transposed
   weights, shape constants), initializers dropped from the graph inputs, shapes inferred, and
   shapes at fixed symbolic sizes recorded for the tracing;
2. trace channel-dependency groups (`slimgraph.passes.prune.channels`);
3. score each group channel (L1/L2 of the producing weights summed over the group, BatchNorm
   |gamma|, or random) and choose what to remove, per group (local) or with one threshold over
   normalized scores (global), keeping a multiple of `round_to` and at least one channel
   (`_select`);
4. slice the producers' weights and biases, BatchNorm and per-channel constants, the consumers'
   input channels, Reshape/Split/Slice/Resize constants and conv group counts; in pad mode scatter
   pruned tensors back to full size with zeros (Pad + constant-index Gather) where they meet a
   graph output or a consumer that must keep its channel count (seed 001) (`_surgery`);
5. re-infer shapes.

Heads (`heads=`, `_heads`: the `prune-heads` pass): whole attention heads removed first, on the
same prepared copy, by `slimgraph.passes.transformer.heads` (which knows where each head lives);
channels after when a ratio is given too.

Unstructured (`unstructured=True`, `_unstructured`): zero the smallest-magnitude weights of Conv,
ConvTranspose, Gemm and MatMul (per layer or one global threshold); shapes stay, a sparsity report
per layer. Options: `PruneOptions` (the pass), in `_options`; reports: `_report`; the pass:
`_pass`. The public verb is `slimgraph.prune` (`slimgraph.api.prune`).

Example:
    >>> result = PrunePass(ratio=0.5)(model)  # doctest: +SKIP
    >>> result.report.layers[0].kept  # doctest: +SKIP
    >>> heads = prune_heads(model, 0.5)  # doctest: +SKIP
"""

from __future__ import annotations

from slimgraph.passes.prune._heads import PruneHeadsPass, PruneHeadsResult, prune_heads
from slimgraph.passes.prune._options import CRITERIA, HEAD_CRITERIA, SCOPES, PruneOptions
from slimgraph.passes.prune._pass import (
    NoChannelRemovedError,
    PrunePass,
    mac_dims,
    prunable_units,
    total_macs,
)
from slimgraph.passes.prune._prepare import prepare_for_pruning
from slimgraph.passes.prune._report import (
    UNSTRUCTURED_NOTE,
    GroupReport,
    LayerChannels,
    LayerSparsity,
    PruneReport,
    PruneResult,
)
from slimgraph.passes.prune._select import (
    channel_scores,
    group_key,
    kept_count,
    select_channels,
)
from slimgraph.passes.prune._surgery import remove_channels

__all__ = [
    "CRITERIA",
    "HEAD_CRITERIA",
    "PruneHeadsPass",
    "PruneHeadsResult",
    "prune_heads",
    "SCOPES",
    "UNSTRUCTURED_NOTE",
    "GroupReport",
    "LayerChannels",
    "LayerSparsity",
    "PruneOptions",
    "PruneReport",
    "PruneResult",
    "PrunePass",
    "NoChannelRemovedError",
    "prepare_for_pruning",
    "channel_scores",
    "kept_count",
    "select_channels",
    "remove_channels",
    "group_key",
    "prunable_units",
    "mac_dims",
    "total_macs",
]
