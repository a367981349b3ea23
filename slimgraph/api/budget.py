"""Accuracy-aware compression: searches that spend an accuracy budget where it costs least.

- `quantize_with_budget` (automatic mixed precision, as NNCF's `quantize_with_accuracy_control`):
  quantize every layer; when the result misses the budget, rank the layers by sensitivity (the
  metric with only that layer quantized, `passes.sensitivity`) and keep the k most sensitive in
  float, k found by bisection (calibration done once and reused), then report which layers stayed
  float and why. Float layers stay fp32: on onnxruntime's CPU provider an fp16 MatMul/Conv is not
  faster than fp32 (no fp16 kernels; Cast nodes are added), so fp16 would only make the file
  smaller at the cost of speed (benchmarks/quantize.py prints the measured ratio).
- `allocate_prune_ratios`: per channel group, the loss (1 - output cosine, plus the accuracy drop
  with labels) and the MACs saved at each ratio of a grid, measured with only that group pruned;
  then greedily the step with the least loss per MAC saved until the pruned model (counted, not
  estimated) reaches the MAC target: non-uniform ratios, sensitive groups pruned least.
- `factorize_with_budget`: the rank rule on every layer; when the result misses the budget, the
  k most sensitive layers keep their full rank (bisection on k).

Each search ends with the budget checked on the model it returns; one that no choice can meet
raises `VerificationError` with the best figure measured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from slimgraph._tables import format_cosine, format_metric, format_metric_change
from slimgraph.api.sensitivity import (
    FactorizeUnits,
    PruneUnits,
    QuantizeUnits,
    SensitivityTable,
    table_of,
)
from slimgraph.errors import BadOptionError, UnsupportedModelError, VerificationError
from slimgraph.runtime.budget import BudgetJudge, DataLike, Evaluator, as_data
from slimgraph.runtime.metrics import Evaluation, Metric

__all__ = [
    "PRUNE_GRID",
    "FloatLayer",
    "BudgetSearch",
    "Allocation",
    "search_kept",
    "quantize_with_budget",
    "factorize_with_budget",
    "allocate_prune_ratios",
]

logger = logging.getLogger(__name__)

# Ratios each channel group is measured at when allocating toward a MAC target.
PRUNE_GRID = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)


@dataclass(frozen=True)
class FloatLayer:
    """A layer left uncompressed by a budget search, and why (its sensitivity)."""

    node: str
    layer: str
    op_type: str
    metric_alone: float  # the metric with only this layer compressed
    change_alone: float  # that metric minus the input model's
    cosine_alone: float | None = None  # the output cosine with only this layer compressed

    def reason(self, metric_name: str) -> str:
        cosine = ("" if self.cosine_alone is None
                  else f", output cosine {format_cosine(self.cosine_alone)}")
        return (f"{metric_name} {format_metric(self.metric_alone, metric_name)} "
                f"({format_metric_change(self.change_alone, metric_name)}){cosine} "
                "with only this layer compressed: among the most sensitive")


@dataclass
class BudgetSearch:
    """What a budget search did: the layers kept uncompressed, the evaluations it tried."""

    method: str
    budget: str
    evaluation: Evaluation | None = None
    kept: list[FloatLayer] = field(default_factory=list)
    tried: list[tuple[int, float, float | None]] = field(default_factory=list)  # (k, metric, cos)
    table: SensitivityTable | None = None
    candidate: ir.Model | None = None  # the model `evaluation` measured (not serialized)

    @property
    def kept_label(self) -> str:
        return "kept float" if "quantization" in self.method else "kept whole"

    def summary(self) -> str:
        """Lines for the terminal."""
        ev = self.evaluation
        if ev is None:
            return ""
        name = ev.metric_name
        lines = [f"accuracy budget ({self.budget}): held with {len(self.kept)} layer(s) left "
                 f"uncompressed by {self.method}"]
        for layer in self.kept:
            lines.append(f"  {self.kept_label}: {layer.node} [{layer.layer or '-'}] "
                         f"{layer.op_type}: {layer.reason(name)}")
        if self.tried:
            steps = ", ".join(
                f"{k} kept -> {format_metric(m, name)}" + (
                    "" if c is None else f" (cosine {format_cosine(c)})")
                for k, m, c in self.tried
            )
            lines.append(f"  search ({name}): {steps}")
        return "\n".join(lines)

    __str__ = summary

    def __repr__(self) -> str:
        return (f"<BudgetSearch: {self.method}, {self.budget}, {len(self.kept)} layer(s) "
                f"{self.kept_label}, {len(self.tried)} tried>")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "budget": self.budget,
            "evaluation": None if self.evaluation is None else self.evaluation.to_dict(),
            "kept_uncompressed": [
                {"node": k.node, "layer": k.layer, "op_type": k.op_type,
                 "metric_alone": k.metric_alone, "change_alone": k.change_alone,
                 "cosine_alone": k.cosine_alone}
                for k in self.kept
            ],
            "tried": [{"kept": k, "metric": m, "cosine": c} for k, m, c in self.tried],
        }


def search_kept(
    table: SensitivityTable,
    judge: BudgetJudge,
    build: Callable[[Sequence[str]], ir.Model],
    search: BudgetSearch,
    *,
    most: int,
) -> tuple[ir.Model, Evaluation, int]:
    """The fewest most-sensitive layers to keep uncompressed (1..`most`) for the budget to hold,
    by bisection over k (the metric is close to monotone in k). Records every try in `search`.

    Raises:
        VerificationError: not even `most` kept layers meet the budget.
    """
    order = [row.node for row in table.rows]
    top = min(most, len(order))
    lo, hi = 1, top
    best: tuple[ir.Model, Evaluation, int] | None = None
    last: Evaluation | None = None
    while lo <= hi:
        mid = (lo + hi) // 2
        model = build(order[:mid])
        evaluation = judge.evaluate(model)
        search.tried.append((mid, evaluation.metric, evaluation.cosine))
        last = evaluation
        if judge.holds(evaluation):
            best, hi = (model, evaluation, mid), mid - 1
        else:
            lo = mid + 1
    if best is None:
        missed = judge.misses(last) if last is not None else [("no candidate",) * 2]
        raise VerificationError.worded(
            "no mix meets the accuracy budget on {source}: even with the {top} most sensitive "
            "layer(s) left uncompressed by {method}: {missed}; nothing written",
            source=judge.data.source, top=str(top), method=search.method,
            missed=("; ".join(m[0] for m in missed), "; ".join(m[1] for m in missed)),
        )
    return best


def _kept_layers(table: SensitivityTable, count: int) -> list[FloatLayer]:
    return [FloatLayer(r.node, r.layer, r.op_type, r.metric, r.change, r.cosine)
            for r in table.rows[:count]]


def _search_units(units: QuantizeUnits | FactorizeUnits, judge: BudgetJudge,
                  search: BudgetSearch) -> list[str]:
    """The search both methods share: every unit compressed; when that misses the budget, the
    sensitivity table and the fewest most-sensitive units kept uncompressed (`search_kept`).
    Fills `search` (its `candidate` is the model its `evaluation` measured).

    Returns:
        The nodes left uncompressed, as exact node names.

    Raises:
        VerificationError: no choice of units meets the budget.
    """
    candidate = units.build(())
    evaluation = judge.evaluate(candidate)
    search.tried.append((0, evaluation.metric, evaluation.cosine))
    if not judge.holds(evaluation):
        table = table_of(units, judge)
        search.table = table
        candidate, evaluation, count = search_kept(table, judge, units.build, search,
                                                   most=len(units.units) - 1)
        search.kept = _kept_layers(table, count)
    search.evaluation, search.candidate = evaluation, candidate
    return [k.node for k in search.kept]


def quantize_with_budget(
    model: ir.Model, calibration: Any, judge: BudgetJudge, *, method: str = "minmax",
    **options: Any,
) -> tuple[list[str], BudgetSearch]:
    """The nodes static quantization must leave float for `judge`'s budget to hold.

    Args:
        model: the float model (not modified).
        calibration: calibration data, as `quantize` takes it.
        judge: the budget and the validation data.
        method: the calibration method (minmax, percentile, entropy, mse).
        options: the other `QuantizeUnits` keywords (per_channel, exclude, exclude_ops,
            include_ops, activation_dtype, batch_size, percentile).

    Returns:
        (float nodes, as exact `--exclude` names; the search record, whose `candidate` is the
        QDQ model its `evaluation` measured: `quantize_static(..., keep_float=nodes)` without
        the report makes the same model).

    Raises:
        VerificationError: no mix of float and int8 layers meets the budget.
    """
    units = QuantizeUnits(model, calibration, calib_method=method, **options)
    search = BudgetSearch("int8 quantization", judge.budget.describe())
    kept = _search_units(units, judge, search)
    if kept:
        logger.info("mixed precision: %d of %d layers float", len(kept), len(units.units))
    return kept, search


def factorize_with_budget(
    model: ir.Model, judge: BudgetJudge, **rule: Any
) -> tuple[list[str], BudgetSearch]:
    """The layers low-rank factorization must leave whole for the budget to hold.

    `rule` holds `factorize`'s options (rank rule, include/exclude, op types, ...).

    Returns:
        (nodes to leave whole, as exact node names; the search record).

    Raises:
        VerificationError: no choice of layers meets the budget.
    """
    units = FactorizeUnits(model, **rule)
    search = BudgetSearch("low-rank factorization", judge.budget.describe())
    return _search_units(units, judge, search), search


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
    **options: Any,
) -> Allocation:
    """Non-uniform per-group ratios that reach `target_macs` (MACs after / before) with the least
    measured loss.

    Args:
        model: the model (not modified).
        data: validation data; the loss is 1 - output cosine plus the top-1 drop with labels
            (or the drop of `metric`).
        target_macs: the MAC ratio to reach, in (0, 1).
        grid: the ratios each group is measured at (only that group pruned).
        options: `prune` options (criterion, round_to, pad, exclude, exclude_ops, seed).

    Raises:
        BadOptionError: a target outside (0, 1).
        UnsupportedModelError: the groups cannot reach the target even at the largest ratio.
    """
    if not 0 < target_macs < 1:
        raise BadOptionError.worded("{macs} is a fraction of the model's MACs in (0, 1), got "
                                    "{value}", macs=("target_macs", "--target-macs"),
                                    value=f"{target_macs}")
    labelled = as_data(data, model)
    scorer = Evaluator(model, labelled, metric=metric)
    units = PruneUnits(model, **options)
    if not units.units:
        raise UnsupportedModelError("nothing to prune: no channel group can shrink")
    loss: dict[tuple[str, float], float] = {}
    saved: dict[tuple[str, float], int] = {}
    total = 0
    for unit in units.units:
        for ratio in grid:
            pruned, before, after = units.build({unit.node: ratio})
            total = before
            loss[unit.node, ratio] = _loss(scorer, scorer(pruned))
            saved[unit.node, ratio] = before - after
    levels = {unit.node: -1 for unit in units.units}  # index into grid; -1: not pruned

    def at(node: str, level: int) -> tuple[float, int]:
        return (0.0, 0) if level < 0 else (loss[node, grid[level]], saved[node, grid[level]])

    ratios: dict[str, float] = {}
    while True:
        best = None
        for node, level in levels.items():
            if level + 1 >= len(grid):
                continue
            (l0, s0), (l1, s1) = at(node, level), at(node, level + 1)
            if s1 <= s0:
                continue
            cost = max(l1 - l0, 0.0) / (s1 - s0)
            if best is None or cost < best[0]:
                best = (cost, node)
        if best is None:
            break
        levels[best[1]] += 1
        ratios = {n: grid[lv] for n, lv in levels.items() if lv >= 0}
        predicted = sum(at(n, lv)[1] for n, lv in levels.items())
        if total and predicted >= (1 - target_macs) * total:
            _, before, after = units.build(ratios)  # savings interact: count, do not add
            if after <= target_macs * before:
                logger.info("allocated ratios %s: %.3fx MACs", ratios, after / before)
                return Allocation(ratios, after / before, target_macs, loss)
    _, before, after = units.build(ratios)
    raise UnsupportedModelError(
        f"--target-macs {target_macs:g} is out of reach: pruning every group at ratio "
        f"{grid[-1]:g} leaves {after / before:.3f}x of the MACs"
    )


def _loss(scorer: Evaluator, evaluation: Evaluation) -> float:
    """1 - cosine, plus the drop of the metric when there is one (labels or a user metric)."""
    value = 1.0 - (evaluation.cosine if evaluation.cosine is not None else 0.0)
    if evaluation.metric_name != "cosine":
        value += max(0.0, scorer.reference.metric - evaluation.metric)
    return value
