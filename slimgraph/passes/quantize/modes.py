"""The quantization modes, chosen and run: `QuantizePass` and the pipeline's `quantize` step.

Static (calibration data given): a `StaticSession` prepares, plans, calibrates and inserts Q/DQ
(`static`), after SmoothQuant when asked (`smoothquant`); dynamic and weight-only modes prepare
(`prepare`) and call their own passes (`dynamic`, `weight_only`), dynamic mode after the
`transformer` preset's fusions on a model with unfused attention. The result is the deployable
model. The public `slimgraph.quantize` (`slimgraph.api.quantize`) runs `QuantizePass` once, or a
budget search built on `StaticSession`; the pipeline's `quantize` step (`StaticQuantizePass`) is
the same pass with `StaticOptions`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import onnx_ir as ir

import slimgraph.passes.quantize.auto_bits as auto_bits
import slimgraph.passes.quantize.weight_only as weight_only
from slimgraph.errors import BadOptionError
from slimgraph.ir import metadata
from slimgraph.passes.base import SlimgraphFunctionalPass, SlimgraphPassResult
from slimgraph.passes.cleanup import StripDebugMetadataPass
from slimgraph.passes.pipeline import run_pipeline
from slimgraph.passes.quantize.adaround import check_rounding
from slimgraph.passes.quantize.bias_correction import NO_CALIBRATION
from slimgraph.passes.quantize.dynamic import quantize_dynamic
from slimgraph.passes.quantize.options import QuantizeOptions, StaticOptions
from slimgraph.passes.quantize.prepare import check_exclusions, generated_feed, prepare
from slimgraph.passes.quantize.smoothquant import smooth_and_quantize
from slimgraph.passes.quantize.speed_fallback import slow_layers
from slimgraph.passes.quantize.static import StaticSession
from slimgraph.passes.registry import register_pass, register_preset
from slimgraph.passes.transformer import (
    ResidualSumPass,
    TanhGeluPass,
    find_attention,
    has_fused_attention,
    has_residual_sums,
)
from slimgraph.runtime.calibrate import CalibrationData
from slimgraph.runtime.feeds import random_feeds
from slimgraph.runtime.histogram import METHODS

__all__ = ["FORMATS", "QuantizePass", "StaticQuantizePass", "default_mode", "deployable"]

logger = logging.getLogger(__name__)

FORMATS = ("qdq", "qoperator")


def default_mode(options: QuantizeOptions, calibration: CalibrationData | None) -> str:
    """The mode `options` ask for: theirs, else weight-only with a weight-only method, else
    static with calibration data, else dynamic."""
    return options.mode or (
        "weight-only" if options.method in weight_only.METHODS
        else "static" if calibration is not None else "dynamic")


class QuantizePass(SlimgraphFunctionalPass):
    """Quantize a float model in any mode, as `slimgraph.quantize` describes (approximate).

    The one place the modes are chosen and run: static (calibrated QDQ or QOperator, optionally
    after SmoothQuant), dynamic, weight-only. The result is the
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
    """`QuantizePass`'s work: the mode's default, then the mode."""
    keep_sums = has_residual_sums(model)  # `transformer` preset output: keep its residual Sums

    def _finish(quantized: ir.Model) -> ir.Model:
        if keep_sums:
            quantized = ResidualSumPass()(quantized).model
        return deployable(quantized)

    mode = default_mode(options, calibration)
    options = replace(options, mode=mode)  # type: ignore[arg-type]
    fmt = options.fmt
    if fmt is None or (fmt == "matmulnbits" and mode == "weight-only"):
        fmt = "qoperator" if mode == "weight-only" else "qdq"
    if fmt not in FORMATS:
        raise BadOptionError(f"unknown format '{fmt}' (choose qdq or qoperator)")
    options = replace(options, fmt=fmt)
    check_exclusions(model, options.exclude, options.exclude_ops)
    if options.include_ops and mode != "static":
        raise BadOptionError.worded(
            "{include} applies to static quantization (with {calib}), not to {mode} mode",
            include=("include_ops=", "--include-op"), calib=("calibration=", "--calib"),
            mode=mode)
    _check_rounding_mode(options, calibration, mode)
    if options.range_bounds is not None and mode != "static":  # (--zero-shot is refused first)
        raise BadOptionError(
            f"range_bounds= applies to static quantization, not to {mode} mode")
    smooth_quant = options.smooth_quant
    if mode == "static":
        if calibration is None:
            raise BadOptionError.worded("static quantization needs calibration data ({calib})",
                                        calib=("calibration=", "--calib DATA.npz"))
        session = StaticSession(model, calibration, options)
        if smooth_quant is not None and smooth_quant is not False:
            return _finish(smooth_and_quantize(session, smooth_quant, report=options.report,
                                               fmt=options.fmt))
        if not options.speed_fallback:
            return _finish(session.build(report=options.report, fmt=options.fmt))
        fallback = slow_layers(session.prepared, session.plan().nodes, batch=options.auto_batch,
                               activation_dtype=options.activation_dtype)
        quantized = _finish(session.build(fallback.kept_float, report=options.report,
                                          fmt=options.fmt))
        quantized.meta[metadata.SPEED_FALLBACK] = fallback
        return quantized
    if options.bias_correction:  # needs the calibration data static mode has
        raise BadOptionError.worded(NO_CALIBRATION if calibration is None else
                                    "{bias} applies to static quantization, not to {mode} mode",
                                    bias=("bias_correction=", "--bias-correction"), mode=mode,
                                    calib=("calibration=", "--calib DATA.npz"))
    if options.equalize:
        raise BadOptionError.worded("{equalize} applies to static quantization (with {calib}), "
                                    "not to {mode} mode", equalize=("equalize=", "--equalize"),
                                    calib=("calibration=", "--calib"), mode=mode)
    if smooth_quant is not None and smooth_quant is not False:
        raise BadOptionError.worded("{smooth} applies to static quantization, not to {mode} mode",
                                    smooth=("smooth_quant=", "--smooth-quant"), mode=mode)
    settings = _weight_only_settings(options, calibration) if mode == "weight-only" else None
    if mode in ("dynamic", "weight-only"):
        # Weights built at run time (ConstantOfShape in old exports, Transpose/Cast chains in
        # dynamo exports) become constants first, as for static mode; checked on random inputs.
        model = prepare(
            model, generated_feed(model) if options.verify else None,
            matmul_to_gemm=mode != "weight-only",
        )
        if options.transformer:
            model, fused = _transformer_rewrites(model, options.verify)
            keep_sums = keep_sums or fused
    if mode == "dynamic":
        if options.transformer and has_fused_attention(model):
            model = TanhGeluPass()(model).model  # fused by the preset before: GELUs in erf form
        return _finish(quantize_dynamic(
            model, per_channel=options.per_channel, exclude=tuple(options.exclude),
            exclude_ops=tuple(options.exclude_ops),
        ))
    if settings is not None:
        return _finish(_weight_only(model, calibration, options, settings))
    raise BadOptionError(f"unknown mode '{mode}' (choose static, dynamic or weight-only)")


def _check_rounding_mode(
    options: QuantizeOptions, calibration: CalibrationData | None, mode: str
) -> None:
    """`round` and `weight_bits` are static quantization's (learned rounding needs data).

    Raises:
        BadOptionError: learned rounding without calibration data, or either option in another
            mode.
    """
    check_rounding(options.weight_bits, options.round)
    if options.round != "nearest" and options.bias_correction:
        raise BadOptionError.worded(
            "{bias} and {round} do not combine: learned rounding fits each layer's output to "
            "the float model's itself (AdaQuant its bias too); choose one",
            bias=("bias_correction=True", "--bias-correction"),
            round=(f"round={options.round!r}", f"--round {options.round}"))
    if options.round != "nearest" and calibration is None:
        raise BadOptionError.worded(
            "{round} needs calibration data ({calib})",
            round=(f"round={options.round!r}", f"--round {options.round}"),
            calib=("calibration=", "--calib DATA.npz"))
    if mode != "static" and (options.round != "nearest" or options.weight_bits != 8):
        what = (("round=", "--round") if options.round != "nearest"
                else ("weight_bits=", "--weight-bits"))
        raise BadOptionError.worded("{opt} applies to static quantization, not to {mode} mode",
                                    opt=what, mode=mode)


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
    if has_fused_attention(model) or not find_attention(model.graph)[0]:
        return model, False
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


def deployable(model: ir.Model) -> ir.Model:
    """The quantized model is a deployment artifact: drop the exporter's debug metadata and
    slimgraph's working marks."""
    return StripDebugMetadataPass(working_marks=True)(model).model


@register_pass("quantize", exact=False)
class StaticQuantizePass(QuantizePass):
    """Calibrated static int8 quantization as a pipeline step (approximate: fidelity reported).

    Takes its calibration data from the pipeline's context (`optimize(..., calibration=...)`,
    `slimgraph optimize --calib DATA.npz`) unless given directly; the options are
    `StaticOptions`' (see `static.quantize_static`). The result is the same deployable model as
    `sg.quantize` and `slimgraph quantize` write (it runs the same `QuantizePass` work).
    `speed_fallback` comes from the context too: `sweep` turns it off in its jobs, which run in
    parallel and must not time anything (the sweep times its candidates itself, serially).
    """

    options_from = StaticOptions

    def __init__(
        self, *, calibration: CalibrationData | None = None, speed_fallback: bool = True,
        **options: Any,
    ) -> None:
        static = StaticOptions(**options)
        super().__init__(
            QuantizeOptions(mode="static", progress=False, speed_fallback=speed_fallback,
                            **vars(static)),
            calibration=calibration,
        )

    def requires(self, model: ir.Model) -> None:
        if self.calibration is None:
            raise BadOptionError(
                "the 'quantize' step needs calibration data (--calib DATA.npz, or calibration=)"
            )


# Exact cleanup and fusion, then calibrated static int8: `slimgraph optimize --preset int8 --calib`.
register_preset("int8", ["lossless", "quantize"])
