"""`slimgraph.sensitivity`: the metric change when only one layer is compressed.

For each layer a method can compress (quantize: Conv/Gemm/MatMul with a constant weight; prune:
each channel group, named by its first producer; factorize: each Gemm/MatMul/Conv the rank rule
would split), the model is compressed at that layer alone and measured on validation data
(`api.budget.table_of` over the family's `Units`): top-1 accuracy with labels (or the user's
`Metric`), else the output cosine to the input model. Rows are sorted most sensitive first and
name the node `--exclude` selects. The budget searches start from this table.

Quantization prepares and calibrates once (one `StaticSession`) and re-plans per layer, so a
table costs one calibration plus one Q/DQ insertion and one evaluation per layer.

Example:
    >>> table = sensitivity(model, "val.npz", method="quantize")  # doctest: +SKIP
    >>> print(table)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from slimgraph.api._options import takes_options
from slimgraph.api.budget import SensitivityTable, Units, table_of
from slimgraph.api.factorize import FactorizeUnits
from slimgraph.api.prune import PruneUnits
from slimgraph.api.quantize import QuantizeUnits
from slimgraph.errors import BadOptionError
from slimgraph.passes.lowrank import FactorizeOptions
from slimgraph.passes.prune import PruneOptions
from slimgraph.passes.quantize import QuantizeOptions, StaticSession
from slimgraph.runtime.budget import DataLike, Evaluator, as_data
from slimgraph.runtime.metrics import DEFAULT_LABELS, Metric

__all__ = ["METHODS", "SensitivityOptions", "sensitivity"]


@dataclass(frozen=True, kw_only=True)
class SensitivityOptions:
    """The keywords of `sensitivity` (each is described there).

    Example:
        >>> SensitivityOptions(method="prune", ratio=0.25).ratio
        0.25
    """

    method: str = "quantize"
    ratio: float = 0.5
    rank_ratio: float = 0.25
    exclude: Sequence[str] = ()
    metric: Metric | None = None
    labels: str = DEFAULT_LABELS


def _quantize_units(model: ir.Model, calibration: Any, options: SensitivityOptions) -> Units:
    return QuantizeUnits(StaticSession(model, calibration,
                                       QuantizeOptions(exclude=options.exclude, progress=False)))


def _prune_units(model: ir.Model, calibration: Any, options: SensitivityOptions) -> Units:
    return PruneUnits(model, options.ratio, PruneOptions(ratio=None, exclude=options.exclude))


def _factorize_units(model: ir.Model, calibration: Any, options: SensitivityOptions) -> Units:
    rule = FactorizeOptions(rank_ratio=options.rank_ratio, exclude=list(options.exclude) or None)
    return FactorizeUnits(model, rule)


# Method name -> the family's units: what a table compresses one unit at a time.
METHODS: Mapping[str, Callable[[ir.Model, Any, SensitivityOptions], Units]] = {
    "quantize": _quantize_units,
    "prune": _prune_units,
    "factorize": _factorize_units,
}

_ORDER = ("method", "calibration", "ratio", "rank_ratio", "exclude", "metric", "labels")


@takes_options(SensitivityOptions, order=_ORDER)
def sensitivity(
    model: ir.Model, data: DataLike, *, calibration: Any = None, options: SensitivityOptions
) -> SensitivityTable:
    """Per-layer sensitivity of `model` to one compression method, most sensitive first.

    Takes its options as keywords or as `options=` a `SensitivityOptions`; keywords given with
    `options=` replace its fields. The table is the report (`print(table)` shows the
    `slimgraph sensitivity` table; `table.to_dict()`).

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
        options: a `SensitivityOptions` instead of (or under) the keywords.

    Returns:
        `SensitivityTable` whose rows name the node `--exclude` acts on.

    Raises:
        BadOptionError: an unknown method, a ratio out of range, a pattern that matches nothing.
        UnsupportedModelError: nothing the method can compress.
        TypeError: an unknown keyword, or `options` that is not a `SensitivityOptions`.
    """
    if options.method not in METHODS:
        raise BadOptionError(f"unknown method '{options.method}' (choose {', '.join(METHODS)})")
    labelled = as_data(data, model, labels=options.labels)
    scorer = Evaluator(model, labelled, metric=options.metric)
    calibration = calibration if calibration is not None else labelled.feeds
    return table_of(METHODS[options.method](model, calibration, options), scorer)
