"""`slimgraph optimize MODEL -o OUT [--preset NAME | --recipe FILE] [--opset N] [--report DIR]`.

Runs a preset (default `lossless`: exact cleanup + fusion) or a recipe on the model, verifying
every pass on onnxruntime, prints one line per pass (name, exact or approximate, nodes before ->
after, time, fidelity) and writes OUT atomically, only when every pass succeeded. The input keeps
its opset unless `--opset N` asks for onnx's version converter (verified like a pass).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import slimgraph.runtime as runtime
from slimgraph._tables import emit
from slimgraph.api.optimize import optimize_report
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.passes.pipeline import PipelineResult, describe_passes, node_count
from slimgraph.runtime.metrics import load_data
from slimgraph.tools._common import Compression, Figures, add_json_option, add_speed_arguments
from slimgraph.tools.budget_args import add_budget_arguments
from slimgraph.tools.report import add_report_option, command_line

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
    parser.add_argument(
        "model", metavar="MODEL", nargs="?", help="the input .onnx model (never modified)"
    )
    parser.add_argument("-o", "--output", metavar="OUT", help="the output .onnx (required)")
    parser.add_argument(
        "--list-passes", dest="list_passes", action="store_true",
        help="list the passes (with their options), presets and command steps, then exit",
    )  # fmt: skip
    parser.add_argument(
        "--preset", default="lossless",
        help="preset name: lossless (default), cleanup-only, int8 (see --list-passes)",
    )  # fmt: skip
    parser.add_argument(
        "--recipe", metavar="FILE",
        help="a YAML/JSON recipe (replaces --preset): `version: 1` and `steps:`, a list of pass, "
        "preset or command names (factorize, quantize, convert, prune) or mappings "
        "`name: ...` with options as on the command line (rank-ratio: 0.5); --list-passes "
        "shows them all, docs/recipes.md the format",
    )  # fmt: skip
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
    add_report_option(parser, "what each pass did: time, nodes, fidelity")
    add_json_option(parser)
    add_budget_arguments(parser, data=False)
    add_speed_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.list_passes:
        emit(describe_passes())
        return 0
    if args.model is None or args.output is None:
        missing = [n for n, v in (("MODEL", args.model), ("-o/--output", args.output)) if not v]
        raise BadOptionError(f"the following arguments are required: {', '.join(missing)}")
    job = Compression(args, data_for_budget=False, optimized_baseline=False)
    model = job.model
    data = job.data()
    feeds = None if data is None else [
        batch for _, batch in zip(range(4), runtime.iter_batches(data.feeds, 8, model),
                                  strict=False)]  # fmt: skip
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
        budget=job.budget,
    )
    if not any(record.modified for record in result.records):
        what = f"the recipe {args.recipe}" if args.recipe else f"--preset {args.preset}"
        raise UnsupportedModelError(f"nothing to optimize: no pass of {what} changes the model "
                                    f"({before} nodes; it is already in that form)")
    job.write(result.model)
    after = node_count(result.model)
    data_out = result.to_dict()
    data_out.update(
        {"input": str(job.source), "output": str(job.target), "nodes_before": before,
         "nodes_after": after, "verified": args.verify}
    )
    text = "\n".join([result.describe(not_verified="not verified (--no-verify)"),
                      f"wrote {job.target}", *job.budget_lines(result.evaluation)])  # fmt: skip
    return job.finish(data_out, text, lambda figures: _page(args, data_out, result, figures))


def _page(
    args: argparse.Namespace,
    data: dict[str, object],
    result: PipelineResult,
    figures: Figures,
) -> dict[str, object]:
    """The report dict (tools.report schema): time and nodes per pass, figures before/after.

    The pipeline's own fields (`passes`, `fidelity`, ...) stay at the top level of report.json,
    as before the page existed.
    """
    summary, ratio_plot = figures
    names = [f"{i + 1}. {r.name}" for i, r in enumerate(result.records)]
    page: dict[str, object] = dict(data)
    page.update({
        "title": f"Optimize {Path(args.model).name}",
        "command": command_line(args),
        "summary": {"nodes": f"{data['nodes_before']} → {data['nodes_after']}",
                    "passes": len(result.records),
                    "changed the model": sum(r.modified for r in result.records), **summary},
        "plots": [
            {"kind": "barh", "title": "Time per pass", "x_label": "ms",
             "series": [{"name": "pass", "x": names, "y": [r.seconds * 1000 for r in
                         result.records]},
                        {"name": "verification", "x": names,
                         "y": [r.verify_seconds * 1000 for r in result.records]}]},
            {"kind": "barh", "title": "Nodes after each pass", "x_label": "nodes",
             "reference": data["nodes_before"],
             "series": [{"name": "nodes", "x": names,
                         "y": [r.nodes_after for r in result.records]}],
             "description": "The dashed line is the input model's node count."},
            ratio_plot,
        ],
        "tables": [{"title": "Passes", "columns": ["pass", "kind", "nodes before",
                    "nodes after", "ms", "changed", "worst cosine"],
                    "rows": [[r.name, "exact" if r.exact else "approx", r.nodes_before,
                              r.nodes_after, (r.seconds + r.verify_seconds) * 1000, r.modified,
                              None if r.fidelity is None else r.fidelity.worst_cosine]
                             for r in result.records]}],
    })
    return page
