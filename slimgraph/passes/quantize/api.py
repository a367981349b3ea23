"""`sg.quantize`: one call from a float model to a quantized one.

Static (calibration data given): prepare (fold constants and BatchNorm into Conv, verified),
annotate (`policy`), calibrate the planned values on onnxruntime (`runtime.calibrate`), insert
Q/DQ (`qdq`), optionally lower to QOperator (`qoperator`), and measure per-tensor SQNR
(`report`). Dynamic and weight-only modes call their own passes.

`quantize` is thin: it gathers its keywords into one `QuantizeOptions` and runs `QuantizePass`
once; the pipeline's `quantize` step (`StaticQuantizePass`) is the same pass with
`StaticOptions`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph.errors import (
    BadOptionError,
    SlimgraphError,
    UnsupportedModelError,
    VerificationError,
)
from slimgraph.ir import ModelLike, as_model, copy_model, metadata
from slimgraph.ir.select import check_patterns, exact_pattern
from slimgraph.passes._kit import PrepareWeightsPass
from slimgraph.passes.base import SlimgraphFunctionalPass, SlimgraphPassResult
from slimgraph.passes.quantize import auto_bits, weight_only
from slimgraph.passes.quantize.options import (
    ActivationDtype,
    Mode,
    QuantizeOptions,
    StaticOptions,
)
from slimgraph.passes.quantize.policy import WEIGHT_OPS, QuantPlan, annotate
from slimgraph.passes.quantize.qdq import MIN_OPSET, QDQPass, QDQResult, activation_params
from slimgraph.passes.registry import register_pass, register_preset
from slimgraph.runtime.budget import Budget, BudgetJudge, DataLike, budget_judge
from slimgraph.runtime.calibrate import CalibrationData, calibrate, calibration_batches
from slimgraph.runtime.histogram import METHODS
from slimgraph.runtime.metrics import Metric

__all__ = [
    "quantize", "quantize_static", "prepare", "report_of", "budget_search_of",
    "check_exclusions",
    "QuantizePass",
    "StaticQuantizePass",
]

logger = logging.getLogger(__name__)

_FORMATS = ("qdq", "qoperator")


def quantize(
    model: ModelLike,
    *,
    calibration: CalibrationData | None = None,
    mode: Mode | None = None,
    method: str = "minmax",
    per_channel: bool = True,
    fmt: str | None = None,
    exclude: Sequence[str] = (),
    exclude_ops: Sequence[str] = (),
    include_ops: Sequence[str] = (),
    activation_dtype: ActivationDtype = "auto",
    report: bool = False,
    bits: int | str = 4,
    block_size: int = 32,
    batch_size: int = 32,
    progress: bool | None = None,
    percentile: float = 99.99,
    data: DataLike | None = None,
    budget: Budget | None = None,
    max_drop: float | None = None,
    min_cosine: float | None = None,
    metric: Metric | None = None,
    verify: bool = True,
    smooth_quant: float | str | bool | None = None,
    transformer: bool = True,
    accuracy_level: int | None = None,
    head_bits: int | None = 8,
    embedding_bits: int | None = 8,
    act_order: bool = True,
    auto_batch: int = 1,
    auto_seq: int | None = None,
) -> ir.Model:
    """Quantize a float model to int8 (a new model; the input is not modified). Approximate.

    Method: affine int8 quantization (seeds 000, 002): static with calibrated activation ranges
    (QDQ pairs or integer operators), dynamic (activations quantized at run time), or block-wise
    weight-only int4/int8 whose codes come from round-to-nearest, HQQ, GPTQ or AWQ.

    Args:
        model: the float model: an `onnx_ir.Model` or the path of an `.onnx` file.
        calibration: an `.npz` path, a dict of stacked arrays, or an iterable of feed dicts
            (static mode; weight-only methods "gptq" and "awq").
        mode: "static" (default when calibration is given), "dynamic" (default otherwise) or
            "weight-only" (the default when `method` is a weight-only method).
        method: static calibrator: minmax, moving-average, percentile, entropy or mse;
            weight-only: "rtn" (round-to-nearest, the default; "minmax" means the same), "hqq"
            (half-quadratic fit of each block's grid, no data), "gptq" or "awq" (both need
            calibration data; `passes.quantize.gptq`, `awq`, `hqq`).
        per_channel: per-channel weight scales.
        fmt: "qdq" (QuantizeLinear/DequantizeLinear pairs, portable) or "qoperator"
            (QLinearConv, QLinearMatMul, onnxruntime's MatMulIntegerToFloat with the bias inside:
            BERT-style 0.46x fp32 latency against 0.50x for QDQ, whose MatMul biases onnxruntime
            leaves unfused).
            Default: "qdq" for static; for weight-only, MatMulNBits ("qoperator"), measured
            faster on CPU than the standard DequantizeLinear-with-block_size form ("qdq").
        exclude: name patterns (node, torch layer or tensor names, fnmatch) left float.
        exclude_ops: op types left float.
        include_ops: static: op types left float by default to quantize anyway (Softmax, Where,
            LayerNormalization, ...; "MatMul" adds the MatMuls of two activations).
        activation_dtype: "auto" (uint8 on x86, the fast kernels), "uint8" or "int8".
        report: measure per-tensor SQNR on the calibration data (static); read it back with
            `slimgraph.report_of(quantized)`.
        bits, block_size: weight-only options; bits 4, 8 or "auto": each MatMul becomes int4
            weight-only, dynamic int8 or stays float32, whichever onnxruntime runs fastest on this
            machine at `auto_batch` x `auto_seq` (`passes.quantize.auto_bits`; the choices are in
            `model.meta[metadata.AUTO_BITS]`).
        batch_size: calibration rows per onnxruntime run.
        progress: progress bar on stderr (default: when stderr is a terminal).
        percentile: for method="percentile".
        data: validation data for the budget (an .npz path, stacked arrays with an optional
            `labels` key, or `LabelledData`).
        budget, max_drop, min_cosine: an accuracy budget (`runtime.budget`; `max_drop` is the
            absolute top-1 drop as a fraction and needs labels). Static mode keeps the most
            sensitive layers float until it holds (`passes.budgeted.quantize_with_budget`; the
            search is in `budget_search_of(result)`); other modes only check it.
        metric: a user `Metric` (higher is better) replacing top-1 accuracy for `max_drop`.
        verify: dynamic/weight-only: check the exact folding before quantization on
            onnxruntime (random inputs). False quantizes without running the model at all
            (models with ops onnxruntime does not have); static mode always runs it.
        smooth_quant: static: SmoothQuant before quantizing (`slimgraph.passes.quantize.
            smoothquant`): alpha in [0, 1], or "auto"/True to search alpha on the calibration data.
        transformer: dynamic and weight-only: a model with attention first gets the
            `transformer` preset's exact fusions (attention into MultiHeadAttention or
            GroupQueryAttention, then QAttention in dynamic mode; RMSNorm, BiasGelu; residual
            Adds as Sum), verified like `prepare`, and GELU in its faster tanh form (FastGelu;
            approximate, within 4.74e-4 of the erf form; in dynamic mode also on a model the
            preset fused already); blocks that cannot be fused are named in a warning. False
            quantizes the graph's own ops.
        accuracy_level: weight-only MatMulNBits' accuracy level (None: 4, int8 activations).
        head_bits, embedding_bits: weight-only bits of the head (a MatMul whose output is a
            graph output: an LM head, a classifier) and of embedding tables: 8 unless asked
            (None: `bits`).
        act_order: weight-only GPTQ processes rows by decreasing Hessian diagonal (the
            default; False: in order).
        auto_batch, auto_seq: the batch and sequence length `bits="auto"` times the layers at
            (auto_seq None: the export's example sequence length, else 1).

    Returns:
        The quantized model (float inputs and outputs).

    Raises:
        BadOptionError: an unknown mode, format or method, static mode without calibration
            data, an option that does not apply to the mode, or `model` neither a model nor a
            path, an `--exclude` that matches nothing, a budget without data.
        BadDataError: calibration data that does not fit the model's inputs (named), or holds
            NaN/Inf.
        UnsupportedModelError: nothing in the model can be quantized in this mode, or the model
            does not run on onnxruntime where it must (the message says to pass verify=False /
            --no-verify for dynamic and weight-only).
        VerificationError: the float model prepared for quantization (constants and BatchNorm
            folded) no longer matches the input model.
        ModelLoadError: `model` is a path that cannot be loaded.
        VerificationError: the result misses the accuracy budget (the measured figure is in
            the message).

    Example:
        >>> import slimgraph as sg
        >>> q = sg.quantize("model.onnx", calibration="calib.npz")  # doctest: +SKIP
        >>> q = sg.quantize(model, calibration=feeds, report=True)  # doctest: +SKIP
        >>> print(sg.report_of(q).summary())  # doctest: +SKIP
    """
    options = QuantizeOptions(
        mode=mode, method=method, per_channel=per_channel, fmt=fmt, exclude=exclude,
        exclude_ops=exclude_ops, include_ops=include_ops, activation_dtype=activation_dtype,
        report=report, bits=bits, block_size=block_size, batch_size=batch_size,
        progress=progress, percentile=percentile, data=data, budget=budget, max_drop=max_drop,
        min_cosine=min_cosine, metric=metric, verify=verify, smooth_quant=smooth_quant,
        transformer=transformer, accuracy_level=accuracy_level, head_bits=head_bits,
        embedding_bits=embedding_bits, act_order=act_order, auto_batch=auto_batch,
        auto_seq=auto_seq,
    )
    return QuantizePass(options, calibration=calibration)(as_model(model)).model


class QuantizePass(SlimgraphFunctionalPass):
    """Quantize a float model in any mode, as `slimgraph.quantize` describes (approximate).

    The one place the modes are chosen and run: static (calibrated QDQ or QOperator, optionally
    after SmoothQuant or under an accuracy budget), dynamic, weight-only. The result is the
    deployable model (exporter debug metadata and working marks dropped; a `transformer`
    preset's residual Sums kept).

    Args:
        options: what to do (`QuantizeOptions`).
        calibration: calibration data (static mode).
    """

    exact = False

    def __init__(
        self, options: QuantizeOptions | None = None, *, calibration: CalibrationData | None = None
    ) -> None:
        super().__init__()
        self.options = options or QuantizeOptions()
        self.calibration = calibration

    def call(self, model: ir.Model) -> SlimgraphPassResult:
        return SlimgraphPassResult(_quantize(model, self.calibration, self.options),
                                   modified=True)


def _quantize(
    model: ir.Model, calibration: CalibrationData | None, options: QuantizeOptions
) -> ir.Model:
    """`QuantizePass`'s work: the mode's default, the budget, then the mode."""
    from slimgraph.passes.transformer import (
        ResidualSumPass,
        TanhGeluPass,
        has_fused_attention,
        has_residual_sums,
    )

    keep_sums = has_residual_sums(model)  # `transformer` preset output: keep its residual Sums

    def _finish(quantized: ir.Model) -> ir.Model:
        if keep_sums:
            quantized = ResidualSumPass()(quantized).model
        return _deployable(quantized)

    mode = options.mode or (
        "weight-only" if options.method in weight_only.METHODS
        else "static" if calibration is not None else "dynamic")
    options = replace(options, mode=mode)
    judge = budget_judge(model, options.data, budget=options.budget, max_drop=options.max_drop,
                         min_cosine=options.min_cosine, metric=options.metric)
    if judge is not None:
        return _quantize_within(model, judge, calibration, options)
    fmt = options.fmt
    if fmt is None or (fmt == "matmulnbits" and mode == "weight-only"):
        fmt = "qoperator" if mode == "weight-only" else "qdq"
    if fmt not in _FORMATS:
        raise BadOptionError(f"unknown format '{fmt}' (choose qdq or qoperator)")
    options = replace(options, fmt=fmt)
    check_exclusions(model, options.exclude, options.exclude_ops)
    if options.include_ops and mode != "static":
        raise BadOptionError.worded(
            "{include} applies to static quantization (with {calib}), not to {mode} mode",
            include=("include_ops=", "--include-op"), calib=("calibration=", "--calib"),
            mode=mode)
    smooth_quant = options.smooth_quant
    if mode == "static":
        if calibration is None:
            raise BadOptionError.worded("static quantization needs calibration data ({calib})",
                                        calib=("calibration=", "--calib DATA.npz"))

        def run_static(float_model: ir.Model, data: object) -> ir.Model:
            return _quantize_static(float_model, data, options)  # type: ignore[arg-type]

        if smooth_quant is not None and smooth_quant is not False:
            from slimgraph.passes.quantize.smoothquant import smooth_and_quantize

            return _finish(smooth_and_quantize(model, calibration, smooth_quant, run_static,
                                                   batch_size=options.batch_size))
        return _finish(run_static(model, calibration))
    if smooth_quant is not None and smooth_quant is not False:
        raise BadOptionError.worded("{smooth} applies to static quantization, not to {mode} mode",
                                    smooth=("smooth_quant=", "--smooth-quant"), mode=mode)
    settings = _weight_only_settings(options, calibration) if mode == "weight-only" else None
    if mode in ("dynamic", "weight-only"):
        # Weights built at run time (ConstantOfShape in old exports, Transpose/Cast chains in
        # dynamo exports) become constants first, as for static mode; checked on random inputs.
        model = prepare(
            model, _generated_feed(model) if options.verify else None,
            matmul_to_gemm=mode != "weight-only",
        )
        if options.transformer:
            model, fused = _transformer_rewrites(model, options.verify)
            keep_sums = keep_sums or fused
    if mode == "dynamic":
        from slimgraph.passes.quantize.dynamic import quantize_dynamic

        if options.transformer and has_fused_attention(model):
            model = TanhGeluPass()(model).model  # fused by the preset before: GELUs in erf form
        return _finish(quantize_dynamic(
            model, per_channel=options.per_channel, exclude=tuple(options.exclude),
            exclude_ops=tuple(options.exclude_ops),
        ))
    if settings is not None:
        return _finish(_weight_only(model, calibration, options, settings))
    raise BadOptionError(f"unknown mode '{mode}' (choose static, dynamic or weight-only)")


def _weight_only_settings(
    options: QuantizeOptions, calibration: CalibrationData | None
) -> weight_only.WeightOnlyOptions:
    """The weight-only pass's options from `quantize`'s, checked (before anything runs).

    Raises:
        BadOptionError: a static calibrator as method, calibration data for a method that
            uses none or none for one that needs it, bad bits or other weight-only options.
    """
    method = "rtn" if options.method == "minmax" else options.method
    if method not in weight_only.METHODS:
        kind = "is a static calibrator" if method in METHODS else "is unknown"
        raise BadOptionError.worded(
            "{method} {name} {kind}; weight-only methods: {choices}",
            method=("method=", "--method"), name=method, kind=kind,
            choices=", ".join(weight_only.METHODS))
    if calibration is not None and method not in weight_only.DATA_METHODS:
        raise BadOptionError.worded(
            "weight-only {method} {name} uses no calibration data: leave out {calib} (gptq and "
            "awq use it)", method=("method=", "--method"), name=method,
            calib=("calibration=", "--calib"))
    bits = options.bits
    if bits not in (4, 8, "auto"):
        raise BadOptionError(f"weight-only quantization supports bits 4, 8 or auto (got {bits})")
    settings = weight_only.WeightOnlyOptions(
        bits=4 if bits == "auto" else int(bits), block_size=options.block_size,
        fmt="matmulnbits" if options.fmt == "qoperator" else "dq", method=method,
        exclude=tuple(options.exclude), exclude_ops=tuple(options.exclude_ops),
        accuracy_level=(weight_only.DEFAULT_ACCURACY_LEVEL if options.accuracy_level is None
                        else options.accuracy_level),
        head_bits=options.head_bits, embedding_bits=options.embedding_bits,
        act_order=options.act_order,
    )
    settings.check()
    weight_only.check_calibration(method, calibration)
    return settings


def _weight_only(
    model: ir.Model, calibration: CalibrationData | None, options: QuantizeOptions,
    settings: weight_only.WeightOnlyOptions,
) -> ir.Model:
    """Weight-only quantization of the prepared `model` (bits "auto": the form of each MatMul
    timed first)."""
    if options.bits != "auto":
        return weight_only.quantize_weight_only(
            model, calibration=calibration, batch_size=options.batch_size, **vars(settings))
    quantized, chosen = auto_bits.quantize_auto(
        model, settings, batch=options.auto_batch, seq=options.auto_seq,
        calibration=calibration, batch_size=options.batch_size,
        per_channel=options.per_channel)
    quantized.meta[metadata.AUTO_BITS] = chosen
    return quantized


def _transformer_rewrites(model: ir.Model, verify: bool) -> tuple[ir.Model, bool]:
    """The `transformer` preset's exact fusions on a model with unfused attention, for dynamic
    int8 and weight-only on onnxruntime: fused attention (then QAttention in dynamic mode),
    BiasGelu, residual Sums; and GELU in its tanh form (`tanh-gelu`, approximate: 4.74e-4 at
    most, below the int8 noise). Returns the model and whether it changed; a summary of the
    attention fusion is logged (a warning naming the first block left unfused and why)."""
    from slimgraph.passes import run_pipeline
    from slimgraph.passes.transformer import find_attention, has_fused_attention

    if has_fused_attention(model) or not find_attention(model.graph, cache=True)[0]:
        return model, False
    from slimgraph.runtime import random_feeds

    steps: list[str | dict[str, object]] = [
        {"name": "fuse-attention", "require": False}, "fuse-bias-gelu", "tanh-gelu",
        "fuse-rms-norm", "residual-sum"]
    result = run_pipeline(model, steps, verify=verify,
                          feeds=random_feeds(model) if verify else None)
    for record in result.records:
        summary = record.details.get("summary")
        if summary:
            unfused = record.details.get("blocks", 0) != record.details.get("fused", {}).get(
                "attention", 0)
            (logger.warning if unfused else logger.info)("quantize: %s", summary)
    return result.model, result.modified


def _quantize_within(
    model: ir.Model, judge: BudgetJudge, calibration: CalibrationData | None,
    options: QuantizeOptions,
) -> ir.Model:
    """`quantize` under an accuracy budget: static mode searches the float layers, the others
    are checked; the search record goes in the result's meta."""
    from slimgraph.passes.budgeted import BudgetSearch, quantize_with_budget

    keep_float: list[str] = []
    mode = options.mode
    search = BudgetSearch(f"{mode} quantization", judge.budget.describe())
    if mode == "static" and calibration is not None:
        check_exclusions(model, options.exclude, options.exclude_ops)
        keep_float, search = quantize_with_budget(
            model, calibration, judge, method=options.method,
            per_channel=options.per_channel, exclude=options.exclude,
            exclude_ops=options.exclude_ops, include_ops=options.include_ops,
            activation_dtype=options.activation_dtype, batch_size=options.batch_size,
            percentile=options.percentile,
        )
        if options.fmt not in (None, *_FORMATS):
            raise BadOptionError(f"unknown format '{options.fmt}' (choose qdq or qoperator)")
        if options.fmt in (None, "qdq") and not options.report and (
            search.candidate is not None
        ):
            # the very model the search measured: no second calibration, no second evaluation
            result = _deployable(search.candidate)
            result.meta[metadata.BUDGET_SEARCH] = search
            return result
        result = _deployable(_quantize_static(
            model, calibration, replace(options, fmt=options.fmt or "qdq"), keep_float
        ))
    else:
        # checked, not searched; SmoothQuant is not applied under a budget (as before issue 12)
        unjudged = replace(options, data=None, budget=None, max_drop=None, min_cosine=None,
                           metric=None, smooth_quant=None)
        result = _quantize(model, calibration, unjudged)
    report = result.meta.get(metadata.QUANT_REPORT)
    search.evaluation = judge.check(result, what="the quantized model")
    result.meta[metadata.BUDGET_SEARCH] = search
    if report is not None:
        result.meta[metadata.QUANT_REPORT] = report
    return result


def budget_search_of(model: ir.Model):  # noqa: ANN201 - avoids importing budgeted eagerly
    """The `BudgetSearch` a `quantize(..., max_drop=/min_cosine=)` call attached, or None.

    Returns:
        The search record (layers kept float and why, evaluations tried), or None for a model
        quantized without a budget.

    Raises:
        Nothing: a model without the record gives None.
    """
    return model.meta.get(metadata.BUDGET_SEARCH)


def _deployable(model: ir.Model) -> ir.Model:
    """The quantized model is a deployment artifact: drop the exporter's debug metadata and
    slimgraph's working marks."""
    from slimgraph.passes.cleanup import StripDebugMetadataPass

    return StripDebugMetadataPass(working_marks=True)(model).model


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
    """Calibrated static quantization (see `quantize`).

    `keep_float` names nodes of the prepared model (BatchNorm folded) left float, exactly (as a
    sensitivity table or budget search names them); unlike `exclude` they are not patterns.
    """
    options = QuantizeOptions(
        method=method, per_channel=per_channel, fmt=fmt, exclude=exclude,
        exclude_ops=exclude_ops, include_ops=include_ops, activation_dtype=activation_dtype,
        report=report, batch_size=batch_size, progress=progress, percentile=percentile,
    )
    return _quantize_static(model, calibration, options, keep_float)


def _quantize_static(
    model: ir.Model, calibration: CalibrationData, options: QuantizeOptions,
    keep_float: Sequence[str] = (),
) -> ir.Model:
    """Prepare, plan (`policy.annotate`), calibrate, insert Q/DQ, report, lower to QOperator."""
    method, percentile, progress = options.method, options.percentile, options.progress
    if method not in METHODS:
        raise BadOptionError(f"unknown calibration method '{method}' (choose {', '.join(METHODS)})")
    if not 0 < percentile <= 100:
        raise BadOptionError(f"percentile must be in (0, 100], got {percentile}")
    check_exclusions(model, options.exclude, options.exclude_ops)
    batches = calibration_batches(model, calibration, batch_size=options.batch_size)
    prepared = prepare(model, batches.first())
    exclude = [*options.exclude, *map(exact_pattern, keep_float)]

    def replan(extra: Sequence[str] = ()) -> QuantPlan:
        return annotate(
            prepared, per_channel=options.per_channel, exclude=[*exclude, *extra],
            exclude_ops=options.exclude_ops, activation_dtype=options.activation_dtype,
            include_ops=options.include_ops,
        )

    plan = replan()
    if not plan.weights and not plan.activations:
        raise UnsupportedModelError(
            "nothing to quantize: the model has no Conv, ConvTranspose, Gemm or MatMul with a "
            "float32 constant weight"
            + (" outside the exclusions" if exclude or options.exclude_ops else "")
        )
    needs_histogram = method in ("percentile", "entropy", "mse")
    names = [a.value for a in plan.activations]
    stats = calibrate(prepared, batches, names, histogram=needs_histogram, progress=progress)
    params = activation_params(plan, stats, method, percentile=percentile)
    result = QDQPass(plan, params)(prepared)
    assert isinstance(result, QDQResult)
    quantized = result.model
    if options.report:
        from slimgraph.passes.quantize.report import measure

        quantized.meta[metadata.QUANT_REPORT] = measure(
            prepared, quantized, plan, result, batches, method=method, progress=progress,
            replan=replan,
        )
    if options.fmt == "qoperator":
        from slimgraph.passes.quantize.qoperator import QOperatorPass

        lowered = QOperatorPass()(quantized).model
        lowered.meta[metadata.QUANT_REPORT] = quantized.meta.get(metadata.QUANT_REPORT)
        quantized = lowered
    return quantized


def check_exclusions(
    model: ir.Model, exclude: Sequence[str], exclude_ops: Sequence[str] = ()
) -> None:
    """Every `--exclude` pattern must select a node (by layer, node or output tensor name: the
    report prints all three) and every `--exclude-op` must be an op type of the model.

    Raises:
        BadOptionError: a pattern or op type that matches nothing (it would be a silent no-op).
    """
    nodes = list(model.graph.all_nodes())
    check_patterns(nodes, exclude, tensors=True)
    present = {node.op_type for node in nodes}
    for op in exclude_ops:
        if op not in present:
            raise BadOptionError.worded("{option} {op}: the model has no {name} node",
                                        option=("exclude_ops", "--exclude-op"), op=repr(op),
                                        name=op)


def report_of(model: ir.Model):  # noqa: ANN201 - avoids importing report eagerly
    """The `QuantReport` a `quantize(..., report=True)` call attached to its result, or None.

    Args:
        model: the model `quantize` returned.

    Returns:
        The report (per-tensor SQNR, worst tensors; `.summary()` is the text the CLI prints),
        or None when the model was not quantized with `report=True`.

    Raises:
        Nothing: any model is accepted.
    """
    return model.meta.get(metadata.QUANT_REPORT)


def prepare(
    model: ir.Model, feed: dict[str, np.ndarray] | None = None, *, matmul_to_gemm: bool = True
) -> ir.Model:
    """A copy with constants folded and BatchNorm folded into Conv/ConvTranspose/Gemm, verified.

    Uses the pipeline's lossless passes (exact). With `feed`, the result is compared with the
    model on onnxruntime; a difference beyond fp32 tolerance raises `VerificationError`.
    `matmul_to_gemm=False` keeps MatMul+Add apart (weight-only quantizes MatMuls only: a Linear
    with bias must stay a MatMul).
    """
    from slimgraph.passes import LOSSLESS_STEPS, run_pipeline

    steps = [
        step for step in LOSSLESS_STEPS
        if step != "compact-constants" and (matmul_to_gemm or step != "matmul-add-to-gemm")
    ]
    prepared = run_pipeline(copy_model(model), steps).model
    # weights computed at run time that the cleanup did not fold (above its size limits)
    PrepareWeightsPass(scope=WEIGHT_OPS)(prepared)
    if prepared.opset_imports.get("", 0) < MIN_OPSET:
        from slimgraph.passes.opset import ConvertOpsetPass

        prepared = ConvertOpsetPass(opset=MIN_OPSET)(prepared).model
    _lift_constants(prepared)
    _name_nodes(prepared)
    _weight_layers(prepared)
    if feed is not None:
        _verify(model, prepared, _first_rows(model, feed))
    return prepared


def _lift_constants(model: ir.Model) -> None:
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)


def _weight_layers(model: ir.Model) -> None:
    """A Conv with a BatchNorm folded in belongs to the conv's layer (its weight's name), not
    the BatchNorm's the fusion may have left on it."""
    for node in model.graph:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(node.inputs) > 1:
            weight = node.inputs[1]
            name = weight.name if weight is not None and weight.is_initializer() else None
            if name is not None and name.endswith(".weight"):
                node.metadata_props[metadata.LAYER] = name[: -len(".weight")]


def _name_nodes(model: ir.Model) -> None:
    used: set[str] = set()
    for index, node in enumerate(model.graph):
        if not node.name or node.name in used:
            node.name = f"{node.op_type}_{index}"
        used.add(node.name)


def _first_rows(model: ir.Model, feed: Mapping[str, Any]) -> Mapping[str, Any]:
    """One row of a batch (or the model's fixed batch): enough to check an exact rewrite. A
    feed that is not a batch of rows (scalars, sequences, inputs of different lengths) is
    checked whole."""
    from slimgraph.runtime import iter_batches

    values = list(feed.values())
    if not values or not all(isinstance(v, np.ndarray) and v.ndim >= 1 for v in values):
        return feed
    if len({v.shape[0] for v in values}) != 1 or values[0].shape[0] < 2:
        return feed
    return next(iter_batches(feed, 1, model), feed)


def _generated_feed(model: ir.Model) -> dict[str, Any]:
    """Inputs that drive the model (`runtime.feeds.driving_feeds`), to check `prepare` in the
    modes that need no data (dynamic, weight-only)."""
    from slimgraph.runtime.feeds import driving_feeds

    try:
        return driving_feeds(model, who="the model")[0]
    except UnsupportedModelError as error:
        raise UnsupportedModelError(
            f"{error}; dynamic and weight-only quantization do not need to run it: pass "
            "--no-verify (verify=False)"
        ) from None


def _verify(reference: ir.Model, prepared: ir.Model, feed: Mapping[str, Any]) -> None:
    from slimgraph.runtime import create_session, run
    from slimgraph.runtime.exact import exact_difference

    try:
        session = create_session(reference)
    except SlimgraphError:
        raise
    except Exception as error:  # onnxruntime's own classes: custom ops, invalid graphs
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        text = text.replace("[ONNXRuntimeError] : ", "")
        raise UnsupportedModelError(
            f"the model does not run on onnxruntime ({text}); dynamic and weight-only "
            "quantization do not need to run it: pass --no-verify (verify=False)"
        ) from None
    ref = run(session, feed)
    got = run(create_session(prepared), feed)
    for name, expected in ref.items():
        if name not in got or exact_difference(expected, got[name]) is not None:
            raise VerificationError(
                f"folding BatchNorm/constants before quantization changed output '{name}'"
            )


@register_pass("quantize", exact=False)
class StaticQuantizePass(QuantizePass):
    """Calibrated static int8 quantization as a pipeline step (approximate: fidelity reported).

    Takes its calibration data from the pipeline's context (`optimize(..., calibration=...)`,
    `slimgraph optimize --calib DATA.npz`) unless given directly; the options are
    `StaticOptions`' (see `quantize_static`). The result is the same deployable model as
    `sg.quantize` and `slimgraph quantize` write (it runs the same `QuantizePass` work).
    """

    options_from = StaticOptions

    def __init__(self, *, calibration: CalibrationData | None = None, **options: Any) -> None:
        static = StaticOptions(**options)
        super().__init__(
            QuantizeOptions(mode="static", progress=False, **vars(static)),
            calibration=calibration,
        )

    def requires(self, model: ir.Model) -> None:
        if self.calibration is None:
            raise BadOptionError(
                "the 'quantize' step needs calibration data (--calib DATA.npz, or calibration=)"
            )


# Exact cleanup and fusion, then calibrated static int8: `slimgraph optimize --preset int8 --calib`.
register_preset("int8", ["lossless", "quantize"])
