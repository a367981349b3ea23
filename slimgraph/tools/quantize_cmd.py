"""`slimgraph quantize MODEL -o OUT [--calib DATA.npz] ...`: int8 quantization.

Static when `--calib` is given (calibrated QDQ or QOperator, with the per-tensor SQNR report),
weight-only when `--method` names a weight-only method (rtn, hqq, gptq, awq; gptq and awq take
`--calib`) or `--bits auto` is asked, else dynamic, unless `--mode` says otherwise. `--bits auto`
times each MatMul as int4, dynamic int8 and float32 at `--batch` x `--seq` and keeps the fastest.
Every mode prints the output fidelity (cosine, SQNR, top-1 agreement) against the input model: on
`--data` when given (with both models' accuracy when it has labels, their perplexity when they
are language models), else on the calibration data (static mode, GPTQ/AWQ's `--calib`) and the
other modes on random inputs, which the output says. `--json` prints one object instead, whose
`format` is the form the written graph is in (`qdq`, `qoperator`, `dynamic`, `matmulnbits`).
The output is written atomically, never over the input.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any, Literal, cast

import onnx_ir as ir

import slimgraph.ir as sg_ir
from slimgraph._tables import format_bytes
from slimgraph.api.quantize import quantize_with_report
from slimgraph.errors import BadOptionError
from slimgraph.ir import metadata
from slimgraph.passes.quantize.adaround import ROUNDINGS, WEIGHT_BITS
from slimgraph.passes.quantize.fallback import FALLBACKS, check_fallback
from slimgraph.passes.quantize.report import QuantReport
from slimgraph.passes.quantize.speed_fallback import dynamic_note
from slimgraph.passes.quantize.weight_only import METHODS as WEIGHT_ONLY_METHODS
from slimgraph.passes.registry import COMMAND_STEPS
from slimgraph.runtime.compare import Fidelity, compare
from slimgraph.runtime.histogram import METHODS
from slimgraph.runtime.torch_backend import zero_shot_calibration, zero_shot_options
from slimgraph.tools._common import (
    Compression,
    Figures,
    add_json_option,
    add_model_arguments,
    add_speed_arguments,
)
from slimgraph.tools.budget_args import add_budget_arguments
from slimgraph.tools.report import MAX_BARS, add_report_option

__all__ = ["register", "run"]




def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="int8 quantization: static (with --calib), dynamic or weight-only",
        description=(
            "Quantize a float ONNX model. With --calib the model is calibrated on the data and "
            "quantized statically (QDQ by default), and the worst tensors by SQNR are printed; "
            "their node names can be passed to --exclude."
        ),
    )
    add_model_arguments(parser, "the float .onnx model")
    parser.add_argument("--mode", choices=tuple(COMMAND_STEPS["quantize"].modes), default=None,
                        help="default: static with --calib, else dynamic")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="dynamic/weight-only: do not run the model on onnxruntime to check "
                             "the folding before quantization (models with custom ops)")
    parser.add_argument("--calib", metavar="DATA.npz",
                        help="calibration data: keys = input names, stacked on axis 0")
    parser.add_argument("--method", choices=(*METHODS, *WEIGHT_ONLY_METHODS), default=None,
                        help="static: activation range calibrator (default minmax; with "
                        "--zero-shot, percentile); "
                        "weight-only: rtn (round-to-nearest, default), hqq (no data), gptq or "
                        "awq (with --calib)")
    parser.add_argument("--percentile", type=float, default=99.99,
                        help="for --method percentile (default 99.99)")
    granularity = parser.add_mutually_exclusive_group()
    granularity.add_argument("--per-channel", dest="per_channel", action="store_true",
                             default=True, help="per-channel weight scales (default)")
    granularity.add_argument("--per-tensor", dest="per_channel", action="store_false",
                             help="one scale per weight")
    parser.add_argument("--format", dest="fmt", choices=("qdq", "qoperator", "matmulnbits"),
                        default=None,
                        help="QDQ pairs (default, portable) or QLinearConv/QLinearMatMul and "
                        "onnxruntime's MatMulIntegerToFloat (faster on transformers: bias fused); "
                        "weight-only: MatMulNBits (default) or qdq (DequantizeLinear block_size)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NAME_OR_PATTERN",
                        help="node, layer or tensor names (fnmatch patterns) left in float")
    parser.add_argument("--exclude-op", dest="exclude_ops", nargs="+", default=[],
                        metavar="OP", help="op types left in float")
    parser.add_argument("--include-op", dest="include_ops", nargs="+", default=[],
                        metavar="OP", help="static: op types left float by default to quantize "
                        "anyway (Softmax, Where, LayerNormalization, ...; MatMul adds the "
                        "attention MatMuls of two activations); usually less accurate")
    parser.add_argument("--activations", dest="activation_dtype", default="auto",
                        choices=("auto", "uint8", "int8"),
                        help="activation type (auto: uint8 on x86, where it runs fastest)")
    parser.add_argument("--smooth-quant", dest="smooth_quant", nargs="?", const="auto",
                        default=None, metavar="ALPHA|auto",
                        help="static: SmoothQuant (activation outliers moved into the weights) "
                        "before quantizing; alpha in [0, 1] or auto (searched on --calib)")
    parser.add_argument("--equalize", action="store_true",
                        help="static: cross-layer equalization of Conv/Gemm pairs before "
                        "quantizing (exact in float; helps per-tensor int8 of depthwise nets)")
    parser.add_argument("--bias-correction", dest="bias_correction", action="store_true",
                        help="static: subtract each quantized layer's mean output shift, "
                        "measured on --calib, from its bias")
    parser.add_argument("--weight-bits", dest="weight_bits", type=int, choices=WEIGHT_BITS,
                        default=8, help="static: bits of the weights' codes (default 8; 4: W4A8, "
                        "codes in [-7, 7] stored as int8)")
    parser.add_argument("--round", dest="round", choices=ROUNDINGS, default="nearest",
                        help="static: how weights round to their grid: nearest (default), "
                        "adaround (learned up or down per weight) or adaquant (learned weights, "
                        "scales and biases), layer by layer against the float model on --calib "
                        "(needs torch)")
    parser.add_argument("--zero-shot", dest="zero_shot", action="store_true",
                        help="static int8 without data: calibrate on inputs synthesized to match "
                        "the model's BatchNorm statistics (needs BatchNorm nodes and torch)")
    parser.add_argument("--zero-shot-samples", dest="zero_shot_samples", type=int, default=64,
                        help="synthesized calibration rows for --zero-shot (default 64)")
    parser.add_argument("--zero-shot-time", dest="zero_shot_time", type=float, default=120.0,
                        metavar="SECONDS",
                        help="time budget of the --zero-shot synthesis (default 120); it stops "
                        "earlier when the BatchNorm-statistics loss stops improving")
    parser.add_argument("--fallback", choices=FALLBACKS, default="fp32",
                        help="static with --max-drop/--min-cosine: precision of the layers the "
                        "budget keeps out of int8: fp32 (default) or fp16 weights computed in "
                        "fp32, kept only when smaller, not slower and within the budget")
    parser.add_argument("--bits", choices=("4", "8", "auto"), default="4",
                        help="weight-only: bits (default 4); auto: each MatMul int4, dynamic "
                        "int8 or float32, whichever onnxruntime runs fastest here at --batch x "
                        "--seq")
    parser.add_argument("--block-size", type=int, default=32,
                        help="weight-only: rows of K per scale (default 32)")
    parser.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=None,
                        help="weight-only MatMulNBits: 4 (default) computes with int8 "
                        "activations, 0 in float")
    parser.add_argument("--head-bits", type=int, choices=(4, 8), default=8,
                        help="weight-only: bits of the head (a MatMul whose output is a graph "
                        "output, e.g. an LM head; default 8)")
    parser.add_argument("--embedding-bits", type=int, choices=(4, 8), default=8,
                        help="weight-only: bits of embedding tables (default 8)")
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                        help="weight-only gptq: rows in order of decreasing Hessian diagonal "
                        "(default; --no-act-order: in order)")
    parser.add_argument("--batch", type=int, default=None,
                        help="calibration rows per run (default 32); --bits auto: the batch "
                        "the layers are timed at (default 1); the batch the speed check times "
                        "at (default 1 and 64)")
    parser.add_argument("--seq", type=int, default=None,
                        help="--bits auto: the sequence length the layers are timed at "
                        "(default: the export's example length, else 1)")
    parser.add_argument("--no-speed-fallback", dest="speed_fallback", action="store_false",
                        help="static: quantize every layer, even those whose int8 form is "
                        "timed slower than float here (by default they stay float)")
    parser.add_argument("--top", type=int, default=8, help="worst tensors to print (default 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_option(parser)
    add_report_option(parser, "per-tensor SQNR, size before and after")
    add_budget_arguments(parser)
    add_speed_arguments(parser, batch=False)
    parser.set_defaults(handler=run)


Mode = Literal["static", "dynamic", "weight-only"]


def run(args: argparse.Namespace) -> int:
    def check() -> None:
        if args.batch is not None and args.batch < 1:
            raise BadOptionError(f"--batch must be at least 1, got {args.batch}")
        if args.seq is not None and args.seq < 1:
            raise BadOptionError(f"--seq must be at least 1, got {args.seq}")
        if args.zero_shot and args.calib:
            raise BadOptionError("--zero-shot synthesizes the calibration data: leave out --calib")
        mode = _mode(args)
        if mode == "dynamic" and (args.calib or args.zero_shot):
            option = "--calib" if args.calib else "--zero-shot"
            raise BadOptionError(
                f"{option} is only used by static quantization, not --mode {mode}"
            )
        if mode == "weight-only" and args.zero_shot:
            raise BadOptionError("--zero-shot is only used by static quantization, not --mode "
                                 "weight-only")
        if args.zero_shot_time <= 0:
            raise BadOptionError(f"--zero-shot-time must be positive, got {args.zero_shot_time:g}")
        check_fallback(args.fallback, mode=mode,
                       budget=args.max_drop is not None or args.min_cosine is not None)
        if mode != "weight-only" and args.method in WEIGHT_ONLY_METHODS:
            raise BadOptionError(f"--method {args.method} is a weight-only method: not for "
                                 f"--mode {mode}")
        if mode == "weight-only" and args.method is not None and (
            args.method not in WEIGHT_ONLY_METHODS
        ):
            raise BadOptionError(f"--method {args.method} is a static calibrator; weight-only "
                                 f"methods: {', '.join(WEIGHT_ONLY_METHODS)}")

    # --data is the budget's data and, with or without a budget, where fidelity is measured
    job = Compression(args, check=check, data_for_budget=False)
    mode = _mode(args)
    fmt = args.fmt or ("qoperator" if mode == "weight-only" else "qdq")
    if fmt == "matmulnbits" and mode == "weight-only":
        fmt = "qoperator"
    bits = args.bits if args.bits == "auto" else int(args.bits)
    calibration: object = args.calib
    zero_shot: dict[str, Any] = {"method": "minmax", "range_bounds": None}
    if args.zero_shot:  # seed 002: inputs whose per-layer statistics match BatchNorm's
        calibration = zero_shot_calibration(
            job.model, samples=args.zero_shot_samples, time_budget=args.zero_shot_time,
            progress=False if args.no_progress or args.json else None)
        zero_shot = zero_shot_options(job.model)  # percentile, BatchNorm bounds
    quantized, result = quantize_with_report(
        job.model,
        calibration=calibration,  # type: ignore[arg-type]
        mode=mode,
        method=args.method or ("rtn" if mode == "weight-only" else zero_shot["method"]),
        per_channel=args.per_channel,
        fmt=fmt,
        exclude=args.exclude,
        exclude_ops=args.exclude_ops,
        include_ops=args.include_ops,
        activation_dtype=args.activation_dtype,
        report=mode == "static",
        bits=bits,
        block_size=args.block_size,
        batch_size=args.batch or 32,
        progress=False if args.no_progress or args.json else None,
        percentile=args.percentile,
        data=job.budget_data,
        budget=job.budget,
        verify=args.verify,
        smooth_quant=args.smooth_quant,
        equalize=args.equalize, bias_correction=args.bias_correction,
        accuracy_level=args.accuracy_level,
        head_bits=args.head_bits,
        embedding_bits=args.embedding_bits,
        act_order=args.act_order,
        auto_batch=args.batch or 1,
        auto_seq=args.seq,
        fallback=args.fallback,
        weight_bits=args.weight_bits,
        range_bounds=zero_shot["range_bounds"],
        round=args.round,
        speed_fallback=args.speed_fallback,
    )
    job.write(quantized)
    fmt_label, quantized_ops, search = result.format, result.quantized_ops, result.budget
    size_in, size_out = sg_ir.size_on_disk(job.source, job.model), sg_ir.size_on_disk(job.target)
    report = result.tensors
    fidelity = _fidelity(job, quantized, report, calib=args.calib, verify=args.verify)
    out: dict[str, object] = {
        "input": str(job.source), "output": str(job.target), "mode": mode, "format": fmt_label,
        "quantized_ops": quantized_ops, "size_bytes": size_out, "input_size_bytes": size_in,
        "size_ratio": size_out / size_in,
        "fidelity": None if fidelity is None else fidelity.to_dict(),
    }
    if report is not None:
        out["report"] = report.to_dict()
    if search is not None:
        out["budget"] = search.to_dict()
    lines = [
        f"wrote {job.target} ({mode}{'' if fmt_label == mode else ', ' + fmt_label}): "
        f"{format_bytes(size_out)}, "
        f"{size_out / size_in:.3f}x of {format_bytes(size_in)}",
    ]
    chosen = quantized.meta.get(metadata.AUTO_BITS)
    if chosen is not None:
        out["auto_bits"] = {"batch": chosen.batch, "seq": chosen.seq, "forms": dict(chosen.forms),
                            "timings": [{"k": t.k, "n": t.n, "m": t.m, "bits": t.nbits,
                                         "median_ms": dict(t.times),
                                         "faster_than_int8": dict(t.faster or {}),
                                         "choice": t.choice}
                                        for t in chosen.timings]}
        lines.append(chosen.summary())
    if report is not None:
        lines.append(report.summary(top=args.top))
    fallback = quantized.meta.get(metadata.SPEED_FALLBACK)
    if fallback is not None:
        out["speed_fallback"] = fallback.to_dict()
        lines.append(fallback.summary())
    note = dynamic_note(job.model) if mode == "dynamic" and args.mode is None else None
    if note is not None:
        out["note"] = note
        lines.append(note)
    if fidelity is not None and (report is None or args.data):
        lines += fidelity.summary_lines()
    elif fidelity is None:
        lines.append("fidelity not measured: --no-verify does not run the model")
    if search is not None:
        lines += job.budget_lines(search.evaluation, search)
    if result.fallback is not None:
        out["fallback"] = result.fallback.to_dict()
        if result.fallback.asked == "fp16":
            lines.append(result.fallback.summary())
    return job.finish(out, "\n".join(lines), lambda figures: _page(job, out, report, figures))


def _fidelity(
    job: Compression, quantized: ir.Model, report: QuantReport | None, *, calib: str | None,
    verify: bool,
) -> Fidelity | None:
    """The output fidelity to MODEL: on --data when given; else the static report's (the
    calibration data), else on --calib (GPTQ/AWQ's calibration rows), or random inputs for
    the modes that have no data; None with --no-verify (a model onnxruntime may not run)."""
    data = job.data()
    if data is not None:
        return compare(job.model, quantized, data)
    if report is not None:
        return replace(report.outputs, data=f"the calibration data ({report.outputs.samples} "
                                            "samples)")
    if not verify:
        return None
    # random inputs are a poor stand-in for the user's rows (token ids of 0 and 1)
    return compare(job.model, quantized, calib) if calib else compare(job.model, quantized)


def _mode(args: argparse.Namespace) -> Mode:
    """`--mode`, else weight-only with a weight-only `--method` or `--bits auto`, static with
    `--calib` or `--zero-shot`, else dynamic."""
    if args.mode:
        return cast(Mode, args.mode)
    if args.method in WEIGHT_ONLY_METHODS or args.bits == "auto":
        return "weight-only"
    return "static" if args.calib or args.zero_shot else "dynamic"


def _page(
    job: Compression, out: dict[str, object], report: QuantReport | None, figures: Figures
) -> dict[str, object]:
    """The report dict (tools.report schema): sizes before/after and per-tensor SQNR bars."""
    summary: dict[str, object] = {"mode": f"{out['mode']} ({out['format']})", **figures[0]}
    plots: list[dict[str, object]] = [figures[1]]
    tables: list[dict[str, object]] = []
    if report is not None:
        summary["quantized nodes"] = f"{report.quantized_nodes} ({report.float_nodes} float)"
        summary["output cosine"] = f"{report.outputs.worst_cosine:.5f}"
        summary["output SQNR"] = f"{report.outputs.worst_sqnr_db:.1f} dB"
        rows = report.rows[:MAX_BARS]
        names = [f"{r.layer or r.node} [{'weight' if r.kind == 'weight' else 'act'}]"
                 for r in rows]
        plots.insert(0, {
            "kind": "barh", "title": f"Per-tensor SQNR, worst {len(rows)} of {len(report.rows)}",
            "x_label": "SQNR (dB, higher is better)",
            "series": [
                {"name": "own (this tensor's quantization)", "x": names,
                 "y": [r.own_sqnr_db for r in rows]},
                {"name": "accumulated (vs fp32 model)", "x": names,
                 "y": [r.sqnr_db for r in rows]},
            ],
            "description": "Torch layer names; [act] is the layer's output activation, [weight] "
                           "its weight. --exclude takes the node names listed in the table.",
        })
        tables.append({
            "title": "Tensors by SQNR (worst first)",
            "columns": ["layer", "node", "kind", "op", "own SQNR dB", "accumulated SQNR dB"],
            "rows": [[r.layer, r.node, r.kind, r.op_type, r.own_sqnr_db, r.sqnr_db]
                     for r in report.rows],
        })
    return job.page("Quantize", summary=summary, plots=plots, tables=tables, result=out)
