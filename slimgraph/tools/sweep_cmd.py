"""`slimgraph sweep`: build and time every candidate of a grid, keep the Pareto-optimal models.

`slimgraph sweep MODEL --grid GRID.yaml --data VAL.npz [--calib C] [--out DIR]
[--scheduler tcp://HOST:PORT | --workers N] [--json] [--report DIR]`.

Builds every candidate of the grid on dask.distributed, evaluates it on the data, times it side by
side with the input model, prints one row per candidate (Pareto members marked) and keeps the
Pareto-optimal models in `--out`. See `slimgraph.api.sweep`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slimgraph._tables import format_bytes, format_count, format_metric, format_ratio
from slimgraph.api.sweep import SweepResult, sweep
from slimgraph.tools._common import add_json_option, add_model_arguments, print_result
from slimgraph.tools.compare_cmd import positive_int
from slimgraph.tools.report import add_report_option, check_report_dir, command_line, write_report

__all__ = ["register", "run", "report_page"]


_HELP = "try every combination of step settings on dask; keep the Pareto front"
_DESCRIPTION = (
    "Build and evaluate every candidate of a grid (e.g. 'prune: {ratio: [0.0, 0.3]}' and "
    "'quantize: [none, int8]') as independent jobs on dask.distributed, time them side by side "
    "with the input model, and mark the Pareto front of latency against the metric (accuracy "
    "with labels, else output cosine)."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("sweep", help=_HELP, description=_DESCRIPTION)
    add_model_arguments(parser, "the input .onnx model (never modified)", output=False)
    parser.add_argument("--grid", required=True, metavar="GRID.yaml",
                        help="step -> values to try, in the order the steps run")
    parser.add_argument("--data", required=True, metavar="VAL.npz",
                        help="validation inputs (+ 'labels' for accuracy)")
    parser.add_argument("--labels", default="labels", metavar="KEY",
                        help="labels key of --data (default labels)")
    parser.add_argument("--calib", metavar="DATA.npz", help="calibration data (static int8)")
    parser.add_argument("--out", metavar="DIR", help="write the Pareto-optimal models here")
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                         help="a running dask scheduler (dask scheduler / dask worker)")
    cluster.add_argument("--workers", type=positive_int, metavar="N",
                         help="start a local cluster of N single-threaded worker processes")
    parser.add_argument("--rounds", type=positive_int, default=10,
                        help="latency rounds after the builds (default 10)")
    parser.add_argument("--batch", type=positive_int, default=32,
                        help="rows of --data per timed run (default 32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_option(parser)
    add_report_option(parser, "every candidate and a plot of the Pareto front")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    report_dir = check_report_dir(args.report)
    result = sweep(
        args.model, args.grid, args.data, calibration=args.calib, out=args.out,
        scheduler=args.scheduler, workers=args.workers, labels=args.labels,
        rounds=args.rounds, batch=args.batch,
        progress=False if args.no_progress or args.json else None,
    )
    data = {"input": args.model, **result.to_dict()}
    text = str(result)
    if report_dir is not None:
        page = report_page(result, command_line(args), Path(args.model).name)
        write_report(report_dir, {**page, "result": data}, text=text)
    print_result(args, data, text)
    failed = sum(c.status != "ok" for c in result.candidates)
    return 1 if failed == len(result.candidates) else 0


def report_page(result: SweepResult, command: str, model_name: str) -> dict[str, object]:
    """The report dict (tools.report schema): every candidate, scatter plots of both fronts."""
    ok = [c for c in result.candidates if c.status == "ok" and c.latency_ratio is not None]
    metric = result.metric_name
    base = result.baseline
    best = max(ok, key=lambda c: (c.metric or 0.0, -(c.latency_ratio or 0.0)), default=None)
    fastest = min(ok, key=lambda c: c.latency_ratio or 0.0, default=None)
    summary: dict[str, object] = {
        "candidates": len(result.candidates),
        "failed": sum(c.status != "ok" for c in result.candidates),
        "Pareto front": f"{sum(c.pareto for c in ok)} (latency), "
                        f"{sum(c.pareto_size for c in ok)} (size)",
        f"input {metric}": format_metric(base["metric"], metric),
    }
    if best is not None:
        summary[f"best {metric}"] = (f"{format_metric(best.metric, metric)} "
                                     f"(#{best.candidate.index})")
    if fastest is not None:
        summary["fastest"] = f"{format_ratio(fastest.latency_ratio)} (#{fastest.candidate.index})"
    plots = [
        {"kind": "scatter", "title": f"Latency against {metric}",
         "x_label": "latency / input model (lower is better)",
         "y_label": f"{metric} (higher is better)", "pareto": [c.pareto for c in ok],
         "series": [{"name": "candidates", "x": [c.latency_ratio for c in ok],
                     "y": [c.metric for c in ok], "labels": [str(c.candidate.index) for c in ok]}],
         "description": "Numbers are the candidates' rows in the table. The line joins the "
                        "Pareto front: no other candidate is both faster and better."},
        {"kind": "scatter", "title": f"Size against {metric}",
         "x_label": "size (KiB)", "y_label": f"{metric} (higher is better)",
         "pareto": [c.pareto_size for c in ok],
         "series": [{"name": "candidates", "x": [(c.size_bytes or 0) / 1024 for c in ok],
                     "y": [c.metric for c in ok], "labels": [str(c.candidate.index) for c in ok]}]},
    ]
    rows = []
    for c in result.candidates:
        interval = (f"{c.latency_interval[0]:.2f}-{c.latency_interval[1]:.2f}"
                    if c.latency_interval else None)
        rows.append([c.candidate.index, c.candidate.name,
                     c.status + (" (retried)" if c.retried else "")
                     + (f": {c.error}" if c.error else ""),
                     None if c.size_bytes is None else format_bytes(c.size_bytes),
                     None if c.macs is None else format_count(c.macs),
                     None if c.metric is None else format_metric(c.metric, metric),
                     None if c.latency_ratio is None else format_ratio(c.latency_ratio),
                     interval, " + ".join(name for name, flag in (("latency", c.pareto),
                                          ("size", c.pareto_size)) if flag),
                     None if c.path is None else Path(c.path).name])
    table = {"title": "Candidates", "columns": ["#", "candidate", "status", "size", "MACs",
             metric, "latency", "90% interval", "Pareto front", "written to"],
             "rows": rows, "highlight": [c.pareto for c in result.candidates]}
    return {"title": f"Sweep of {model_name}", "command": command, "summary": summary,
            "notes": [f"{metric} on {base['samples']} samples; latency measured in one process "
                      f"after the builds, {result.rounds} interleaved rounds, medians; built on "
                      f"{result.cluster}."],
            "plots": plots, "tables": [table]}
