"""`slimgraph.prune`: head and channel pruning of a copy of a model, at a ratio or toward a MAC
target.

The transformations are `PrunePass` (`slimgraph.passes.prune`) and head removal
(`slimgraph.passes.transformer.heads`, heads first on the same prepared copy). Here: the options
(`PruneOptions`: the pass's, a head ratio, a MAC target instead of a ratio, and the accuracy
budget), the budget check, and the
MAC target: per channel group, the loss (1 - output cosine, plus the accuracy drop with labels)
and the MACs saved at each ratio of a grid, measured with only that group pruned (`PruneUnits`);
then greedily the step with the least loss per MAC saved until the pruned model (counted, not
estimated) reaches the target: non-uniform ratios, sensitive groups pruned least
(`allocate_prune_ratios`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir

from slimgraph.api._options import BudgetOptions, SpeedOptions, takes_options
from slimgraph.api.budget import Unit
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import ModelLike, as_model
from slimgraph.ir import analysis as ir_analysis
from slimgraph.passes.prune import (
    HEAD_CRITERIA,
    NoChannelRemovedError,
    PrunePass,
    PruneReport,
    PruneResult,
    mac_dims,
    prepare_for_pruning,
    prunable_units,
    total_macs,
)
from slimgraph.passes.prune import PruneOptions as PassOptions
from slimgraph.passes.transformer.heads import HeadPruning, fusing_first_prunes, remove_heads
from slimgraph.runtime.budget import DataLike, Evaluator, as_data
from slimgraph.runtime.compare import compare
from slimgraph.runtime.metrics import Evaluation, Metric
from slimgraph.runtime.speed_guard import channel_multiple

__all__ = [
    "PRUNE_GRID",
    "PruneOptions",
    "PruneUnits",
    "Allocation",
    "allocate_prune_ratios",
    "prune",
    "prune_with_report",
]

logger = logging.getLogger(__name__)

# Ratios each channel group is measured at when allocating toward a MAC target.
PRUNE_GRID = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MacTarget:
    """A MAC target instead of a ratio.

    Attributes:
        target_macs: the MACs to reach as a fraction of the model's (0.6: 0.6x); per-group
            ratios are then allocated from sensitivity on the budget's `data`
            (`allocate_prune_ratios`).
    """

    target_macs: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneOptions(BudgetOptions, SpeedOptions, MacTarget, PassOptions):
    """The keywords of `prune` and `prune_with_report`, in their order: `heads`, the pass's
    options (`slimgraph.passes.prune.PruneOptions`), `target_macs`, then the budget
    (`BudgetOptions`). `ratio` may be left out when `target_macs` or `layer_ratios` gives the
    ratios, or when only heads are pruned. Each is described on `prune`.

    Attributes:
        heads: the fraction of each attention block's heads (key/value groups under
            grouped-query attention) to remove before any channel pruning, in (0, 1);
            `criterion` ("l1" or "l2") scores them.

    Example:
        >>> PruneOptions(ratio=0.5, exclude=["fc*"]).exclude
        ('fc*',)
    """

    ratio: float | None = None
    heads: float | None = None
    round_to: int | Literal["auto"] | None = "auto"  # type: ignore[assignment]

    @property
    def rounding(self) -> int | None:
        """The multiple kept channel counts are rounded to: `round_to`, or with "auto" the one
        convolutions run fast at here (`runtime.speed_guard.channel_multiple`: 16 with AVX-512,
        else 8); None for unstructured pruning. A `target_macs` allocation measures and chooses
        the rounded counts too."""
        if self.unstructured:
            return None
        return channel_multiple() if self.round_to == "auto" else self.round_to

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

    def pass_options(self, **changes: object) -> PassOptions:
        """The pass's part (what `PrunePass` takes), with `changes` applied."""
        own = {field.name: getattr(self, field.name) for field in dataclasses.fields(PassOptions)}
        own["round_to"] = self.rounding
        return PassOptions(**{**own, **changes})  # type: ignore[arg-type]


# `prune`'s keywords: `heads` first, as its signature has shown them since head pruning came.
_ORDER = ("heads",)


@takes_options(PruneOptions, order=_ORDER)
def prune_with_report(
    model: ModelLike, *, options: PruneOptions
) -> tuple[ir.Model, PruneReport]:
    """Like `prune`, also returning the `PruneReport`.

    The report lists, with `heads`, every attention block's heads before and after and the kept
    heads (`report.heads[i].kept_heads`), and the blocks left alone with the reason
    (`report.heads_skipped`); every channel group (size, kept, why it could not shrink), every
    producing layer's output channels before and after with the kept channel indices
    (`report.layers[i].kept`, indices into the original channels), parameters before and after
    as pruning sees them (constants folded, a shared weight once; a note gives the input's
    stored count, `inspect`'s, when the input builds weights at run time), MACs
    before and after as `inspect` counts them (at `report.mac_dims`: the export's example sizes
    but the batch, else 1), with `data` the result's fidelity on it (`report.fidelity`), and
    notes.

    Args: as for `prune`.

    Returns:
        (pruned model, `PruneReport`).

    Raises: as for `prune`.

    Example:
        >>> pruned, report = prune_with_report(model, ratio=0.5)  # doctest: +SKIP
        >>> report.layers[0].kept  # doctest: +SKIP
        (0, 2, 3, 5)
    """
    pruned, report = _prune(model, options)
    report.speed = options.guard(as_model(model), pruned)
    return pruned, report


def _prune(model: ModelLike, options: PruneOptions) -> tuple[ir.Model, PruneReport]:
    """Heads first (when asked), then the channel pass once with the ratios `options` give (a
    MAC target is turned into per-group ratios first), and the result checked against the
    budget."""
    model = original = as_model(model)
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
        macs, uncounted = total_macs(model, dims)
        before = (ir_analysis.parameter_count(model), macs)  # as `inspect` counts the input
        model = prepare_for_pruning(model)  # a copy
        found = _remove_heads(model, options)
        if not options.channels:
            report = PruneReport(0.0, options.criterion, options.scope, options.pad, False)
            report.params_before, report.macs_before = before
            report.params_after = ir_analysis.parameter_count(model)
            report.macs_after, report.macs_uncounted[1] = total_macs(model, dims)
            report.macs_uncounted[0] = uncounted
            report.mac_dims = dims
            _add_heads(report, options, found)
            if judge is not None:
                report.evaluation = judge.check(model, what="the pruned model")
            _measure(report, original, model, options)
            return model, report
    pruned, report = _prune_channels(model, options)
    if found is not None:
        report.params_before, report.macs_before = before
        report.macs_uncounted[0] = uncounted
        _add_heads(report, options, found)
    if judge is not None:
        report.evaluation = judge.check(pruned, what="the pruned model")
    _measure(report, original, pruned, options)
    return pruned, report


def _measure(report: PruneReport, model: ir.Model, pruned: ir.Model,
             options: PruneOptions) -> None:
    """With `data`, the result's fidelity to `model` on all of it (both models' accuracy with
    labels): what `quantize --data` and `factorize --data` report, by the same comparison."""
    if options.data is not None:
        report.fidelity = compare(model, pruned, as_data(options.data, model))


def _remove_heads(prepared: ir.Model, options: PruneOptions) -> HeadPruning:
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
        hint = ""
        if fusing_first_prunes(prepared, options.heads, criterion=options.criterion):
            hint = "; fused attention can: fuse first ({fuse}), then prune heads"
        raise UnsupportedModelError.worded(
            "{what}: no attention block could lose a head ({reasons}{more})" + hint, what=what,
            reasons=reasons, more=more,
            fuse=('sg.optimize(model, preset="transformer")',
                  "slimgraph optimize MODEL --preset transformer"))
    largest = max(found.blocks, key=lambda b: b.kv_heads)
    if largest.kv_heads <= 1:
        if any(b.heads > 1 for b in found.blocks):
            raise UnsupportedModelError.worded(
                "{what}: every attention block has one key/value head shared by all its query "
                "heads (multi-query attention): head pruning removes whole key/value groups, "
                "and the one group must stay", what=what)
        raise UnsupportedModelError.worded(
            "{what}: every attention block has one head, which must stay", what=what)
    unit = "heads" if largest.kv_heads == largest.heads else "key/value groups"
    raise BadOptionError.worded(
        "{what} removes no head (the largest block has {n} {unit}, one must stay); nothing "
        "written: use a larger {heads}", what=what, n=str(largest.kv_heads), unit=unit,
        heads=("heads", "--heads"))


def _add_heads(report: PruneReport, options: PruneOptions, found: HeadPruning) -> None:
    report.heads_ratio = options.heads
    report.heads = list(found.blocks)
    report.heads_skipped = list(found.skipped)


def _prune_channels(model: ir.Model, options: PruneOptions) -> tuple[ir.Model, PruneReport]:
    """The channel pass once on `model` with the ratios `options` give (a MAC target is turned
    into per-group ratios first)."""
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
        layer_ratios, rounding = _allocate(model, options)
        return _pass_with(model, options, layer_ratios, rounding)
    return _pass_with(model, options, layer_ratios, options.rounding)


def _allocate(model: ir.Model, options: PruneOptions) -> tuple[dict[str, float], int | None]:
    """Per-group ratios toward `options.target_macs` whose kept counts are rounded as
    `options.rounding` says, and that rounding; with `round_to="auto"`, when the rounded counts
    cannot reach the target (a small model), the allocation of unrounded counts (rounding
    None)."""
    assert options.target_macs is not None and options.data is not None
    rounding = options.rounding
    measured = PassOptions(
        ratio=None, criterion=options.criterion, round_to=rounding, pad=options.pad,
        exclude=options.exclude, exclude_ops=options.exclude_ops, seed=options.seed,
    )
    try:
        allocation = allocate_prune_ratios(model, options.data, options.target_macs,
                                           metric=options.metric, options=measured)
    except (UnsupportedModelError, BadOptionError):
        if options.round_to != "auto" or rounding in (None, 1):
            raise
        allocation = allocate_prune_ratios(
            model, options.data, options.target_macs, metric=options.metric,
            options=dataclasses.replace(measured, round_to=None))
        rounding = None
    return allocation.ratios, rounding


def _pass_with(model: ir.Model, options: PruneOptions, layer_ratios: Mapping[str, float] | None,
               rounding: int | None) -> tuple[ir.Model, PruneReport]:
    """The channel pass on `model` at `layer_ratios` (or the ratio) rounded to `rounding`,
    with the note on the rounding "auto" chose."""
    ratios = None if layer_ratios is None else dict(layer_ratios)

    def run(round_to: int | None, note: str | None = None) -> tuple[ir.Model, PruneReport]:
        result = PrunePass(options.pass_options(layer_ratios=ratios, round_to=round_to))(model)
        assert isinstance(result, PruneResult) and result.report is not None
        if note is not None:
            result.report.notes.append(note)
        return result.model, result.report

    unrounded = f"kept channel counts not rounded to a multiple of {options.rounding}: rounded, "
    if options.target_macs is not None and rounding is None and options.rounding not in (None,
                                                                                         1):
        # the allocation fell back to the counts as measured: rounded, the target is out of reach
        return run(None, f"{unrounded}the groups cannot reach {options.target_macs:g}x the MACs")
    try:
        pruned, report = run(rounding)
    except BadOptionError:
        if options.round_to != "auto":
            raise
        # rounded to the fast multiple, every group would keep all its channels (groups of a
        # small model): the counts as asked instead, as with round_to=1
        return run(None, f"{unrounded}no group would lose a channel")
    if options.round_to == "auto" and options.rounding not in (None, 1) and report.channels:
        report.notes.append(
            f"kept channel counts rounded to a multiple of {options.rounding} (onnxruntime's "
            "fast channel block on this CPU; round_to=1 / --round-to 1 keeps them as asked)")
    return pruned, report


@takes_options(PruneOptions, order=_ORDER)
def prune(model: ModelLike, *, options: PruneOptions) -> ir.Model:
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
    does not shrink and onnxruntime runs it no faster. Takes its options as keywords or as
    `options=` a `PruneOptions`; keywords given with `options=` replace its fields.

    Args:
        model: an `onnx_ir.Model` or the path of an `.onnx` file.
        heads: fraction of each attention block's heads to remove, in (0, 1) (at least one
            stays; per block, rounded down); scored by `criterion` "l1" or "l2" over the head's
            Q/K/V columns and output rows. Given alone, only heads are pruned.
        ratio: fraction of channels (or weights, with `unstructured`) to remove, in (0, 1).
        criterion: "l1" | "l2" (norm of the producing weights summed over the group), "bn"
            (BatchNorm |gamma|), "random" (seeded by `seed`).
        scope: "local" (the same ratio in every group) or "global" (one threshold over scores
            normalized per group).
        round_to: keep a multiple of this many channels per group (at least this many; a
            group of fewer keeps all). "auto" (the default): the multiple onnxruntime's CPU
            convolutions run fast at here (16 with AVX-512, else 8; odd counts lose its blocked
            kernels and can make a pruned model slower than its input); when that rounding
            would leave every group whole, the counts are not rounded (a note says so). 1 or
            None: exactly the ratio's counts.
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
            (`allocate_prune_ratios`), among kept counts rounded as `round_to` says: the MACs
            land at or under the target.
        data: validation data (an .npz path, stacked arrays with optional labels, or
            `LabelledData`) for `target_macs` and the budget; `prune_with_report`'s
            `report.fidelity` is the result measured on all of it (as `quantize --data`).
        budget, max_drop, min_cosine: the accuracy budget (`runtime.budget`): a result that
            misses it raises `VerificationError`.
        metric: a user `Metric` instead of top-1 accuracy.
        speed_check, allow_slower, speed_batches: the speed guard (`SpeedOptions`; off by
            default in Python): time the result against `model` on onnxruntime at batch 1 and
            64 (or `speed_batches`) and raise `VerificationError` when it is slower beyond
            noise, unless `allow_slower`; `prune_with_report`'s `report.speed` holds the
            figures.
        options: a `PruneOptions` instead of (or under) the keywords.

    Returns:
        The pruned model. `prune_with_report` also returns what was removed.

    Raises:
        BadOptionError: an option is out of range, an `exclude` pattern matches nothing, a
            `prune_outputs` name is not a graph output, or the options remove no channel at all
            (for example a given `round_to` at least as large as every group) or no head
            (`heads` too small for every block), a budget without data.
        UnsupportedModelError: no channel group can shrink, or with `heads` no attention block
            is found or none can lose a head (the reasons are named).
        ModelLoadError: `model` is a path that cannot be loaded.
        VerificationError: the pruned model misses the budget (measured figure in the message),
            or runs slower than `model` with `speed_check` (the figures in the message).
        TypeError: an unknown keyword, or `options` that is not a `PruneOptions`.

    Example:
        >>> pruned = prune("model.onnx", ratio=0.5, round_to=8)  # doctest: +SKIP
        >>> pruned = prune("bert.onnx", heads=0.5, ratio=0.3)  # doctest: +SKIP
    """
    pruned = _prune(model, options)[0]
    options.guard(as_model(model), pruned)
    return pruned


class PruneUnits:
    """Structured pruning with a ratio per channel group (named by its first producer): the
    `Units` of sensitivity and of the MAC-target allocation.

    Args:
        model: the model (not modified).
        ratio: the ratio a unit is pruned at (`build`, `only`).
        options: the pass's options (criterion, round_to, pad, exclude, ...); ratios are set
            per call.

    Raises:
        BadOptionError: a ratio outside (0, 1).
    """

    method = "prune"

    def __init__(self, model: ir.Model, ratio: float, options: PassOptions) -> None:
        if not 0 < ratio < 1:
            raise BadOptionError(f"ratio must be strictly between 0 and 1, got {ratio}")
        self.model, self.ratio, self.options = model, ratio, options
        self._units = [Unit(*found) for found in prunable_units(
            model, pad=options.pad, exclude=options.exclude, exclude_ops=options.exclude_ops)]
        self.setting = f"channel ratio {ratio:g}"

    def units(self) -> list[Unit]:
        return list(self._units)

    def at(self, ratios: Mapping[str, float]) -> tuple[ir.Model, int, int]:
        """The model pruned at `ratios` (node -> ratio; others untouched), MACs before, after."""
        options = dataclasses.replace(self.options, ratio=None, layer_ratios=dict(ratios))
        result = PrunePass(options)(self.model)
        assert isinstance(result, PruneResult) and result.report is not None
        return result.model, result.report.macs_before, result.report.macs_after

    def build(self, skip: Sequence[str] = ()) -> ir.Model:
        return self.at({u.node: self.ratio for u in self._units if u.node not in skip})[0]

    def only(self, unit: Unit) -> tuple[ir.Model, int | None]:
        model, before, after = self.at({unit.node: self.ratio})
        return model, before - after


@dataclass(frozen=True)
class Allocation:
    """Per-group pruning ratios toward a MAC target.

    Attributes:
        ratios: channel group (first producer's node name) -> ratio; groups not listed keep all
            their channels.
        macs_ratio: MACs after / before of the model pruned at `ratios` (counted).
        target: the requested MAC ratio.
        loss: (group, ratio) -> loss measured with only that group pruned at that ratio.
    """

    ratios: dict[str, float]
    macs_ratio: float
    target: float
    loss: Mapping[tuple[str, float], float]


def allocate_prune_ratios(
    model: ir.Model,
    data: DataLike,
    target_macs: float,
    *,
    metric: Metric | None = None,
    grid: Sequence[float] = PRUNE_GRID,
    options: PassOptions | None = None,
) -> Allocation:
    """Non-uniform per-group ratios that reach `target_macs` (MACs after / before) with the least
    measured loss.

    Args:
        model: the model (not modified).
        data: validation data; the loss is 1 - output cosine plus the top-1 drop with labels
            (or the drop of `metric`).
        target_macs: the MAC ratio to reach, in (0, 1).
        grid: the ratios each group is measured at (only that group pruned); ratios whose
            kept counts round to the same one are one step.
        options: the pass's options (criterion, round_to, pad, exclude, exclude_ops, seed);
            the kept counts are measured and chosen rounded to `round_to`.

    Raises:
        BadOptionError: a target outside (0, 1), or a `round_to` that leaves every group whole.
        UnsupportedModelError: the groups cannot reach the target even at the largest ratio.
    """
    if not 0 < target_macs < 1:
        raise BadOptionError.worded("{macs} is a fraction of the model's MACs in (0, 1), got "
                                    "{value}", macs=("target_macs", "--target-macs"),
                                    value=f"{target_macs}")
    options = options or PassOptions(ratio=None)
    rounding = options.round_to if options.round_to and options.round_to > 1 else None
    labelled = as_data(data, model)
    scorer = Evaluator(model, labelled, metric=metric)
    units = PruneUnits(model, grid[0], options)
    if not units.units():
        raise UnsupportedModelError("nothing to prune: no channel group can shrink")
    loss: dict[tuple[str, float], float] = {}
    # per group, the grid ratios that save more MACs than the one before (with rounding, several
    # ratios keep the same count: measured once), as (ratio, loss, MACs saved)
    steps: dict[str, list[tuple[float, float, int]]] = {}
    total, largest = 0, 0
    for unit in units.units():
        found: list[tuple[float, ir.Model, int]] = []
        for ratio in reversed(grid):  # largest first: below a ratio that removes nothing, none do
            try:
                pruned, before, after = units.at({unit.node: ratio})
            except NoChannelRemovedError as error:  # rounded, this group keeps all at `ratio`
                largest = max(largest, error.largest)
                break
            total = before
            found.insert(0, (ratio, pruned, before - after))
        steps[unit.node] = []
        for ratio, pruned, macs_saved in found:
            if steps[unit.node] and macs_saved <= steps[unit.node][-1][2]:
                loss[unit.node, ratio] = steps[unit.node][-1][1]  # the same count as before
                continue
            loss[unit.node, ratio] = _loss(scorer, scorer(pruned))
            steps[unit.node].append((ratio, loss[unit.node, ratio], macs_saved))
    steps = {node: found for node, found in steps.items() if found}
    if not steps:
        raise BadOptionError.worded(
            "{macs} {rounded} removes no channel (the largest prunable group has {n}); nothing "
            "written: use a smaller {round_to}", macs=(f"target_macs={target_macs:g}",
                                                      f"--target-macs {target_macs:g}"),
            rounded=(f"with round_to={rounding}", f"--round-to {rounding}"), n=str(largest),
            round_to=("round_to", "--round-to"))
    levels = {node: -1 for node in steps}  # index into steps[node]; -1: not pruned

    def at(node: str, level: int) -> tuple[float, int]:
        return (0.0, 0) if level < 0 else steps[node][level][1:]

    def chosen() -> dict[str, float]:
        return {n: steps[n][lv][0] for n, lv in levels.items() if lv >= 0}

    while True:
        best = None
        for node, level in levels.items():
            if level + 1 >= len(steps[node]):
                continue
            (l0, s0), (l1, s1) = at(node, level), at(node, level + 1)
            cost = max(l1 - l0, 0.0) / (s1 - s0)
            if best is None or cost < best[0]:
                best = (cost, node)
        if best is None:
            break
        levels[best[1]] += 1
        predicted = sum(at(n, lv)[1] for n, lv in levels.items())
        if total and predicted >= (1 - target_macs) * total:
            _, before, after = units.at(chosen())  # savings interact: count, do not add
            if after <= target_macs * before:
                after = _back_off(units, levels, steps, target_macs, before, after)
                logger.info("allocated ratios %s: %.3fx MACs", chosen(), after / before)
                return Allocation(chosen(), after / before, target_macs, loss)
    _, before, after = units.at(chosen())
    how = "" if rounding is None else f" (kept counts rounded to a multiple of {rounding})"
    raise UnsupportedModelError.worded(
        "{macs} is out of reach: pruning every group at ratio {top}{how} leaves {left}x of the "
        "MACs" + ("" if rounding is None else "; use a smaller {round_to}"),
        macs=(f"target_macs={target_macs:g}", f"--target-macs {target_macs:g}"),
        top=f"{grid[-1]:g}", how=how, left=f"{after / before:.3f}",
        round_to=("round_to", "--round-to"))


def _back_off(units: PruneUnits, levels: dict[str, int],
              steps: Mapping[str, Sequence[tuple[float, float, int]]], target: float,
              before: int, after: int) -> int:
    """Undo steps past the target, the costliest last step first, while the counted MACs stay
    within it (a rounded step can save far more than the target still needed); `levels` is
    updated in place. Returns the MACs after."""
    def last_cost(node: str) -> float:
        level = levels[node]
        previous = 0.0 if level == 0 else steps[node][level - 1][1]
        return steps[node][level][1] - previous

    for node in sorted((n for n, lv in levels.items() if lv >= 0), key=last_cost, reverse=True):
        if after > target * before * 0.98:  # within 2% of the target: close enough
            break
        levels[node] -= 1
        ratios = {n: steps[n][lv][0] for n, lv in levels.items() if lv >= 0}
        if not ratios:
            levels[node] += 1
            break
        _, _, undone = units.at(ratios)
        if undone <= target * before:
            after = undone
        else:
            levels[node] += 1
    return after


def _loss(scorer: Evaluator, evaluation: Evaluation) -> float:
    """1 - cosine, plus the drop of the metric when there is one (labels or a user metric)."""
    value = 1.0 - (evaluation.cosine if evaluation.cosine is not None else 0.0)
    if evaluation.metric_name != "cosine":
        value += max(0.0, scorer.reference.metric - evaluation.metric)
    return value

