"""Calibrated static int8: one model, one calibration set, prepared and calibrated once.

A `StaticSession` holds the prepared float model (`prepare`: constants and BatchNorm folded,
verified on the first calibration batch), the checked calibration batches and the calibration
statistics measured so far. `build(keep_float)` plans (`policy.annotate`), takes the activation
ranges from those statistics (calibrating, in one walk of the data, only values not measured
yet), inserts Q/DQ (`qdq`) and optionally measures the per-tensor report (`report`) and lowers to
QOperator (`qoperator`). Static quantization, the budget search (which builds the model with
different layers kept float) and SmoothQuant's alpha search (`smoothquant`, which builds
smoothed variants of the prepared model) all build from one session, so the data is walked once
for the statistics however many candidates are built.

Example:
    >>> session = StaticSession(model, "calib.npz", QuantizeOptions())  # doctest: +SKIP
    >>> int8 = session.build()  # doctest: +SKIP
    >>> mixed = session.build(keep_float=["conv1"])  # same statistics, no second walk
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx_ir as ir

from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import metadata
from slimgraph.ir.select import exact_pattern
from slimgraph.passes.quantize.adaround import check_rounding, learn_rounding, with_weight_bits
from slimgraph.passes.quantize.bias_correction import corrected_biases
from slimgraph.passes.quantize.equalize import equalized
from slimgraph.passes.quantize.equalize_bounds import clip_ceilings, drop_saturated_bounds
from slimgraph.passes.quantize.options import ActivationDtype, QuantizeOptions
from slimgraph.passes.quantize.policy import QuantPlan, annotate
from slimgraph.passes.quantize.prepare import check_exclusions, prepare
from slimgraph.passes.quantize.qdq import QDQPass, QDQResult, activation_params
from slimgraph.passes.quantize.qoperator import QOperatorPass
from slimgraph.passes.quantize.report import measure
from slimgraph.runtime.calibrate import (
    Batches,
    CalibrationData,
    ChannelRanges,
    calibrate,
    calibrate_with_channels,
    calibration_batches,
)
from slimgraph.runtime.histogram import METHODS, TensorStats

__all__ = ["HISTOGRAM_METHODS", "StaticSession", "quantize_static"]

# Calibrators that read a histogram of each value (the others need only its range).
HISTOGRAM_METHODS = ("percentile", "entropy", "mse")


class StaticSession:
    """Static quantization of `model` on `calibration`: the prepared model, batches, statistics.

    Args:
        model: the float model (not modified).
        calibration: an `.npz` path, a dict of stacked arrays, or an iterable of feed dicts.
        options: the static options read here: method, percentile, per_channel, exclude,
            exclude_ops, include_ops, activation_dtype, batch_size, progress.

    Attributes:
        prepared: the prepared float model every build starts from.
        batches: the checked calibration batches.
        histogram: the calibrator reads histograms (percentile, entropy, mse).

    Raises:
        BadOptionError: an unknown method, a percentile outside (0, 100], an exclusion that
            selects nothing.
        BadDataError: calibration data that does not fit the model.
        VerificationError: the prepared model differs from `model` on the first batch.
    """

    def __init__(
        self, model: ir.Model, calibration: CalibrationData, options: QuantizeOptions
    ) -> None:
        if options.method not in METHODS:
            raise BadOptionError(
                f"unknown calibration method '{options.method}' (choose {', '.join(METHODS)})"
            )
        if not 0 < options.percentile <= 100:
            raise BadOptionError(f"percentile must be in (0, 100], got {options.percentile}")
        check_exclusions(model, options.exclude, options.exclude_ops)
        check_rounding(options.weight_bits, options.round)
        self.options = options
        self.batches: Batches = calibration_batches(
            model, calibration, batch_size=options.batch_size
        )
        self.prepared = prepare(model, self.batches.first())
        if options.equalize:  # cross-layer equalization (exact, checked on the first batch)
            ceilings = clip_ceilings(self.prepared, self.batches, progress=options.progress)
            self.prepared = equalized(self.prepared, self.batches.first(), ceilings)
        self.histogram = options.method in HISTOGRAM_METHODS
        self._stats: dict[str, TensorStats] = {}

    def plan(
        self, keep_float: Sequence[str] = (), extra: Sequence[str] = (),
        *, model: ir.Model | None = None,
    ) -> QuantPlan:
        """What static quantization does to `model` (default: the prepared model) with the nodes
        `keep_float` (exact names) and the patterns `extra` left float."""
        options = self.options
        plan = annotate(
            self.prepared if model is None else model, per_channel=options.per_channel,
            exclude=[*options.exclude, *map(exact_pattern, keep_float), *extra],
            exclude_ops=options.exclude_ops,
            activation_dtype=options.activation_dtype, include_ops=options.include_ops,
        )
        return with_weight_bits(plan, options.weight_bits)

    def statistics(self, names: Sequence[str]) -> dict[str, TensorStats]:
        """The calibration statistics of the prepared model's values `names`; those not measured
        yet are measured in one walk of the data."""
        missing = [name for name in dict.fromkeys(names) if name not in self._stats]
        if missing:
            self._stats.update(calibrate(self.prepared, self.batches, missing,
                                         histogram=self.histogram,
                                         progress=self.options.progress))
        return {name: self._stats[name] for name in names}

    def channel_ranges(
        self, names: Sequence[str], channels: Sequence[str]
    ) -> dict[str, ChannelRanges]:
        """Per-channel ranges of the values `channels`, measured in the walk that also measures
        the statistics of `names` (SmoothQuant: max |X_j| and the ranges of X / s)."""
        stats, ranges = calibrate_with_channels(
            self.prepared, self.batches, [n for n in names if n not in self._stats], channels,
            histogram=self.histogram, progress=self.options.progress,
        )
        self._stats.update(stats)
        return ranges

    def build(
        self,
        keep_float: Sequence[str] = (),
        *,
        report: bool = False,
        fmt: str | None = "qdq",
        model: ir.Model | None = None,
        stats: Mapping[str, TensorStats] | None = None,
    ) -> ir.Model:
        """The quantized model with the nodes `keep_float` (exact names) left float.

        Args:
            keep_float: nodes of the prepared model left float (a budget search's choice).
            report: measure the per-tensor `QuantReport` (in `meta[metadata.QUANT_REPORT]`).
            fmt: "qdq" or "qoperator".
            model: a variant of the prepared model to quantize instead (SmoothQuant's).
            stats: statistics of the variant's values that differ from the prepared model's.

        Raises:
            UnsupportedModelError: nothing to quantize.
        """
        float_model = self.prepared if model is None else model
        reference = float_model  # what the quantized model approximates (the report, AdaRound)
        plan = self.plan(keep_float, model=float_model)
        if not plan.weights and not plan.activations:
            raise UnsupportedModelError(
                "nothing to quantize: the model has no Conv, ConvTranspose, Gemm or MatMul with "
                "a float32 constant weight"
                + (" outside the exclusions" if self.options.exclude or keep_float
                   or self.options.exclude_ops else "")
            )
        known = dict(stats or {})
        names = [a.value for a in plan.activations if a.value not in known]
        if model is None:
            known.update(self.statistics(names))
        else:
            known.update(self._variant_statistics(float_model, names))
        params = activation_params(plan, known, self.options.method,
                                   percentile=self.options.percentile,
                                   bounds=self.options.range_bounds)
        if self.options.equalize:  # the ReLU6 bounds quantization saturates first: dropped
            bounds = drop_saturated_bounds(float_model, plan, params)
            replanned = self.plan(keep_float, model=bounds.model) if bounds.dropped else plan
            if all(a.value in params for a in replanned.activations):
                float_model, plan = bounds.model, replanned
        result = QDQPass(plan, params)(float_model)
        assert isinstance(result, QDQResult)
        if self.options.round != "nearest":  # learned rounding, layer by layer (AdaRound)
            result.model = learn_rounding(reference, result, self.batches, self.options.round)
        quantized = result.model
        if self.options.bias_correction:  # each layer's mean output shift taken back
            float_model = corrected_biases(float_model, quantized, self.batches)[0]
            plan = self.plan(keep_float, model=float_model)
            result = QDQPass(plan, params)(float_model)
            assert isinstance(result, QDQResult)
            quantized = result.model
        if report:
            quantized.meta[metadata.QUANT_REPORT] = measure(
                reference, quantized, plan, result, self.batches, method=self.options.method,
                progress=self.options.progress,
                replan=lambda extra: self.plan(keep_float, extra, model=float_model),
            )
        if fmt == "qoperator":
            lowered = QOperatorPass()(quantized).model
            lowered.meta[metadata.QUANT_REPORT] = quantized.meta.get(metadata.QUANT_REPORT)
            quantized = lowered
        return quantized

    def _variant_statistics(self, variant: ir.Model, names: Sequence[str]) -> dict[str,
                                                                                 TensorStats]:
        """Statistics of a variant's values: the prepared model's where it has the value, a walk
        of the variant for values only it has (none for SmoothQuant's, whose own are given)."""
        values = {v.name for node in self.prepared.graph for v in node.outputs}
        values |= {v.name for v in self.prepared.graph.inputs}
        shared = [name for name in names if name in values]
        own = [name for name in names if name not in values]
        found = self.statistics(shared)
        if own:
            found.update(calibrate(variant, self.batches, own, histogram=self.histogram,
                                   progress=self.options.progress))
        return found


def quantize_static(
    model: ir.Model,
    calibration: CalibrationData,
    *,
    method: str = "minmax",
    per_channel: bool = True,
    fmt: str = "qdq",
    exclude: Sequence[str] = (),
    exclude_ops: Sequence[str] = (),
    include_ops: Sequence[str] = (),
    activation_dtype: ActivationDtype = "auto",
    report: bool = False,
    batch_size: int = 32,
    progress: bool | None = None,
    percentile: float = 99.99,
    keep_float: Sequence[str] = (),
) -> ir.Model:
    """Calibrated static quantization (see `slimgraph.quantize`).

    `keep_float` names nodes of the prepared model (BatchNorm folded) left float, exactly (as a
    sensitivity table or budget search names them); unlike `exclude` they are not patterns.

    Raises:
        BadOptionError, BadDataError, VerificationError: as `StaticSession`.
        UnsupportedModelError: nothing to quantize.
    """
    options = QuantizeOptions(
        method=method, per_channel=per_channel, fmt=fmt, exclude=exclude,
        exclude_ops=exclude_ops, include_ops=include_ops, activation_dtype=activation_dtype,
        report=report, batch_size=batch_size, progress=progress, percentile=percentile,
    )
    return StaticSession(model, calibration, options).build(keep_float, report=report, fmt=fmt)
