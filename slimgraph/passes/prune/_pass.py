"""`PrunePass`: structured channel (or unstructured magnitude) pruning of a copy of the model.

The public `slimgraph.prune` (`slimgraph.api.prune`) runs it once; `prunable_units` names the
channel groups it can shrink (what per-group ratios and sensitivity tables name)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import analysis as ir_analysis
from slimgraph.ir import display_name
from slimgraph.ir._dims import mac_dims
from slimgraph.ir.select import node_names
from slimgraph.passes._graph_utils import opset_version
from slimgraph.passes.base import SlimgraphFunctionalPass
from slimgraph.passes.prune._options import PruneOptions
from slimgraph.passes.prune._prepare import prepare_for_pruning
from slimgraph.passes.prune._report import (
    UNSTRUCTURED_NOTE,
    LayerChannels,
    PruneReport,
    PruneResult,
    group_report,
    producer_channels,
)
from slimgraph.passes.prune._select import (
    excluded_predicate,
    group_key,
    group_ratios,
    select_channels,
)
from slimgraph.passes.prune._surgery import remove_channels
from slimgraph.passes.prune._unstructured import zero_smallest_weights
from slimgraph.passes.prune.channels import analyze_channels
from slimgraph.passes.registry import register_pass

__all__ = ["PrunePass", "NoChannelRemovedError", "prunable_units", "mac_dims", "total_macs"]


class NoChannelRemovedError(BadOptionError):
    """The options remove no channel from any group (a ratio too small for the rounding, or a
    `round_to` at least as large as every group); `largest` is the largest group's size."""

    def __init__(self, message: str, *, largest: int) -> None:
        super().__init__(message)
        self.largest = largest

logger = logging.getLogger(__name__)


@register_pass("prune", exact=False)
class PrunePass(SlimgraphFunctionalPass):
    """Structured channel pruning (or unstructured magnitude pruning) on a copy of the model.

    Approximate in general (`exact = False`); exact when the removed channels' producing weights
    are zero. Options as for `slimgraph.prune` (a `PruneOptions`, or its fields as keywords).

    Example:
        >>> result = PrunePass(ratio=0.5, round_to=8)(model)  # doctest: +SKIP
        >>> result.report.layers[0].after  # doctest: +SKIP
    """

    exact = False
    options_from: ClassVar[Callable[..., Any]] = PruneOptions  # the keywords `**fields` takes

    def __init__(self, options: PruneOptions | None = None, /, **fields: Any) -> None:
        super().__init__()
        self.options = options if options is not None else PruneOptions(**fields)

    def requires(self, model: ir.Model) -> None:
        self.options.check()

    def call(self, model: ir.Model) -> PruneResult:
        options = self.options
        report = PruneReport(options.base_ratio, options.criterion, options.scope, options.pad,
                             options.unstructured, layer_ratios=dict(options.layer_ratios or {}))
        # parameters as pruning sees them, before and after (constants folded, a shared weight
        # once: comparable, unlike the input's stored count when it builds weights at run time;
        # the notes below say so), MACs as `inspect` counts them on the input and on the result
        report.mac_dims = mac_dims(model)
        report.macs_before, report.macs_uncounted[0] = total_macs(model, report.mac_dims)
        pruned = prepare_for_pruning(model)
        report.params_before = ir_analysis.parameter_count(pruned)
        excluded = excluded_predicate(pruned.graph, options.exclude, options.exclude_ops)
        if options.unstructured:
            report.sparsity = zero_smallest_weights(
                pruned, options.base_ratio, options.scope, excluded
            )
            report.notes.append(UNSTRUCTURED_NOTE)
        else:
            _remove_channels(pruned, excluded, options, report)
        if (pruned.ir_version or 0) < 4:  # IR < 4: every initializer must be a graph input
            ir_common.AddInitializersToInputsPass()(pruned)
        report.params_after = ir_analysis.parameter_count(pruned)
        report.macs_after, report.macs_uncounted[1] = total_macs(pruned, report.mac_dims)
        stored = ir_analysis.parameter_count(model, constant_nodes=True)
        if report.params_after > stored:  # the ratio above would hide that the file grew
            report.notes.append(
                f"note: the result stores {report.params_after:,} parameters, the input "
                f"{stored:,}: the input builds weights at run time (ConstantOfShape, Expand, "
                "...), the result stores them as folded constants"
            )
        elif report.params_before > (inspected := ir_analysis.parameter_count(model)):
            report.notes.append(  # why `inspect` counts fewer in the input
                f"note: parameters counted with the weights the input builds at run time folded "
                f"({report.params_before:,}); the input file stores {inspected:,}, as inspect "
                "counts them"
            )
        return PruneResult(pruned, modified=True, report=report)


def total_macs(model: ir.Model, dims: dict[str, int]) -> tuple[int, int]:
    """The model's MACs as `inspect --dim NAME=SIZE` reports them for `dims` (others 1), and how
    many MAC-counting layers were left out because their shapes stayed unknown."""
    found, unknown = ir_analysis.macs_by_node(model, dims)
    return sum(found.values()), unknown


def _remove_channels(
    model: ir.Model,
    excluded: Callable[[ir.Node], bool],
    options: PruneOptions,
    report: PruneReport,
) -> None:
    """Structured pruning of the prepared `model` in place; fills `report` (groups, layers).

    Raises:
        UnsupportedModelError: no channel group can shrink (the first reasons are named).
        BadOptionError: the options remove no channel; a `layer_ratios` name is unknown.
    """
    analysis = analyze_channels(
        model.graph, excluded=excluded, pad=options.pad, opset=opset_version(model, default=13),
        prunable_outputs=options.prune_outputs,
    )  # fmt: skip
    groups = analysis.prunable_groups
    if not groups:
        reasons = sorted({r for g in analysis.groups for r in g.reasons})
        hint = f" ({'; '.join(reasons[:3])})" if reasons else ""
        raise UnsupportedModelError(f"nothing to prune: no channel group can shrink{hint}")
    removed = select_channels(
        analysis, ratio=options.base_ratio, criterion=options.criterion, scope=options.scope,
        round_to=options.round_to, seed=options.seed,
        ratios=group_ratios(groups, options.layer_ratios),
    )  # fmt: skip
    if options.layer_ratios:  # the report names groups by layer, as every other table does
        report.layer_ratios = {
            names[0]: options.layer_ratios[name] for group in groups
            for names in map(node_names, group.producers) for name in names
            if name in options.layer_ratios
        }  # fmt: skip
    removed_roots = {g.roots[i] for g in groups for i in removed[g.id].tolist()}
    if not removed_roots:
        largest = max(g.size for g in groups)
        round_to = options.round_to
        rounded = f" --round-to {round_to}" if round_to and round_to > 1 else ""
        if options.ratio is None and options.layer_ratios:  # per-group ratios, no --ratio
            raise NoChannelRemovedError(
                f"the per-layer ratios{rounded} remove no channel (the largest prunable group "
                f"has {largest}); nothing written: use larger ratios or a smaller --round-to",
                largest=largest,
            )
        raise NoChannelRemovedError(
            f"--ratio {options.base_ratio:g}{rounded} removes no channel (the largest prunable "
            f"group has {largest}); nothing written: use a larger --ratio or a smaller "
            "--round-to", largest=largest,
        )
    before = producer_channels(analysis)
    kept = remove_channels(model, analysis, removed_roots)
    for group in analysis.groups:
        padded = sum(1 for b in group.pads if b.slot in kept)
        report.groups.append(group_report(group, len(removed.get(group.id, ())), padded))
    logger.info(
        "pruned %d of %d channel groups (%d channels removed)",
        len(groups), len(analysis.groups), len(removed_roots),
    )  # fmt: skip
    for (node, slot_id), size in before.items():
        positions = kept[slot_id].tolist() if slot_id in kept else list(range(size))
        report.layers.append(
            LayerChannels(display_name(node), node.op_type, size, len(positions),
                          tuple(int(p) for p in positions))
        )  # fmt: skip


def prunable_units(
    model: ir.Model,
    *,
    pad: bool = False,
    exclude: Sequence[str] = (),
    exclude_ops: Sequence[str] = (),
    **_: object,
) -> list[tuple[str, str, str]]:
    """(node, layer, op type) of the first producer of each prunable channel group: the names
    `layer_ratios` and `--exclude` take, in graph order."""
    prepared = prepare_for_pruning(model)
    excluded = excluded_predicate(prepared.graph, exclude, exclude_ops)
    analysis = analyze_channels(
        prepared.graph, excluded=excluded, pad=pad, opset=opset_version(prepared, default=13)
    )
    units = []
    for group in analysis.prunable_groups:
        first = group.producers[0]
        units.append((group_key(group), display_name(first), first.op_type))
    return units
