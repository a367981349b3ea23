"""Per-layer sensitivity: the metric change when only one layer is compressed.

For each layer a method can compress (quantize: Conv/Gemm/MatMul with a constant weight; prune:
each channel group, named by its first producer; factorize: each Gemm/MatMul/Conv the rank rule
would split), the model is compressed at that layer alone and measured on validation data: top-1
accuracy with labels (or the user's `Metric`), else the output cosine to the input model. Rows
are sorted most sensitive first (largest loss of the metric, ties broken by the lower cosine) and
name the node `--exclude` selects. The searches of accuracy-aware quantization, pruning and
low-rank (`slimgraph.passes.budgeted`) start from this table.

Quantization calibrates once and re-plans per layer (the policy is a graph walk; the calibrated
ranges are reused), so a table costs one calibration plus one Q/DQ insertion and one evaluation
per layer.

Example:
    >>> table = sensitivity(model, "val.npz", method="quantize")  # doctest: +SKIP
    >>> print(table.render())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import onnx_ir as ir

from slimgraph._tables import (
    format_cosine,
    format_macs,
    format_metric,
    format_metric_change,
    render_table,
)
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import layer_name
from slimgraph.ir.select import exact_pattern
from slimgraph.runtime.budget import DataLike, as_data
from slimgraph.runtime.budget import Evaluator as Scorer
from slimgraph.runtime.metrics import DEFAULT_LABELS, Metric

__all__ = [
    "METHODS",
    "Unit",
    "LayerSensitivity",
    "SensitivityTable",
    "QuantizeUnits",
    "PruneUnits",
    "FactorizeUnits",
    "sensitivity",
]

logger = logging.getLogger(__name__)

METHODS = ("quantize", "prune", "factorize")


@dataclass(frozen=True)
class Unit:
    """One layer a method compresses: the node `--exclude` selects, its torch layer, op type."""

    node: str
    layer: str
    op_type: str


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

    def render(self) -> str:
        """A plain-text table (most sensitive first)."""
        name = self.metric_name
        rows = [
            [r.layer or "-", r.node, r.op_type, format_metric(r.metric, name),
             format_metric_change(r.change, name), format_cosine(r.cosine),
             format_macs(r.macs_saved)]
            for r in self.rows
        ]
        head = (f"sensitivity to {self.method} ({self.setting}) on {self.samples} samples: "
                f"{name} of the input model {format_metric(self.reference_metric, name)}; "
                "one layer compressed at a time, most sensitive first")
        table = render_table(
            ["layer", "node (--exclude)", "op", self.metric_name, "change", "cosine",
             "MACs saved"], rows, align="lllrrrr",
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
                "rows": [[r.layer, r.node, r.op_type, format_metric(r.metric, self.metric_name),
                          format_metric_change(r.change, self.metric_name),
                          format_cosine(r.cosine), format_macs(r.macs_saved)]
                         for r in self.rows],
            }],
            "plots": [{
                "kind": "barh", "title": f"{self.metric_name} change per layer ({self.method})",
                "x_label": f"{self.metric_name} change", "y_label": "layer",
                "series": [{"name": self.method, "x": labels,
                            "y": [r.change for r in self.rows], "labels": labels}],
            }],
            **self.to_dict(),
        }


# --- what each method compresses ------------------------------------------------------------


class QuantizeUnits:
    """Static quantization of any subset of layers, calibrated once (see `quantize_static`)."""

    method = "quantize"

    def __init__(
        self,
        model: ir.Model,
        calibration: Any,
        *,
        calib_method: str = "minmax",
        per_channel: bool = True,
        exclude: Sequence[str] = (),
        exclude_ops: Sequence[str] = (),
        include_ops: Sequence[str] = (),
        activation_dtype: str = "auto",
        batch_size: int = 32,
        percentile: float = 99.99,
    ) -> None:
        from slimgraph.passes.quantize.api import check_exclusions, prepare
        from slimgraph.passes.quantize.policy import WEIGHT_OPS
        from slimgraph.runtime.calibrate import calibrate, calibration_batches

        check_exclusions(model, exclude, exclude_ops)
        self.options = dict(per_channel=per_channel, exclude_ops=exclude_ops,
                            activation_dtype=activation_dtype, include_ops=include_ops)
        self.exclude = list(exclude)
        self.calib_method, self.percentile = calib_method, percentile
        self.batches = calibration_batches(model, calibration, batch_size=batch_size)
        self.prepared = prepare(model, self.batches.first())
        plan = self._plan(())
        names = [a.value for a in plan.activations]
        self.histogram = calib_method in ("percentile", "entropy", "mse")
        self.stats = calibrate(self.prepared, self.batches, names, histogram=self.histogram,
                               progress=False)
        by_name = {node.name: node for node in self.prepared.graph}
        self.units = [
            Unit(name, layer_name(by_name[name]), by_name[name].op_type)
            for name in plan.nodes if by_name[name].op_type in WEIGHT_OPS
        ]
        if not self.units:
            raise UnsupportedModelError("nothing to quantize: no Conv, Gemm or MatMul with a "
                                        "float32 constant weight")
        self.setting = f"int8 static, {calib_method}"

    def _plan(self, float_nodes: Iterable[str]):  # noqa: ANN202
        from slimgraph.passes.quantize.policy import annotate

        return annotate(self.prepared, exclude=[*self.exclude, *map(exact_pattern, float_nodes)],
                        **self.options)  # type: ignore[arg-type]

    def build(self, float_nodes: Iterable[str] = ()) -> ir.Model:
        """The model with every unit quantized except `float_nodes` (calibration reused)."""
        from slimgraph.passes.quantize.qdq import QDQPass, activation_params
        from slimgraph.runtime.calibrate import calibrate

        plan = self._plan(float_nodes)
        missing = [a.value for a in plan.activations if a.value not in self.stats]
        if missing:  # a value only quantized once a neighbour stays float (rare)
            self.stats.update(calibrate(self.prepared, self.batches, missing,
                                        histogram=self.histogram, progress=False))
        params = activation_params(plan, self.stats, self.calib_method,
                                   percentile=self.percentile)
        return QDQPass(plan, params)(self.prepared).model

    def only(self, unit: Unit) -> ir.Model:
        return self.build(u.node for u in self.units if u.node != unit.node)


class PruneUnits:
    """Structured pruning with a ratio per channel group (named by its first producer)."""

    method = "prune"

    def __init__(self, model: ir.Model, *, ratio: float = 0.5, **options: Any) -> None:
        from slimgraph.passes.prune import prunable_units

        if not 0 < ratio < 1:
            raise BadOptionError(f"ratio must be strictly between 0 and 1, got {ratio}")
        self.model, self.ratio, self.options = model, ratio, options
        self.units = [Unit(*found) for found in prunable_units(model, **options)]
        self.setting = f"channel ratio {ratio:g}"
        self.macs_before: int | None = None

    def build(self, ratios: Mapping[str, float]) -> tuple[ir.Model, int, int]:
        """The model pruned at `ratios` (node -> ratio; others untouched), MACs before, after."""
        from slimgraph.passes.prune import prune_with_report

        pruned, report = prune_with_report(self.model, layer_ratios=dict(ratios), **self.options)
        self.macs_before = report.macs_before
        return pruned, report.macs_before, report.macs_after

    def only(self, unit: Unit) -> ir.Model:
        model, before, after = self.build({unit.node: self.ratio})
        self.last_saved = before - after
        return model


class FactorizeUnits:
    """Low-rank factorization of any subset of the layers the rank rule would split."""

    method = "factorize"

    def __init__(self, model: ir.Model, **rule: Any) -> None:
        from slimgraph.passes.lowrank import factorize_with_report

        if not any(rule.get(key) is not None for key in ("rank_ratio", "energy", "rank",
                                                         "error_budget")):
            rule["rank_ratio"] = 0.25
        self.model, self.rule = model, rule
        _, report = factorize_with_report(model, **rule)
        self.units = [Unit(layer.node, layer.layer, layer.op_type) for layer in report.layers]
        if not self.units:
            raise UnsupportedModelError("nothing to factorize: no layer gets smaller at this rank")
        self.setting = ", ".join(f"{k} {v}" for k, v in rule.items()
                                 if v is not None and k in ("rank_ratio", "energy", "rank",
                                                            "error_budget"))

    def build(self, keep: Iterable[str] = ()) -> ir.Model:
        """The model factorized by the rule except the nodes in `keep` (left whole)."""
        from slimgraph.passes.lowrank import factorize_with_report

        kept = list(keep)
        exclude = [*(self.rule.get("exclude") or ()), *map(exact_pattern, kept)]
        if len(kept) >= len(self.units):
            return self.model
        return factorize_with_report(self.model, **{**self.rule, "exclude": exclude})[0]

    def only(self, unit: Unit) -> ir.Model:
        from slimgraph.passes.lowrank import factorize_with_report

        include = [exact_pattern(unit.node)]
        model, report = factorize_with_report(self.model, **{**self.rule, "include": include})
        before, after = report.macs_before, report.macs_after
        self.last_saved = None if before is None or after is None else before - after
        return model


def table_of(units: Any, scorer: Scorer) -> SensitivityTable:
    """Compress each unit alone, measure, and sort most sensitive first."""
    rows = []
    for unit in units.units:
        units.last_saved = None
        evaluation = scorer(units.only(unit))
        rows.append(LayerSensitivity(
            unit.node, unit.layer, unit.op_type, evaluation.metric, scorer.change(evaluation),
            evaluation.cosine, getattr(units, "last_saved", None),
        ))
        logger.info("%s %s: %s %.4f", units.method, unit.node, evaluation.metric_name,
                    evaluation.metric)
    rows.sort(key=lambda r: (r.change, r.cosine if r.cosine is not None else 1.0))
    return SensitivityTable(units.method, units.setting, scorer.reference.metric_name,
                            scorer.reference.metric, scorer.reference.samples, tuple(rows))


def sensitivity(
    model: ir.Model,
    data: DataLike,
    *,
    method: str = "quantize",
    calibration: Any = None,
    ratio: float = 0.5,
    rank_ratio: float = 0.25,
    exclude: Sequence[str] = (),
    metric: Metric | None = None,
    labels: str = DEFAULT_LABELS,
) -> SensitivityTable:
    """Per-layer sensitivity of `model` to one compression method, most sensitive first.

    Args:
        model: the float model (not modified).
        data: validation data (`LabelledData`, an .npz path or stacked arrays; a labels key makes
            the metric top-1 accuracy).
        method: "quantize" (static int8), "prune" (channels, at `ratio`) or "factorize" (at
            `rank_ratio`).
        calibration: quantize: calibration data (default: the inputs of `data`).
        ratio: prune: the fraction of each group's channels removed.
        rank_ratio: factorize: the rank ratio of each layer.
        exclude: layers left out of the table (fnmatch patterns, as `--exclude`).
        metric: a user `Metric` (higher is better) instead of accuracy or cosine.
        labels: the labels key of an .npz or mapping.

    Returns:
        `SensitivityTable` whose rows name the node `--exclude` acts on.

    Raises:
        BadOptionError: an unknown method, a ratio out of range, a pattern that matches nothing.
        UnsupportedModelError: nothing the method can compress.
    """
    if method not in METHODS:
        raise BadOptionError(f"unknown method '{method}' (choose {', '.join(METHODS)})")
    labelled = as_data(data, model, labels=labels)
    scorer = Scorer(model, labelled, metric=metric)
    units: Any
    if method == "quantize":
        units = QuantizeUnits(model, calibration if calibration is not None else labelled.feeds,
                              exclude=exclude)
    elif method == "prune":
        units = PruneUnits(model, ratio=ratio, exclude=exclude)
    else:
        units = FactorizeUnits(model, rank_ratio=rank_ratio, exclude=list(exclude) or None)
    return table_of(units, scorer)
