"""Spending an accuracy budget where it costs least, over any family's compression units.

A family says what it compresses through `Units` (its own passes behind three calls):
`units()` lists what it compresses one by one (a quantized layer, a pruned channel group, a
factorized layer), `build(skip)` compresses every unit but those in `skip`, `only(unit)`
compresses that unit alone. From that:

- `table_of` measures each unit compressed alone on validation data, most sensitive first (the
  `SensitivityTable` behind `slimgraph sensitivity`): top-1 accuracy with labels (or the user's
  `Metric`), else the output cosine to the input model;
- `search_units` (as NNCF's `quantize_with_accuracy_control`): every unit compressed; when that
  misses the budget, the units ranked most sensitive first, then the fewest most sensitive units
  left uncompressed for the budget to hold, found by bisection (`search_kept`); the record
  (`BudgetSearch`) says which and why. The ranking is the family's cheap proxy when its `Units`
  has one (`proxy()`: quantization ranks layers by the calibration report's SQNR, one run of the
  data), so the search costs a few evaluations, not one per unit: the bisection starts where the
  proxy jumps most (`widest_gap`), and units whose proxies are too close to tell apart there
  are measured alone on a few rows and ordered by that (`rerank_uncertain`). Without a proxy
  the ranking is measured (`table_of`, one evaluation per unit).

Quantization keeps layers in float (fp32: onnxruntime's CPU provider has no faster fp16
MatMul/Conv), factorization keeps layers at full rank; pruning's MAC target allocates per-group
ratios from the same measurements (`slimgraph.api.prune`). A search that no choice can satisfy
raises `VerificationError` with the best figure it measured; `check_budget` is the one-shot check.
This module imports no family: each family's `Units` lives with its verb.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import onnx_ir as ir

from slimgraph._tables import (
    format_cosine,
    format_macs,
    format_metric,
    format_metric_change,
    render_table,
)
from slimgraph.errors import VerificationError
from slimgraph.runtime.budget import Budget, BudgetJudge, Evaluator
from slimgraph.runtime.metrics import Evaluation, LabelledData, Metric

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "Unit",
    "Units",
    "LayerSensitivity",
    "SensitivityTable",
    "table_of",
    "FloatLayer",
    "BudgetSearch",
    "search_kept",
    "proxy_table",
    "widest_gap",
    "rerank_uncertain",
    "search_units",
    "check_budget",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unit:
    """One thing a family compresses: the node `--exclude` selects, its torch layer, op type."""

    node: str
    layer: str
    op_type: str


class Units(Protocol):
    """A family's compression, unit by unit, on its own passes (see the module docstring).

    Attributes:
        method: the family's name in tables ("quantize", "prune", "factorize").
        setting: how each unit is compressed ("int8 static, minmax", "channel ratio 0.5").
    """

    method: str
    setting: str

    def units(self) -> Sequence[Unit]:
        """What the family compresses one by one, in graph order."""
        ...

    def build(self, skip: Sequence[str] = ()) -> ir.Model:
        """The model with every unit compressed but the nodes in `skip`."""
        ...

    def only(self, unit: Unit) -> tuple[ir.Model, int | None]:
        """The model with only `unit` compressed, and the MACs that saves (None: not counted)."""
        ...


# A `Units` may also have `proxy() -> dict[str, float]`: a cheap sensitivity per unit node
# (lower: more sensitive; for quantization the worst SQNR in dB the unit's tensors get), measured
# without one evaluation per unit. `search_units` ranks by it when present.
PROXY_MARGIN_DB = 1.0  # units whose proxies are this close are told apart by measurement
QUICK_ROWS = 4  # rows of the budget's data those measurements use (at least; an eighth)


@dataclass(frozen=True)
class LayerSensitivity:
    """The model's metric when only this layer is compressed.

    Attributes:
        node, layer, op_type: the layer (`node` is what `--exclude` takes).
        metric: accuracy (fraction), the user's metric, or the output cosine.
        change: metric - the input model's metric (negative: worse; for the cosine, cosine - 1).
        cosine: worst output cosine to the input model.
        macs_saved: MACs this compression saves (prune and factorize), else None.
    """

    node: str
    layer: str
    op_type: str
    metric: float
    change: float
    cosine: float | None
    macs_saved: int | None = None


@dataclass(frozen=True)
class SensitivityTable:
    """Per-layer sensitivity, most sensitive first."""

    method: str
    setting: str
    metric_name: str
    reference_metric: float
    samples: int
    rows: tuple[LayerSensitivity, ...]

    def most_sensitive(self, count: int) -> list[str]:
        """The nodes of the `count` most sensitive layers."""
        return [row.node for row in self.rows[:count]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "setting": self.setting, "metric": self.metric_name,
            "reference_metric": self.reference_metric, "samples": self.samples,
            "layers": [asdict(row) for row in self.rows],
        }

    def _cells(self) -> list[list[str]]:
        name = self.metric_name
        return [
            [r.layer or "-", r.node, r.op_type, format_metric(r.metric, name),
             format_metric_change(r.change, name), format_cosine(r.cosine),
             format_macs(r.macs_saved)]
            for r in self.rows
        ]

    def render(self) -> str:
        """A plain-text table (most sensitive first)."""
        name = self.metric_name
        head = (f"sensitivity to {self.method} ({self.setting}) on {self.samples} samples: "
                f"{name} of the input model {format_metric(self.reference_metric, name)}; "
                "one layer compressed at a time, most sensitive first")
        table = render_table(
            ["layer", "node (--exclude)", "op", self.metric_name, "change", "cosine",
             "MACs saved"], self._cells(), align="lllrrrr",
        )
        return f"{head}\n{table}"

    __str__ = render

    def __repr__(self) -> str:
        return (f"<SensitivityTable: {self.method} ({self.setting}), {len(self.rows)} layers, "
                f"{self.metric_name} {format_metric(self.reference_metric, self.metric_name)} "
                f"on {self.samples} samples>")

    def report(self) -> dict[str, Any]:
        """The dict `tools.report.write_report` takes: a summary, the table, a barh plot."""
        labels = [r.layer or r.node for r in self.rows]
        return {
            "title": f"Sensitivity to {self.method}",
            "summary": {"method": self.method, "setting": self.setting,
                        "metric": self.metric_name,
                        "input model": format_metric(self.reference_metric, self.metric_name),
                        "samples": self.samples, "layers": len(self.rows)},
            "tables": [{
                "title": "one layer compressed at a time, most sensitive first",
                "columns": ["layer", "node", "op", self.metric_name, "change", "cosine",
                            "MACs saved"],
                "rows": [[r.layer, *cells[1:]] for r, cells in zip(self.rows, self._cells(),
                                                                   strict=True)],
            }],
            "plots": [{
                "kind": "barh", "title": f"{self.metric_name} change per layer ({self.method})",
                "x_label": f"{self.metric_name} change", "y_label": "layer",
                "series": [{"name": self.method, "x": labels,
                            "y": [r.change for r in self.rows], "labels": labels}],
            }],
            **self.to_dict(),
        }


def table_of(units: Units, scorer: Evaluator) -> SensitivityTable:
    """Compress each unit alone, measure, and sort most sensitive first (largest loss of the
    metric, ties broken by the lower cosine)."""
    rows = []
    for unit in units.units():
        model, saved = units.only(unit)
        evaluation = scorer(model)
        rows.append(LayerSensitivity(
            unit.node, unit.layer, unit.op_type, evaluation.metric, scorer.change(evaluation),
            evaluation.cosine, saved,
        ))
        logger.info("%s %s: %s %.4f", units.method, unit.node, evaluation.metric_name,
                    evaluation.metric)
    rows.sort(key=lambda r: (r.change, r.cosine if r.cosine is not None else 1.0))
    return SensitivityTable(units.method, units.setting, scorer.reference.metric_name,
                            scorer.reference.metric, scorer.reference.samples, tuple(rows))


@dataclass(frozen=True)
class FloatLayer:
    """A layer left uncompressed by a budget search, and why (its sensitivity)."""

    node: str
    layer: str
    op_type: str
    metric_alone: float  # the metric with only this layer compressed (nan: ranked by proxy)
    change_alone: float  # that metric minus the input model's
    cosine_alone: float | None = None  # the output cosine with only this layer compressed
    proxy: float | None = None  # the ranking proxy (quantization: worst tensor SQNR, dB)

    def reason(self, metric_name: str) -> str:
        if self.proxy is not None and math.isnan(self.metric_alone):
            return (f"SQNR {self.proxy:.1f} dB on the calibration data: among the lowest, and "
                    "needed for the budget")
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
                 "metric_alone": None if math.isnan(k.metric_alone) else k.metric_alone,
                 "change_alone": None if math.isnan(k.change_alone) else k.change_alone,
                 "cosine_alone": k.cosine_alone, "proxy": k.proxy}
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
    first: int | None = None,
) -> tuple[ir.Model, Evaluation, int]:
    """The fewest most-sensitive layers to keep uncompressed (1..`most`) for the budget to hold,
    by bisection over k (the metric is close to monotone in k), trying k = `first` first when
    given (a likely boundary). Records every try in `search`.

    Raises:
        VerificationError: not even `most` kept layers meet the budget.
    """
    order = [row.node for row in table.rows]
    top = min(most, len(order))
    lo, hi = 1, top
    best: tuple[ir.Model, Evaluation, int] | None = None
    last: Evaluation | None = None
    probe, walked = first, 0  # from `first`, walk down one at a time twice, then bisect
    while lo <= hi:
        mid = probe if probe is not None and lo <= probe <= hi else (lo + hi) // 2
        probe = None
        model = build(order[:mid])
        evaluation = judge.evaluate(model)
        search.tried.append((mid, evaluation.metric, evaluation.cosine))
        last = evaluation
        if judge.holds(evaluation):
            best, hi = (model, evaluation, mid), mid - 1
            if first is not None and walked < 2:
                probe, walked = mid - 1, walked + 1
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


def proxy_table(units: Units, proxy: dict[str, float], judge: BudgetJudge) -> SensitivityTable:
    """The units ranked by `proxy` (lowest first: most sensitive), as a table whose metric
    columns are not measured (nan); units without a proxy figure last, in graph order."""
    order = sorted(units.units(), key=lambda u: proxy.get(u.node, math.inf))
    rows = tuple(LayerSensitivity(u.node, u.layer, u.op_type, math.nan, math.nan, None)
                 for u in order)
    reference = judge.reference
    return SensitivityTable(units.method, units.setting, reference.metric_name,
                            reference.metric, reference.samples, rows)


def widest_gap(order: Sequence[str], proxy: dict[str, float]) -> int | None:
    """The k (1 <= k < len(order)) where the proxy jumps most between the k-th unit and the
    next, in the more sensitive half of `order`: where the budget most likely flips."""
    figures = [proxy.get(node, math.inf) for node in order]
    gaps = [(figures[k] - figures[k - 1], k) for k in range(1, max(2, len(order) // 2 + 1))
            if k < len(order) and math.isfinite(figures[k])]
    return max(gaps)[1] if gaps else None


def rerank_uncertain(
    table: SensitivityTable, proxy: dict[str, float], units: Units, judge: BudgetJudge,
    boundary: int | None,
) -> SensitivityTable:
    """Where the proxy cannot tell units apart (proxies within `PROXY_MARGIN_DB` of the unit
    before the likely `boundary`), measure each alone on the first eighth of the budget's data
    (at least `QUICK_ROWS` rows) and order that block by the measured loss; the rest keeps the
    proxy order."""
    if boundary is None:
        return table
    rows = list(table.rows)
    pivot = proxy.get(rows[boundary - 1].node, math.inf)
    block = [i for i, row in enumerate(rows)
             if abs(proxy.get(row.node, math.inf) - pivot) <= PROXY_MARGIN_DB]
    if len(block) < 2:
        return table
    quick = judge.subset(max(QUICK_ROWS, judge.data.samples // 8))
    by_node = {unit.node: unit for unit in units.units()}
    measured = []
    for index in block:
        row = rows[index]
        evaluation = quick(units.only(by_node[row.node])[0])
        measured.append((quick.change(evaluation), evaluation.cosine or 1.0, index, row))
    measured.sort(key=lambda m: (m[0], m[1]))
    for index, (_, _, _, row) in zip(block, measured, strict=True):
        rows[index] = row
    logger.info("budget search: %d units near the proxy's boundary measured on %d rows",
                len(block), quick.data.samples)
    return replace(table, rows=tuple(rows))


def search_units(units: Units, judge: BudgetJudge, search: BudgetSearch) -> list[str]:
    """Every unit compressed; when that misses the budget, the units ranked (by the family's
    proxy when it has one, else the measured sensitivity table) and the fewest most-sensitive
    units kept uncompressed (`search_kept`; with a proxy, `rerank_uncertain` first). Fills `search`
    (its `candidate` is the model its `evaluation` measured).

    Returns:
        The nodes left uncompressed, as exact node names.

    Raises:
        VerificationError: no choice of units meets the budget.
    """
    candidate = units.build(())
    evaluation = judge.evaluate(candidate)
    search.tried.append((0, evaluation.metric, evaluation.cosine))
    ranked = getattr(units, "proxy", None)
    proxy: dict[str, float] | None = None if judge.holds(evaluation) or ranked is None else (
        ranked())
    if not judge.holds(evaluation) and proxy:
        table = proxy_table(units, proxy, judge)
        first = widest_gap([row.node for row in table.rows], proxy)
        table = rerank_uncertain(table, proxy, units, judge, first)
        search.table = table
        candidate, evaluation, count = search_kept(table, judge, units.build, search,
                                                   most=len(units.units()) - 1, first=first)
        kept = [row.node for row in table.rows[:count]]
        rows = {row.node: row for row in table.rows}
        search.kept = [FloatLayer(n, rows[n].layer, rows[n].op_type, math.nan, math.nan, None,
                                  proxy.get(n)) for n in kept]
    elif not judge.holds(evaluation):
        table = table_of(units, judge)
        search.table = table
        candidate, evaluation, count = search_kept(table, judge, units.build, search,
                                                   most=len(units.units()) - 1)
        search.kept = [FloatLayer(r.node, r.layer, r.op_type, r.metric, r.change, r.cosine)
                       for r in table.rows[:count]]
    search.evaluation, search.candidate = evaluation, candidate
    return [k.node for k in search.kept]


def check_budget(
    candidate: ir.Model | ort.InferenceSession,
    reference: ir.Model,
    data: LabelledData,
    *,
    max_drop: float | None = None,
    min_cosine: float | None = None,
    metric: Metric | None = None,
    what: str = "the result",
) -> Evaluation:
    """Measure `candidate` against `reference` on `data`; raise when it misses the budget.

    Returns:
        The candidate's `Evaluation` (accuracy or metric with the reference's for `drop`, cosine
        and SQNR against the reference).

    Raises:
        BadOptionError: no limit given, a limit out of range, or `max_drop` without labels.
        VerificationError: the candidate misses the budget (message has the measured figure).
    """
    budget = Budget(max_drop, min_cosine)
    return BudgetJudge(reference, data, budget, metric=metric).check(candidate, what=what)
