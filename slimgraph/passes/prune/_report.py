"""What `prune` did: per-group and per-layer records, the `PruneReport` and the pass result."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from slimgraph.ir.channels import ChannelAnalysis, ChannelGroup, Role, node_label
from slimgraph.passes.base import SlimgraphPassResult

if TYPE_CHECKING:
    from slimgraph.runtime.metrics import Evaluation

__all__ = [
    "UNSTRUCTURED_NOTE",
    "GroupReport",
    "LayerChannels",
    "LayerSparsity",
    "PruneReport",
    "PruneResult",
    "group_report",
    "producer_channels",
]

UNSTRUCTURED_NOTE = (
    "note: unstructured pruning only zeroes weights: they are still stored densely, so the file "
    "does not shrink and onnxruntime runs the model no faster (it has no sparse kernels); "
    "structured pruning (without --unstructured) removes channels and does both"
)


@dataclasses.dataclass(frozen=True)
class GroupReport:
    """One channel group: its size, what stays, and why it could not shrink (if so)."""

    id: int
    channels: int
    kept: int
    producers: tuple[str, ...]
    reason: str = ""
    padded: int = 0  # edges padded back to full size


@dataclasses.dataclass(frozen=True)
class LayerChannels:
    """Output channels of one producing layer before and after.

    `kept` lists the indices (into the layer's original output channels, ascending) that stay.
    """

    layer: str
    op_type: str
    before: int
    after: int
    kept: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """Unstructured pruning of one weight: elements and zeros after."""

    layer: str
    op_type: str
    elements: int
    zeros: int

    @property
    def sparsity(self) -> float:
        """Zeros / elements (0 for an empty weight)."""
        return self.zeros / self.elements if self.elements else 0.0


@dataclasses.dataclass
class PruneReport:
    """What `prune` did: groups, channels per layer, parameters and MACs before/after."""

    ratio: float
    criterion: str
    scope: str
    pad: bool
    unstructured: bool
    groups: list[GroupReport] = dataclasses.field(default_factory=list)
    layers: list[LayerChannels] = dataclasses.field(default_factory=list)
    sparsity: list[LayerSparsity] = dataclasses.field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    layer_ratios: dict[str, float] = dataclasses.field(default_factory=dict)
    evaluation: Evaluation | None = None  # on the budget's data, when a budget was given
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (sparsity per layer included)."""
        data = dataclasses.asdict(self)
        for row, layer in zip(data["sparsity"], self.sparsity, strict=True):
            row["sparsity"] = layer.sparsity
        data["evaluation"] = None if self.evaluation is None else self.evaluation.to_dict()
        return data


@dataclasses.dataclass
class PruneResult(SlimgraphPassResult):
    """`PassResult` plus the `PruneReport`."""

    report: PruneReport | None = None


def group_report(group: ChannelGroup, removed: int, padded: int) -> GroupReport:
    """The report row of `group` after `removed` of its channels went and `padded` of its
    edges were padded back."""
    return GroupReport(
        group.id, group.size, group.size - removed,
        tuple(dict.fromkeys(node_label(n) for n in group.producers)), _why_not(group), padded,
    )  # fmt: skip


def _why_not(group: ChannelGroup) -> str:
    """Why a group kept all its channels ('' when it was pruned)."""
    if group.prunable:
        return ""
    if group.reasons:
        return "; ".join(group.reasons)
    return "a single channel" if group.size <= 1 else "no prunable producer"


def producer_channels(analysis: ChannelAnalysis) -> dict[tuple[ir.Node, int], int]:
    """(producing node, slot id) -> output channels before pruning, in analysis order."""
    found = {}
    for use in analysis.weight_uses:
        if use.role is Role.PRODUCER:
            found[(use.node, use.slot)] = analysis.slots[use.slot].size
    return found
