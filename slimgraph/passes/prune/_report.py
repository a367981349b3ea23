"""What `prune` did: per-group and per-layer records, the `PruneReport` and the pass result."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from slimgraph._tables import format_count, render_table
from slimgraph.ir import display_name
from slimgraph.passes.base import Skipped, SlimgraphPassResult
from slimgraph.passes.prune.channels import ChannelAnalysis, ChannelGroup, Role
from slimgraph.passes.transformer.heads import HeadReport

if TYPE_CHECKING:
    from slimgraph.runtime.compare import Fidelity
    from slimgraph.runtime.metrics import Evaluation
    from slimgraph.runtime.speed_guard import SpeedCheck

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
    """What `prune` did: attention heads per block, channel groups, channels per layer,
    parameters and MACs before/after.

    `heads` lists every attention block head pruning could edit (heads before and after, the
    kept heads); `heads_skipped` the blocks it left alone, with the reason. `mac_dims`: the
    sizes of symbolic dimensions the MACs are counted at (the export's example sizes, the batch
    at 1; others 1), as `slimgraph inspect --dim NAME=SIZE` counts them; `params_before` and
    `params_after` are `inspect`'s parameter counts of the input and of the result. `fidelity`:
    the result against the input on the validation data (`prune(..., data=)`), as
    `quantize --data` reports it.
    """

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
    heads_ratio: float | None = None
    heads: list[HeadReport] = dataclasses.field(default_factory=list)
    heads_skipped: list[Skipped] = dataclasses.field(default_factory=list)
    mac_dims: dict[str, int] = dataclasses.field(default_factory=dict)
    # MAC-counting layers left out of macs_before / macs_after (shapes unknown after inference)
    macs_uncounted: list[int] = dataclasses.field(default_factory=lambda: [0, 0])
    speed: SpeedCheck | None = None  # the speed guard's figures (`prune(..., speed_check=True)`)
    fidelity: Fidelity | None = None  # the result against the input on `data`, when given

    @property
    def channels(self) -> bool:
        """Whether channels were pruned (or zeroed) too, not only heads."""
        return bool(self.groups or self.unstructured)

    def __str__(self) -> str:
        """The plain-text tables `slimgraph prune` prints (groups, channels per layer)."""
        at = ", ".join(f"{k}={v}" for k, v in self.mac_dims.items())
        lines = [
            f"parameters: {format_count(self.params_before)} -> "
            f"{format_count(self.params_after)} ({_ratio(self.params_after, self.params_before)})",
            f"MACs:       {format_count(self.macs_before)} -> "
            f"{format_count(self.macs_after)} ({_ratio(self.macs_after, self.macs_before)})"
            + (f" at {at}" if at else ""),
        ]
        if any(self.macs_uncounted):
            before, after = self.macs_uncounted
            lines.append(f"note: MACs leave out layers whose shapes stay unknown ({before} before, "
                         f"{after} after); the ratio compares different sets of layers")
        if self.layer_ratios:
            lines.append("ratios per group (first producer's layer): " + ", ".join(
                f"{name} {ratio:g}" for name, ratio in self.layer_ratios.items()))
        lines += self.notes
        if self.fidelity is not None:
            lines += self.fidelity.summary_lines()
        if self.heads_ratio is not None:
            lines += ["", *self._head_lines()]
        if not self.channels:
            return "\n".join(lines)
        if self.unstructured:
            rows = [[s.layer, s.op_type, s.elements, s.zeros, f"{s.sparsity:.1%}"]
                    for s in self.sparsity]  # fmt: skip
            lines += ["", render_table(["layer", "op", "weights", "zeros", "sparsity"], rows)]
            return "\n".join(lines)
        rows = []
        for g in self.groups:
            producers = ", ".join(g.producers[:3]) + (" ..." if len(g.producers) > 3 else "")
            reasons = g.reason.split("; ") if g.reason else []
            more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
            padded = f"padded at {g.padded} edge(s)" if g.padded else ""
            note = reasons[0] + more if reasons else padded
            rows.append([g.id, g.channels, g.kept, producers, note])
        lines += ["", "groups:", render_table(["id", "channels", "kept", "producers", "note"],
                                              rows, align="rrrll")]  # fmt: skip
        layer_rows = [[layer.layer, layer.op_type, layer.before, layer.after]
                      for layer in self.layers]  # fmt: skip
        lines += ["", "channels per layer:",
                  render_table(["layer", "op", "before", "after"], layer_rows)]  # fmt: skip
        return "\n".join(lines)

    def _head_lines(self) -> list[str]:
        kept = sum(b.kept for b in self.heads)
        total = sum(b.heads for b in self.heads)
        grouped = any(b.kv_heads != b.heads for b in self.heads)
        headers = ["block", "heads", "kept", "kept heads"] + (["key/value heads"] * grouped)
        rows = [[b.block, b.heads, b.kept, ",".join(map(str, b.kept_heads))]
                + ([f"{b.kv_heads} -> {b.kv_kept}"] * grouped) for b in self.heads]
        lines = [f"attention heads ({self.heads_ratio:g} per block, {self.criterion}): "
                 f"{total} -> {kept}",
                 render_table(headers, rows, align="lrrll"[: len(headers)])]
        lines += [f"not pruned: {s.node}: {s.reason}" for s in self.heads_skipped]
        return lines

    def __repr__(self) -> str:
        if not self.channels:
            return (f"<PruneReport: heads {self.heads_ratio:g}, MACs "
                    f"{_ratio(self.macs_after, self.macs_before)}, parameters "
                    f"{_ratio(self.params_after, self.params_before)}>")
        kind = "unstructured" if self.unstructured else f"{len(self.layers)} layers"
        return (f"<PruneReport: ratio {self.ratio:g}, {kind}, MACs "
                f"{_ratio(self.macs_after, self.macs_before)}, parameters "
                f"{_ratio(self.params_after, self.params_before)}>")

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (sparsity per layer included)."""
        fidelity, self.fidelity = self.fidelity, None  # its own dict, not asdict's
        try:
            data = dataclasses.asdict(self)
        finally:
            self.fidelity = fidelity
        data["fidelity"] = None if fidelity is None else fidelity.to_dict()
        for row, layer in zip(data["sparsity"], self.sparsity, strict=True):
            row["sparsity"] = layer.sparsity
        data["heads"] = [block.to_dict() for block in self.heads]
        data["evaluation"] = None if self.evaluation is None else self.evaluation.to_dict()
        return data


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.3f}x" if before else "-"


@dataclasses.dataclass
class PruneResult(SlimgraphPassResult):
    """`PassResult` plus the `PruneReport`."""

    report: PruneReport | None = None


def group_report(group: ChannelGroup, removed: int, padded: int) -> GroupReport:
    """The report row of `group` after `removed` of its channels went and `padded` of its
    edges were padded back."""
    return GroupReport(
        group.id, group.size, group.size - removed,
        tuple(dict.fromkeys(display_name(n) for n in group.producers)), _why_not(group), padded,
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
