"""`slimgraph.quantize`: one call from a float model to a quantized one, under a budget if asked.

The modes are `QuantizePass`'s (`slimgraph.passes.quantize.modes`): static (calibrated QDQ or
QOperator, after SmoothQuant when asked), dynamic, weight-only. Here: the options
(`QuantizeOptions`, the pass's plus the accuracy budget), the report (`QuantizeReport`: the form
written, its quantization ops, the per-tensor SQNR with `report=True`, the budget search) and
the budget: static mode keeps the most sensitive layers float until it holds
(`QuantizeUnits` on one `StaticSession`, searched by `api.budget.search_units`), the other modes
check it.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import onnx_ir as ir

from slimgraph.api._options import BudgetOptions, SpeedOptions, takes_options
from slimgraph.api.budget import BudgetSearch, Unit, search_units
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import ModelLike, as_model, layer_name, metadata
from slimgraph.passes.quantize import options as pass_options
from slimgraph.passes.quantize.fallback import FallbackChoice, apply_fallback, check_fallback
from slimgraph.passes.quantize.modes import FORMATS, QuantizePass, default_mode, deployable
from slimgraph.passes.quantize.policy import WEIGHT_OPS
from slimgraph.passes.quantize.report import QuantReport
from slimgraph.passes.quantize.static import StaticSession
from slimgraph.runtime.budget import BudgetJudge
from slimgraph.runtime.calibrate import CalibrationData
from slimgraph.runtime.metrics import Evaluation
from slimgraph.runtime.speed_guard import SpeedCheck

__all__ = [
    "QuantizeOptions",
    "QuantizeReport",
    "QuantizeUnits",
    "quantize",
    "quantize_with_report",
    "report_of",
    "budget_search_of",
    "written_format",
]

logger = logging.getLogger(__name__)

PROXY_ROWS = 8  # calibration rows the budget search's SQNR ranking is measured on


@dataclass(frozen=True, kw_only=True)
class QuantizeOptions(pass_options.QuantizeOptions, BudgetOptions, SpeedOptions):
    """Everything `quantize` takes besides the model and calibration data: `QuantizePass`'s
    options (`slimgraph.passes.quantize.options.QuantizeOptions`) and the accuracy budget
    (`BudgetOptions`). Each field is described on `quantize`.

    Example:
        >>> QuantizeOptions(method="percentile", max_drop=0.01).max_drop
        0.01
    """

    fallback: str = "fp32"


# `quantize`'s keywords in the order its signature has always shown them.
_ORDER = (
    "calibration", "mode", "method", "per_channel", "fmt", "exclude", "exclude_ops",
    "include_ops", "activation_dtype", "report", "bits", "block_size", "batch_size", "progress",
    "percentile", "data", "budget", "max_drop", "min_cosine", "metric", "verify",
    "smooth_quant", "transformer", "accuracy_level", "head_bits", "embedding_bits", "act_order",
    "auto_batch", "auto_seq", "fallback",
    "equalize", "bias_correction", "weight_bits", "round", "range_bounds",
)


@dataclass
class QuantizeReport:
    """What `quantize` wrote and what it cost.

    Attributes:
        mode: static, dynamic or weight-only.
        format: the form the written graph is in (`written_format`): qdq, qoperator, dynamic
            or matmulnbits.
        quantized_ops: its quantization ops by count.
        tensors: the per-tensor SQNR report (static mode with `report=True`), else None.
        budget: the budget search (with a budget), else None.
        smooth_quant_alpha: the alpha SmoothQuant used (None: not applied, or no smoothing
            scored best).
        fallback: the precision of the layers the budget kept out of int8 and why (static
            mode under a budget), else None.
        speed: the speed guard's figures with `speed_check=True`, else None.
    """

    mode: str
    format: str
    quantized_ops: dict[str, int]
    tensors: QuantReport | None = None
    budget: BudgetSearch | None = None
    smooth_quant_alpha: float | None = None
    fallback: FallbackChoice | None = None
    speed: SpeedCheck | None = None

    @property
    def evaluation(self) -> Evaluation | None:
        """The result's figures on the budget's data (with a budget), else None."""
        return None if self.budget is None else self.budget.evaluation

    def __str__(self) -> str:
        """The form written and its ops, the worst tensors (static with `report=True`) and the
        budget search, as `slimgraph quantize` prints them."""
        ops = ", ".join(f"{count} {op}" for op, count in self.quantized_ops.items()) or "none"
        label = self.mode if self.format == self.mode else f"{self.mode}, {self.format}"
        lines = [f"quantized ({label}): {ops}"]
        if self.smooth_quant_alpha is not None:
            lines.append(f"SmoothQuant alpha {self.smooth_quant_alpha:g}")
        if self.tensors is not None:
            lines.append(self.tensors.summary())
        if self.budget is not None and self.budget.evaluation is not None:
            lines.append(self.budget.summary())
        if self.fallback is not None and self.fallback.asked == "fp16":
            lines.append(self.fallback.summary())
        return "\n".join(lines)

    def __repr__(self) -> str:
        kept = "" if self.budget is None else f", {len(self.budget.kept)} layer(s) kept float"
        return (f"<QuantizeReport: {self.mode} ({self.format}), "
                f"{sum(self.quantized_ops.values())} quantization ops{kept}>")

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "format": self.format, "quantized_ops": dict(self.quantized_ops),
            "report": None if self.tensors is None else self.tensors.to_dict(),
            "budget": None if self.budget is None else self.budget.to_dict(),
            "smooth_quant_alpha": self.smooth_quant_alpha,
            "fallback": None if self.fallback is None else self.fallback.to_dict(),
        }


@takes_options(QuantizeOptions, order=_ORDER)
def quantize_with_report(
    model: ModelLike, *, calibration: CalibrationData | None = None, options: QuantizeOptions
) -> tuple[ir.Model, QuantizeReport]:
    """`quantize`, also returning the `QuantizeReport` (the form written, its quantization ops,
    the per-tensor SQNR with `report=True`, the budget search with a budget).

    Args: as for `quantize`.

    Returns:
        (quantized model, `QuantizeReport`).

    Raises: as for `quantize`.
    """
    model = as_model(model)
    quantized, report = _quantize(model, calibration, options)
    report.speed = options.guard(model, quantized)
    return quantized, report


@takes_options(QuantizeOptions, order=_ORDER)
def quantize(
    model: ModelLike, *, calibration: CalibrationData | None = None, options: QuantizeOptions
) -> ir.Model:
    """Quantize a float model to int8 (a new model; the input is not modified). Approximate.

    Method: affine int8 quantization (seeds 000, 002): static with calibrated activation ranges
    (QDQ pairs or integer operators), dynamic (activations quantized at run time), or block-wise
    weight-only int4/int8 whose codes come from round-to-nearest, HQQ, GPTQ or AWQ. Takes its
    options as keywords or as `options=` a `QuantizeOptions`; keywords given with `options=`
    replace its fields.

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
        report: measure per-tensor SQNR on the calibration data (static); it is the
            `QuantizeReport`'s `tensors` (`quantize_with_report`; the deprecated
            `slimgraph.report_of(quantized)` still reads it).
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
            sensitive layers float until it holds (`QuantizeUnits`, `api.budget.search_units`;
            the search is the report's `budget`); other modes only check it.
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
        accuracy_level: weight-only 4-bit MatMulNBits' accuracy level (None: 4, int8
            activations; 0: float activations). 8-bit MatMulNBits (the head, `bits=8`) always
            run at level 4, onnxruntime's only fast kernel for them.
        head_bits, embedding_bits: weight-only bits of the head (a MatMul whose output is a
            graph output: an LM head, a classifier) and of embedding tables: 8 unless asked
            (None: `bits`).
        act_order: weight-only GPTQ processes rows by decreasing Hessian diagonal (the
            default; False: in order).
        auto_batch, auto_seq: the batch and sequence length `bits="auto"` times the layers at
            (auto_seq None: the export's example sequence length, else 1).
        fallback: static mode under a budget: the precision of the layers kept out of int8:
            "fp32" (default) or "fp16" (weights stored in float16 and computed in float32,
            kept only when the model is smaller, not slower side by side and still within the
            budget; `passes.quantize.fallback`; the choice is the report's `fallback`).
        equalize: static: cross-layer equalization (Nagel et al. 2019) of Conv/Gemm pairs
            through Relu, Clip(0, c) or nothing, depthwise included, before quantizing
            (`passes.quantize.equalize`; exact in float, checked on the first calibration batch).
        bias_correction: static: each quantized Conv/Gemm's mean output shift per channel,
            measured on the calibration data, subtracted from its bias
            (`passes.quantize.bias_correction`, empirical).
        weight_bits: static: bits of the weights' codes, 8 (default) or 4 (W4A8: codes in
            [-7, 7] stored as int8, read by the same DequantizeLinear).
        round: static: "nearest" (default), "adaround" (each weight rounded up or down as a
            layer-wise reconstruction of the float model's outputs chooses; Nagel et al., 2020)
            or "adaquant" (weights, scales and biases learned against the same loss; Hubara et
            al., 2021), layer by layer on `calibration` through the torch backend
            (`passes.quantize.adaround`); both need calibration data and torch.
        speed_check, allow_slower, speed_batches: the speed guard (`SpeedOptions`; off by
            default in Python): time the result against `model` on onnxruntime at batch 1 and
            64 (or `speed_batches`) and raise `VerificationError` when it is slower beyond
            noise, unless `allow_slower`; `quantize_with_report`'s `report.speed` holds the
            figures.
        options: a `QuantizeOptions` instead of (or under) the keywords.

    Returns:
        The quantized model (float inputs and outputs).

    Raises:
        BadOptionError: an unknown mode, format or method, static mode without calibration
            data, `bias_correction` or `equalize` outside static mode, `round`
            "adaround"/"adaquant" without calibration data, `round` or `weight_bits` outside
            static mode, weight bits other than 4 or 8, an option that does not apply to the
            mode, or `model` neither a model nor a path, an `--exclude` that matches nothing, a
            budget without data, fallback "fp16" without a budget or outside static mode.
        BadDataError: calibration data that does not fit the model's inputs (named), or holds
            NaN/Inf.
        UnsupportedModelError: nothing in the model can be quantized in this mode, `equalize`
            on a model without Conv/Gemm pairs, or the model
            does not run on onnxruntime where it must (the message says to pass verify=False /
            --no-verify for dynamic and weight-only).
        VerificationError: the float model prepared for quantization (constants and BatchNorm
            folded) no longer matches the input model, or the result misses the accuracy budget
            (the measured figure is in the message), or runs slower than the input with
            `speed_check` (the figures in the message).
        ModelLoadError: `model` is a path that cannot be loaded.
        TypeError: an unknown keyword, or `options` that is not a `QuantizeOptions`.

    Example:
        >>> import slimgraph as sg
        >>> q = sg.quantize("model.onnx", calibration="calib.npz")  # doctest: +SKIP
        >>> q, report = sg.quantize_with_report(model, calibration=feeds, report=True)
        ... # doctest: +SKIP
        >>> print(report.tensors.summary())  # doctest: +SKIP
    """
    model = as_model(model)
    quantized = _quantize(model, calibration, options)[0]
    options.guard(model, quantized)
    return quantized


def _quantize(
    model: ir.Model, calibration: CalibrationData | None, options: QuantizeOptions
) -> tuple[ir.Model, QuantizeReport]:
    """The mode's default, then `QuantizePass` once, or the budget search; the report."""
    _check_not_quantized(model)
    options = replace(options, mode=default_mode(options, calibration))  # type: ignore[arg-type]
    asked_budget = any(v is not None for v in (options.budget, options.max_drop,
                                                options.min_cosine))
    check_fallback(options.fallback, budget=asked_budget, mode=options.mode)
    judge = options.judge(model)
    if judge is None:
        quantized = QuantizePass(options, calibration=calibration)(model).model
    else:
        quantized = _quantize_within(model, judge, calibration, options)
        if options.mode == "static":
            quantized = _with_fallback(quantized, judge, options.fallback)
    mode = str(options.mode)
    requested = options.fmt or ("qoperator" if mode == "weight-only" else "qdq")
    form, ops = written_format(quantized, mode, requested)
    report = QuantizeReport(
        mode, form, ops, tensors=quantized.meta.get(metadata.QUANT_REPORT),
        budget=quantized.meta.get(metadata.BUDGET_SEARCH),
        smooth_quant_alpha=quantized.meta.get(metadata.SMOOTH_QUANT_ALPHA),
        fallback=quantized.meta.get(metadata.PRECISION_FALLBACK),
    )
    return quantized, report


def _with_fallback(quantized: ir.Model, judge: BudgetJudge, fallback: str) -> ir.Model:
    """The budget search's result with its float layers in `fallback`'s precision where that
    pays (`passes.quantize.fallback`); the search's evaluation is the final model's."""
    search: BudgetSearch | None = quantized.meta.get(metadata.BUDGET_SEARCH)
    if search is None:
        return quantized
    result, evaluation, choice = apply_fallback(
        quantized, [k.node for k in search.kept], fallback, judge, search.evaluation)
    search.evaluation = evaluation
    result.meta[metadata.PRECISION_FALLBACK] = choice
    return result


def _quantize_within(
    model: ir.Model, judge: BudgetJudge, calibration: CalibrationData | None,
    options: QuantizeOptions,
) -> ir.Model:
    """`quantize` under an accuracy budget: static mode searches the float layers (one
    `StaticSession`: the data is calibrated once for every candidate), the others are checked;
    the search record goes in the result's meta."""
    mode = options.mode
    search = BudgetSearch(f"{mode} quantization", judge.budget.describe())
    if mode == "static" and calibration is not None:
        session = StaticSession(model, calibration, options)
        units = QuantizeUnits(session)
        search = BudgetSearch("int8 quantization", judge.budget.describe())
        keep_float = search_units(units, judge, search)
        if keep_float:
            logger.info("mixed precision: %d of %d layers float", len(keep_float),
                        len(units.units()))
        if options.fmt not in (None, *FORMATS):
            raise BadOptionError(f"unknown format '{options.fmt}' (choose qdq or qoperator)")
        if options.fmt in (None, "qdq") and not options.report and (
            search.candidate is not None
        ):
            # the very model the search measured: no second calibration, no second evaluation
            result = deployable(search.candidate)
            result.meta[metadata.BUDGET_SEARCH] = search
            return result
        result = deployable(session.build(keep_float, report=options.report,
                                          fmt=options.fmt or "qdq"))
    else:
        # checked, not searched; SmoothQuant is not applied under a budget (as before issue 12)
        result = QuantizePass(replace(options.without_budget(), smooth_quant=None),
                              calibration=calibration)(model).model
    report = result.meta.get(metadata.QUANT_REPORT)
    search.evaluation = judge.check(result, what="the quantized model")
    result.meta[metadata.BUDGET_SEARCH] = search
    if report is not None:
        result.meta[metadata.QUANT_REPORT] = report
    return result


class QuantizeUnits:
    """Static quantization of any subset of the layers with a weight, on one `StaticSession`
    (prepared and calibrated once): the `Units` of the budget search and of sensitivity.

    Raises:
        UnsupportedModelError: no Conv, Gemm or MatMul with a float32 constant weight.
    """

    method = "quantize"

    def __init__(self, session: StaticSession) -> None:
        self.session = session
        plan = session.plan()
        by_name = {node.name: node for node in session.prepared.graph}
        self._units = [
            Unit(name, layer_name(by_name[name]), by_name[name].op_type)
            for name in plan.nodes if by_name[name].op_type in WEIGHT_OPS
        ]
        if not self._units:
            raise UnsupportedModelError("nothing to quantize: no Conv, Gemm or MatMul with a "
                                        "float32 constant weight")
        self.setting = f"int8 static, {session.options.method}"

    def units(self) -> list[Unit]:
        return list(self._units)

    def build(self, skip: Sequence[str] = ()) -> ir.Model:
        """The QDQ model with every layer quantized but `skip` (calibration reused)."""
        return self.session.build(skip)

    def only(self, unit: Unit) -> tuple[ir.Model, int | None]:
        return self.build([u.node for u in self._units if u.node != unit.node]), None

    def proxy(self) -> dict[str, float]:
        """Each layer's worst SQNR (dB) on the calibration data, from one per-tensor report of
        the fully quantized model on the first `PROXY_ROWS` calibration rows: its weight's
        round trip and the own SQNR of the activations it quantizes (`report.measure`); the
        budget search ranks layers by it (issue 27)."""
        first = self.session.batches.first()
        rows = {name: array[:PROXY_ROWS] for name, array in first.items()}
        measuring = copy.copy(self.session)  # the same statistics; the report on a few rows
        measuring.batches = [rows]  # type: ignore[assignment]
        report = measuring.build(report=True).meta.get(metadata.QUANT_REPORT)
        worst: dict[str, float] = {}
        for row in () if report is None else report.rows:
            figure = row.own_sqnr_db if row.kind == "activation" else row.sqnr_db
            for node in row.exclude or (row.node,):
                worst[node] = min(worst.get(node, math.inf), figure)
        return {u.node: worst[u.node] for u in self._units if u.node in worst}


# The ops each written form is recognized by (its quantized ops, counted in `quantized_ops`).
_DYNAMIC_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QAttention",
                          "DynamicQuantizeLSTM"})
_INTEGER_OPS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                          "MatMulIntegerToFloat", "QGemm", "QLinearAdd", "QLinearMul",
                          "QLinearConcat", "QLinearGlobalAveragePool", "QLinearSigmoid"})
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_WEIGHT_ONLY_OPS = frozenset({"MatMulNBits", "GatherBlockQuantized"})


def _check_not_quantized(model: ir.Model) -> None:
    """Refuse a model that already holds quantized ops: quantizing it again would calibrate
    dequantized values and stack a second rounding on the first.

    Raises:
        UnsupportedModelError: the ops found, by count (exit 2).
    """
    ops = Counter(node.op_type for node in model.graph.all_nodes()
                  if node.op_type in _DYNAMIC_OPS | _INTEGER_OPS | _QDQ_OPS | _WEIGHT_ONLY_OPS)
    if ops:
        found = ", ".join(f"{count} {op}" for op, count in sorted(ops.items()))
        raise UnsupportedModelError(f"the model is already quantized ({found}): quantize the "
                                    "float model it came from")


def written_format(model: ir.Model, mode: str, requested: str) -> tuple[str, dict[str, int]]:
    """The form a quantized graph is in, read from its ops, and its quantization ops by count:
    `matmulnbits` (MatMulNBits), `dynamic` (activations quantized at run time:
    DynamicQuantizeLinear + MatMulInteger/ConvInteger, or onnxruntime's DynamicQuantizeMatMul /
    QAttention), `qoperator` (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, ...), `qdq`
    (QuantizeLinear/DequantizeLinear pairs, or DequantizeLinear with block_size for weight-only);
    the requested format when the graph has none of these (nothing was quantized)."""
    ops = Counter(node.op_type for node in model.graph.all_nodes())
    quantized = {op: count for op, count in sorted(ops.items())
                 if op in _DYNAMIC_OPS | _INTEGER_OPS | _QDQ_OPS | _WEIGHT_ONLY_OPS}
    if "MatMulNBits" in ops:
        return "matmulnbits", quantized
    if ops.keys() & _DYNAMIC_OPS:
        return "dynamic", quantized
    if ops.keys() & _INTEGER_OPS:
        return "qoperator", quantized
    if ops.keys() & _QDQ_OPS:
        return "qdq", quantized
    return ("matmulnbits" if mode == "weight-only" and requested == "qoperator" else requested,
            quantized)


def report_of(model: ir.Model) -> QuantReport | None:
    """Deprecated: the per-tensor report is `quantize_with_report(...)[1].tensors`.

    The `QuantReport` a `quantize(..., report=True)` call attached to its result, or None.

    Raises:
        Nothing: any model is accepted (a DeprecationWarning is issued).
    """
    warnings.warn("report_of is deprecated: use quantize_with_report(...)[1].tensors",
                  DeprecationWarning, stacklevel=2)
    return model.meta.get(metadata.QUANT_REPORT)


def budget_search_of(model: ir.Model) -> BudgetSearch | None:
    """Deprecated: the budget search is `quantize_with_report(...)[1].budget`.

    The `BudgetSearch` a `quantize(..., max_drop=/min_cosine=)` call attached, or None.

    Raises:
        Nothing: a model without the record gives None (a DeprecationWarning is issued).
    """
    warnings.warn("budget_search_of is deprecated: use quantize_with_report(...)[1].budget",
                  DeprecationWarning, stacklevel=2)
    return model.meta.get(metadata.BUDGET_SEARCH)

