"""`slimgraph prune MODEL -o OUT --ratio R ...`: structured channel pruning.

Prints the channel groups (size, kept, or why a group could not shrink), the channels kept per
layer, parameters and MACs before/after; `--json` prints one object. With `--heads R` it removes
attention heads first (per block: heads before and after, kept heads, blocks left alone and
why); alone, only heads. With `--unstructured` it zeroes weights instead and prints the sparsity
per layer. Written atomically, never over the input.
"""

from __future__ import annotations

import argparse

from slimgraph._tables import format_ratio
from slimgraph.api.prune import prune_with_report
from slimgraph.errors import BadOptionError
from slimgraph.passes.prune import CRITERIA, SCOPES, PruneReport
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
        "prune",
        help="structured pruning: remove channels or attention heads physically (or "
             "--unstructured: zero weights)",
        description=(
            "Remove the least important channels of every channel-dependency group (tensors "
            "coupled by residual adds, concats, depthwise convs, flatten into a Gemm) from the "
            "graph. The channels of graph outputs (class logits) are kept unless named with "
            "--prune-output. --pad scatters pruned tensors back to full size where an inner "
            "consumer needs the full width. --heads removes whole attention heads first (whole "
            "key/value groups under grouped-query attention), head counts restated in the "
            "graph; with --ratio, channels are pruned after."
        ),
    )
    add_model_arguments(parser)
    parser.add_argument("--ratio", type=float, default=None,
                        help="fraction to remove, in (0, 1)")  # fmt: skip
    parser.add_argument("--heads", type=float, default=None, metavar="R",
                        help="fraction of each attention block's heads to remove, in (0, 1), "
                        "before channels (scored by --criterion l1 or l2)")
    parser.add_argument("--target-macs", dest="target_macs", type=float, default=None,
                        metavar="R", help="instead of --ratio: reach R x the MACs with per-group "
                        "ratios allocated from sensitivity on --data (least loss first)")
    parser.add_argument("--criterion", choices=CRITERIA, default="l1",
                        help="channel importance (default l1)")  # fmt: skip
    parser.add_argument("--scope", choices=SCOPES, default="local",
                        help="same ratio per group (local, default) or one threshold")  # fmt: skip
    parser.add_argument("--round-to", dest="round_to", type=int, default=None, metavar="N",
                        help="keep a multiple of N channels per group (default: the multiple "
                        "onnxruntime's CPU convolutions run fast at here, 16 with AVX-512 else 8; "
                        "1: the counts as asked)")  # fmt: skip
    parser.add_argument("--pad", action="store_true",
                        help="zero-pad pruned tensors back where an inner consumer needs the full "
                             "width (never at a graph output)")  # fmt: skip
    parser.add_argument("--prune-output", dest="prune_outputs", nargs="+", default=[],
                        metavar="NAME", help="graph outputs whose channels may be pruned too "
                        "(by default an output's channels, e.g. logits, are kept)")  # fmt: skip
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PAT",
                        help="layer or node names (fnmatch patterns) left unchanged")  # fmt: skip
    parser.add_argument("--exclude-op", dest="exclude_ops", nargs="+", default=[], metavar="OP",
                        help="op types left unchanged")  # fmt: skip
    parser.add_argument("--unstructured", action="store_true",
                        help="zero the smallest weights instead of removing channels")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed for --criterion random")
    add_json_option(parser)
    add_report_option(parser, "channels kept per layer, size, parameters and MACs before/after")
    add_budget_arguments(parser)
    add_speed_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    def check() -> None:
        if args.ratio is None and args.target_macs is None and args.heads is None:
            raise BadOptionError("give --ratio R, --target-macs R or --heads R")

    # --data is the budget's data, the MAC target's, and with or without them where the
    # result's fidelity (accuracy with labels) is measured, as quantize and factorize do
    job = Compression(args, check=check, data_for_budget=False)
    pruned, report = prune_with_report(
        job.model, ratio=args.ratio, heads=args.heads, criterion=args.criterion, scope=args.scope,
        round_to="auto" if args.round_to is None else args.round_to, pad=args.pad,
        exclude=args.exclude,
        exclude_ops=args.exclude_ops, unstructured=args.unstructured,
        prune_outputs=args.prune_outputs, seed=args.seed,
        target_macs=args.target_macs, data=job.data(), budget=job.budget,
    )  # fmt: skip
    job.write(pruned)
    data = {"input": str(job.source), "output": str(job.target), **report.to_dict()}
    text = "\n".join([f"wrote {job.target}", str(report),
                      *job.budget_lines(report.evaluation)])  # fmt: skip
    return job.finish(data, text, lambda figures: _page(job, data, report, figures))


def _page(
    job: Compression, data: dict[str, object], report: PruneReport, figures: Figures
) -> dict[str, object]:
    """The report dict (tools.report schema): channels kept per layer, figures before/after."""
    summary: dict[str, object] = {}
    if report.heads_ratio is not None:
        summary["heads"] = f"{report.heads_ratio:g} per block ({report.criterion})"
    if report.channels:
        summary["ratio"] = f"{report.ratio:g} ({report.criterion}, {report.scope})"
    summary.update(figures[0])
    plots: list[dict[str, object]] = []
    tables: list[dict[str, object]] = []
    if report.heads_ratio is not None:
        tables.append({"title": "Attention heads", "columns": ["block", "heads", "kept",
                       "kept heads"], "rows": [[b.block, b.heads, b.kept, ",".join(
                           map(str, b.kept_heads))] for b in report.heads]})
        if report.heads_skipped:
            tables.append({"title": "Attention blocks not pruned", "columns": ["block",
                           "reason"], "rows": [[s.node, s.reason]
                                               for s in report.heads_skipped]})
    if report.channels and report.unstructured:
        sparsity = report.sparsity[:MAX_BARS]
        plots.append({"kind": "barh", "title": "Sparsity per layer (zeroed weights)",
                      "x_label": "fraction of weights that are zero",
                      "series": [{"name": "sparsity", "x": [s.layer for s in sparsity],
                                  "y": [s.sparsity for s in sparsity]}]})
        tables.append({"title": "Sparsity per layer", "columns": ["layer", "op", "weights",
                       "zeros", "sparsity"], "rows": [[s.layer, s.op_type, s.elements, s.zeros,
                       s.sparsity] for s in report.sparsity]})
    elif report.channels:
        layers = report.layers[:MAX_BARS]
        names = [layer.layer for layer in layers]
        plots.append({
            "kind": "barh", "title": "Output channels per layer", "x_label": "channels",
            "series": [{"name": "before", "x": names, "y": [layer.before for layer in layers]},
                       {"name": "kept", "x": names, "y": [layer.after for layer in layers]}],
            "description": "Torch layer names; channels coupled by residual adds, concats or "
                           "depthwise convs are kept or removed together.",
        })
        tables.append({"title": "Channels per layer", "columns": ["layer", "op", "before",
                       "kept", "kept / before"], "rows": [[x.layer, x.op_type, x.before, x.after,
                       format_ratio(x.after / x.before if x.before else None)]
                       for x in report.layers]})
        tables.append({"title": "Channel groups", "columns": ["id", "channels", "kept",
                       "producers", "note"], "rows": [[g.id, g.channels, g.kept,
                       ", ".join(g.producers), g.reason or ""] for g in report.groups]})
    plots.append(figures[1])
    return job.page("Prune", summary=summary, plots=plots, tables=tables, result=data)
