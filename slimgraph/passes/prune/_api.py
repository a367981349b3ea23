"""`PrunePass` and the public `prune` / `prune_with_report`: the pass run once on a copy."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import ModelLike, as_model, display_name
from slimgraph.ir import analysis as ir_analysis
from slimgraph.ir._dims import example_dims
from slimgraph.ir.select import node_names
from slimgraph.passes._graph_utils import opset_version
from slimgraph.passes._options import takes_options
from slimgraph.passes.base import SlimgraphFunctionalPass
from slimgraph.passes.prune._options import PruneCallOptions, PruneOptions
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
from slimgraph.passes.transformer.heads import HeadPruning, remove_heads

__all__ = ["PrunePass", "prunable_units", "prune", "prune_with_report"]

logger = logging.getLogger(__name__)


@register_pass("prune", exact=False)
class PrunePass(SlimgraphFunctionalPass):
    """Structured channel pruning (or unstructured magnitude pruning) on a copy of the model.

    Approximate in general (`exact = False`); exact when the removed channels' producing weights
    are zero. Options as for `prune` (a `PruneOptions`, or its fields as keywords).

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
        # parameters as pruning sees them (constants folded; a shared weight once), MACs as
        # `inspect` counts them on the input and on the result
        report.mac_dims = mac_dims(model)
        report.macs_before = _total_macs(model, report.mac_dims)
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
        report.macs_after = _total_macs(pruned, report.mac_dims)
        stored = ir_analysis.parameter_count(model, constant_nodes=True)
        if report.params_after > stored:  # the ratio above would hide that the file grew
            report.notes.append(
                f"note: the result stores {report.params_after:,} parameters, the input "
                f"{stored:,}: the input builds weights at run time (ConstantOfShape, Expand, "
                "...), the result stores them as folded constants"
            )
        return PruneResult(pruned, modified=True, report=report)


def mac_dims(model: ir.Model) -> dict[str, int]:
    """The sizes prune counts MACs at: the export's example sizes (`from_torch` records them)
    for symbolic dimensions other than the batch (a leading input axis), which counts as 1;
    empty (all 1) when none are recorded. A sequence of 1 would hide what attention costs, and
    an audio model's sample count of 1 gives its convolutions negative lengths."""
    batch = {str(value.shape[0]) for value in model.graph.inputs
             if value.shape is not None and len(value.shape) and not isinstance(value.shape[0],
                                                                               int)}
    return {name: size for name, size in example_dims(model).items() if name not in batch}


def _total_macs(model: ir.Model, dims: dict[str, int]) -> int:
    """The model's MACs as `inspect --dim NAME=SIZE` reports them for `dims` (others 1)."""
    return sum(ir_analysis.macs_by_node(model, dims)[0].values())


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
        how = f"--ratio {options.base_ratio:g}" + (
            f" --round-to {round_to}" if round_to and round_to > 1 else ""
        )
        raise BadOptionError(
            f"{how} removes no channel (the largest prunable group has {largest}); "
            "nothing written: use a larger --ratio or a smaller --round-to"
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


@takes_options(PruneCallOptions)
def prune_with_report(model: ModelLike, options: PruneCallOptions) -> tuple[ir.Model, PruneReport]:
    """Like `prune`, also returning the `PruneReport`.

    The report lists, with `heads`, every attention block's heads before and after and the kept
    heads (`report.heads[i].kept_heads`), and the blocks left alone with the reason
    (`report.heads_skipped`); every channel group (size, kept, why it could not shrink), every
    producing layer's output channels before and after with the kept channel indices
    (`report.layers[i].kept`, indices into the original channels), parameters before and after
    as pruning sees them (constants folded, a shared weight once; a note says so when the result
    stores more than the input did), MACs before and after as `inspect` counts them (at
    `report.mac_dims`: the export's example sizes but the batch, else 1) and notes.

    Args: as for `prune`.

    Returns:
        (pruned model, `PruneReport`).

    Raises: as for `prune`.

    Example:
        >>> pruned, report = prune_with_report(model, ratio=0.5)  # doctest: +SKIP
        >>> report.layers[0].kept  # doctest: +SKIP
        (0, 2, 3, 5)
    """
    return _prune(model, options)


def _prune(model: ModelLike, options: PruneCallOptions) -> tuple[ir.Model, PruneReport]:
    """Heads first (when asked), then the channel pass once with the ratios `options` give (a
    MAC target is turned into per-group ratios first), and the result checked against the
    budget."""
    model = as_model(model)
    ir_analysis.check_finite_weights(model)
    judge = options.judge(model)
    if options.heads is None and not options.channels:
        raise BadOptionError.worded("give a ratio ({ratio}), a MAC target ({macs}) or a head "
                                    "ratio ({heads})", ratio=("ratio=", "--ratio R"),
                                    macs=("target_macs=", "--target-macs R"),
                                    heads=("heads=", "--heads R"))
    found = None
    if options.heads is not None:
        options.check_heads()
        dims = mac_dims(model)
        macs = _total_macs(model, dims)
        model = prepare_for_pruning(model)  # a copy
        before = (ir_analysis.parameter_count(model), macs)
        found = _remove_heads(model, options)
        if not options.channels:
            report = PruneReport(0.0, options.criterion, options.scope, options.pad, False)
            report.params_before, report.macs_before = before
            report.params_after = ir_analysis.parameter_count(model)
            report.macs_after = _total_macs(model, dims)
            report.mac_dims = dims
            _add_heads(report, options, found)
            if judge is not None:
                report.evaluation = judge.check(model, what="the pruned model")
            return model, report
    pruned, report = _prune_channels(model, options)
    if found is not None:
        report.params_before, report.macs_before = before
        _add_heads(report, options, found)
    if judge is not None:
        report.evaluation = judge.check(pruned, what="the pruned model")
    return pruned, report


def _remove_heads(prepared: ir.Model, options: PruneCallOptions) -> HeadPruning:
    """Remove `options.heads` of every attention block's heads from `prepared`, in place.

    Raises:
        UnsupportedModelError: no attention block, or none head pruning can edit (the first
            reasons named).
        BadOptionError: the ratio removes no head from any block.
    """
    assert options.heads is not None
    found = remove_heads(prepared, options.heads, criterion=options.criterion)
    if found.pruned:
        return found
    what = (f"prune(heads={options.heads:g})", f"prune --heads {options.heads:g}")
    if not found.blocks and not found.skipped:
        raise UnsupportedModelError.worded("{what}: no attention block found", what=what)
    if not found.blocks:
        reasons = "; ".join(f"{s.node}: {s.reason}" for s in found.skipped[:2])
        more = f" (+{len(found.skipped) - 2} more)" if len(found.skipped) > 2 else ""
        raise UnsupportedModelError.worded(
            "{what}: no attention block could lose a head ({reasons}{more})", what=what,
            reasons=reasons, more=more)
    largest = max(found.blocks, key=lambda b: b.kv_heads)
    if largest.kv_heads <= 1:
        raise UnsupportedModelError.worded(
            "{what}: every attention block has one head (or one key/value group), which must "
            "stay", what=what)
    unit = "heads" if largest.kv_heads == largest.heads else "key/value groups"
    raise BadOptionError.worded(
        "{what} removes no head (the largest block has {n} {unit}, one must stay); nothing "
        "written: use a larger {heads}", what=what, n=str(largest.kv_heads), unit=unit,
        heads=("heads", "--heads"))


def _add_heads(report: PruneReport, options: PruneCallOptions, found: HeadPruning) -> None:
    report.heads_ratio = options.heads
    report.heads = list(found.blocks)
    report.heads_skipped = list(found.skipped)


def _prune_channels(model: ir.Model,
                    options: PruneCallOptions) -> tuple[ir.Model, PruneReport]:
    """The channel pass once on `model` with the ratios `options` give."""
    layer_ratios = options.layer_ratios
    if options.target_macs is not None:
        if options.ratio is not None or layer_ratios is not None:
            raise BadOptionError.worded("give {macs} or {ratio}, not both",
                                        macs=("target_macs=", "--target-macs"),
                                        ratio=("ratio=", "--ratio"))
        if options.data is None:
            raise BadOptionError.worded("{macs} needs {data} (per-layer sensitivity)",
                                        macs=("target_macs=", "--target-macs"),
                                        data=("data=", "--data VAL.npz"))
        from slimgraph.passes.budgeted import allocate_prune_ratios

        layer_ratios = allocate_prune_ratios(
            model, options.data, options.target_macs, metric=options.metric,
            criterion=options.criterion, round_to=options.round_to, pad=options.pad,
            exclude=options.exclude, exclude_ops=options.exclude_ops, seed=options.seed,
        ).ratios  # fmt: skip
    result = PrunePass(options.pass_options(layer_ratios=layer_ratios))(model)
    assert isinstance(result, PruneResult) and result.report is not None
    return result.model, result.report


@takes_options(PruneCallOptions)
def prune(model: ModelLike, options: PruneCallOptions) -> ir.Model:
    """Prune a copy of `model` (the input is untouched). Approximate.

    Heads (`heads`): the least important fraction of every attention block's heads goes first
    (whole key/value groups under grouped-query attention), with their Q/K/V columns, output
    projection rows and every head count the graph states (`slimgraph.passes.transformer.heads`);
    then channels, when a ratio or MAC target is given too.
    Structured (default): channels that must go together (coupled by residual adds, concats,
    depthwise convs, a flatten into a Gemm) form groups; each group's channels are scored and the
    least important removed physically: the producers' weights and biases, BatchNorm parameters,
    the next layers' input channels and Reshape/Split/Slice constants shrink. The channels of a
    graph output (class logits, embeddings) are never pruned unless named in `prune_outputs`.
    Method: structured pruning as in seed 001; dependency groups after Torch-Pruning (Fang et
    al., 2023), implemented on the ONNX graph. Unstructured: zeroes the smallest weights; the file
    does not shrink and onnxruntime runs it no faster.

    Args:
        model: an `onnx_ir.Model` or the path of an `.onnx` file.
        ratio: fraction of channels (or weights, with `unstructured`) to remove, in (0, 1).
        heads: fraction of each attention block's heads to remove, in (0, 1) (at least one
            stays; per block, rounded down); scored by `criterion` "l1" or "l2" over the head's
            Q/K/V columns and output rows. Given alone, only heads are pruned.
        criterion: "l1" | "l2" (norm of the producing weights summed over the group), "bn"
            (BatchNorm |gamma|), "random" (seeded by `seed`).
        scope: "local" (the same ratio in every group) or "global" (one threshold over scores
            normalized per group).
        round_to: keep a multiple of this many channels per group (at least this many).
        pad: scatter pruned tensors back to full size (zeros at the removed positions) where an
            inner consumer needs the full width (an excluded or unsupported op), so more groups
            can shrink. It never pads a graph output that is not in `prune_outputs`.
        exclude: fnmatch patterns of layer (torch module path) or node names to leave unchanged.
        exclude_ops: op types to leave unchanged.
        unstructured: zero the smallest weights instead of removing channels.
        prune_outputs: names of graph outputs whose channels may be pruned too (shrunk; padded
            back with zeros with `pad`).
        seed: seed of `criterion="random"`.

        layer_ratios: a ratio per channel group, by a producer's node or layer name (groups not
            named keep `ratio`, or all their channels without one); see `prunable_units`.
        target_macs: instead of a ratio, the MACs to reach as a fraction of the model's (0.6:
            0.6x); per-group ratios are allocated from sensitivity on `data`, least loss first
            (`slimgraph.passes.budgeted.allocate_prune_ratios`).
        data: validation data (an .npz path, stacked arrays with optional labels, or
            `LabelledData`) for `target_macs` and the budget.
        budget, max_drop, min_cosine: the accuracy budget (`runtime.budget`): a result that
            misses it raises `VerificationError`.
        metric: a user `Metric` instead of top-1 accuracy.

    Returns:
        The pruned model. `prune_with_report` also returns what was removed.

    Raises:
        BadOptionError: an option is out of range, an `exclude` pattern matches nothing, a
            `prune_outputs` name is not a graph output, or the options remove no channel at all
            (for example `round_to` at least as large as every group) or no head (`heads` too
            small for every block), a budget without data.
        UnsupportedModelError: no channel group can shrink, or with `heads` no attention block
            is found or none can lose a head (the reasons are named).
        ModelLoadError: `model` is a path that cannot be loaded.
        VerificationError: the pruned model misses the budget (measured figure in the message).

    Example:
        >>> pruned = prune("model.onnx", ratio=0.5, round_to=8)  # doctest: +SKIP
        >>> pruned = prune("bert.onnx", heads=0.5, ratio=0.3)  # doctest: +SKIP
    """
    return _prune(model, options)[0]
