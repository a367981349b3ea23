"""`slimgraph optimize MODEL -o OUT [--preset NAME | --recipe FILE] [--opset N] [--report DIR]`.

Runs a preset (default `lossless`: exact cleanup + fusion) or a recipe on the model, verifying
every pass on onnxruntime, prints one line per pass (name, exact or approximate, nodes before ->
after, time, fidelity) and writes OUT atomically, only when every pass succeeded. The input keeps
its opset unless `--opset N` asks for onnx's version converter (verified like a pass).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slimgraph import ir as sg_ir
from slimgraph import runtime
from slimgraph.errors import OutputPathError
from slimgraph.passes.pipeline import PipelineResult, node_count, optimize_report
from slimgraph.runtime.metrics import load_data
from slimgraph.tools.budget_args import add_budget_arguments, describe_evaluation, judge_from_args
from slimgraph.tools.tables import emit, render_table, to_json

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "optimize",
        help="run a preset or recipe of verified passes (default: lossless cleanup + fusion)",
        description=(
            "Optimize a model with a preset or a recipe of passes. Every pass that changes the "
            "model is checked on onnxruntime; an exact pass that changes the outputs stops the run "
            "with exit code 1 and nothing is written."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="the input .onnx model (never modified)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="the output .onnx")
    parser.add_argument(
        "--preset", default="lossless", help="preset name (default: lossless)"
    )
    parser.add_argument(
        "--recipe", metavar="FILE", help="YAML/JSON list of passes (replaces --preset)"
    )
    parser.add_argument(
        "--opset", type=int, default=None, help="convert to this opset first (verified)"
    )
    parser.add_argument(
        "--data",
        metavar="DATA.npz",
        help="verification inputs: keys = input names, stacked on axis 0 (default: random)",
    )
    parser.add_argument(
        "--calib",
        metavar="DATA.npz",
        help="calibration data for passes that take it (quantization in a recipe)",
    )
    parser.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip onnxruntime checks"
    )
    parser.add_argument(
        "--report",
        metavar="DIR",
        help="also write report.json and report.txt (what each pass did) into DIR",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_budget_arguments(parser, data=False)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    source = Path(args.model)
    target = Path(args.output)
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise OutputPathError(f"{target}: refusing to write over the input model")
    model = sg_ir.load(source)
    feeds = None
    judge = judge_from_args(args, model, data_for_budget=False)
    data = None
    if args.data:
        data = judge.data if judge is not None else load_data(args.data, model,
                                                               labels=args.labels)
        feeds = [batch for _, batch in zip(range(4), runtime.iter_batches(data.feeds, 8, model),
                                           strict=False)]
    calibration = load_data(args.calib, model).feeds if args.calib else None  # labels ignored
    before = node_count(model)
    result = optimize_report(
        model,
        preset=None if args.recipe else args.preset,
        recipe=args.recipe,
        verify=args.verify,
        feeds=feeds,
        opset=args.opset,
        calibration=calibration,
        data=data,
        budget=None if judge is None else judge.budget,
    )
    report_dir = Path(args.report) if args.report else None
    if report_dir is not None and report_dir.exists() and not report_dir.is_dir():
        raise OutputPathError(f"--report {report_dir}: exists and is not a folder")
    sg_ir.save(result.model, target)
    after = node_count(result.model)
    data_out = result.to_dict()
    data_out.update(
        {"input": str(source), "output": str(target), "nodes_before": before,
         "nodes_after": after, "verified": args.verify}
    )
    text = _render(result, before, after, target, args.verify)
    if result.evaluation is not None and judge is not None:
        text += "\n" + describe_evaluation(result.evaluation, judge)
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "report.json").write_text(to_json(data_out) + "\n")
        (report_dir / "report.txt").write_text(text + "\n")
    emit(to_json(data_out) if args.json else text)
    return 0


def _render(result: PipelineResult, before: int, after: int, target: Path, verify: bool) -> str:
    rows = []
    for record in result.records:
        if not record.modified:
            fidelity = "no change"
        elif record.metadata_only:
            fidelity = "metadata only"
        elif record.fidelity is None:
            fidelity = "not verified"
        else:
            worst = max(record.fidelity.outputs, key=lambda o: o.max_abs_error)
            fidelity = (
                f"max err {worst.max_abs_error:.2e}  cos {record.fidelity.worst_cosine:.6f}"
            )
        rows.append(
            [
                record.name,
                "exact" if record.exact else "approx",
                f"{record.nodes_before} -> {record.nodes_after}",
                f"{(record.seconds + record.verify_seconds) * 1000:.0f} ms",
                fidelity,
            ]
        )
    table = render_table(["pass", "kind", "nodes", "time", "fidelity"], rows, align="llrrl")
    summary = f"nodes {before} -> {after}"
    if result.fidelity is not None:
        worst = max(result.fidelity.outputs, key=lambda o: o.max_abs_error)
        summary += (
            f"; outputs vs input model: max abs err {worst.max_abs_error:.2e}, "
            f"cosine {result.fidelity.worst_cosine:.6f}"
        )
    elif not verify:
        summary += "; not verified (--no-verify)"
    return f"{table}\n{summary}\nwrote {target}"
