"""`slimgraph prune MODEL -o OUT --ratio R ...`: structured channel pruning (DESIGN.md s. 5, 7).

Prints the channel groups (size, kept, or why a group could not shrink), the channels kept per
layer, parameters and MACs before/after; `--json` prints one object. With `--unstructured` it
zeroes weights instead and prints the sparsity per layer. Written atomically, never over the input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slimgraph import ir as sg_ir
from slimgraph.errors import BadOptionError, OutputPathError
from slimgraph.passes.prune import CRITERIA, SCOPES, PruneReport, prune_with_report
from slimgraph.runtime.metrics import load_data
from slimgraph.tools.budget_args import add_budget_arguments, describe_evaluation, judge_from_args
from slimgraph.tools.tables import emit, format_count, render_table, to_json

__all__ = ["register", "run", "format_report"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="structured pruning: remove channels physically (or --unstructured: zero weights)",
        description=(
            "Remove the least important channels of every channel-dependency group (tensors "
            "coupled by residual adds, concats, depthwise convs, flatten into a Gemm) from the "
            "graph. --pad scatters pruned tensors back to full size where shapes must stay."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="the .onnx model")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="the output .onnx")
    parser.add_argument("--ratio", type=float, default=None,
                        help="fraction to remove, in (0, 1)")  # fmt: skip
    parser.add_argument("--target-macs", dest="target_macs", type=float, default=None,
                        metavar="R", help="instead of --ratio: reach R x the MACs with per-group "
                        "ratios allocated from sensitivity on --data (least loss first)")
    parser.add_argument("--criterion", choices=CRITERIA, default="l1",
                        help="channel importance (default l1)")  # fmt: skip
    parser.add_argument("--scope", choices=SCOPES, default="local",
                        help="same ratio per group (local, default) or one threshold")  # fmt: skip
    parser.add_argument("--round-to", dest="round_to", type=int, default=None, metavar="N",
                        help="keep a multiple of N channels per group")  # fmt: skip
    parser.add_argument("--pad", action="store_true",
                        help="zero-pad pruned tensors back where shapes must stay")  # fmt: skip
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PAT",
                        help="layer or node names (fnmatch patterns) left unchanged")  # fmt: skip
    parser.add_argument("--exclude-op", dest="exclude_ops", nargs="+", default=[], metavar="OP",
                        help="op types left unchanged")  # fmt: skip
    parser.add_argument("--unstructured", action="store_true",
                        help="zero the smallest weights instead of removing channels")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed for --criterion random")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_budget_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    source, target = Path(args.model), Path(args.output)
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise OutputPathError(f"{target}: refusing to write over the input model")
    if args.ratio is None and args.target_macs is None:
        raise BadOptionError("give --ratio R or --target-macs R")
    model = sg_ir.load(source)
    judge = judge_from_args(args, model, data_for_budget=args.target_macs is None)
    pruned, report = prune_with_report(
        model, ratio=args.ratio, criterion=args.criterion, scope=args.scope,
        round_to=args.round_to, pad=args.pad, exclude=args.exclude,
        exclude_ops=args.exclude_ops, unstructured=args.unstructured, seed=args.seed,
        target_macs=args.target_macs,
        data=judge.data if judge is not None else (
            load_data(args.data, model, labels=args.labels) if args.data else None),
        budget=None if judge is None else judge.budget,
    )  # fmt: skip
    sg_ir.save(pruned, target)
    if args.json:
        emit(to_json({"input": str(source), "output": str(target), **report.to_dict()}))
    else:
        text = f"wrote {target}\n" + format_report(report)
        if report.evaluation is not None and judge is not None:
            text += "\n" + describe_evaluation(report.evaluation, judge)
        emit(text)
    return 0


def format_report(report: PruneReport) -> str:
    """The report as plain-text tables."""

    def ratio(after: int, before: int) -> str:
        return f"{after / before:.3f}x" if before else "-"

    lines = [
        f"parameters: {format_count(report.params_before)} -> "
        f"{format_count(report.params_after)} ({ratio(report.params_after, report.params_before)})",
        f"MACs:       {format_count(report.macs_before)} -> "
        f"{format_count(report.macs_after)} ({ratio(report.macs_after, report.macs_before)})",
    ]
    if report.layer_ratios:
        lines.append("ratios per group (first producer): " + ", ".join(
            f"{name} {ratio:g}" for name, ratio in report.layer_ratios.items()))
    if report.unstructured:
        rows = [[s.layer, s.op_type, s.elements, s.zeros, f"{s.sparsity:.1%}"]
                for s in report.sparsity]  # fmt: skip
        lines += ["", render_table(["layer", "op", "weights", "zeros", "sparsity"], rows)]
        return "\n".join(lines)
    rows = []
    for g in report.groups:
        producers = ", ".join(g.producers[:3]) + (" ..." if len(g.producers) > 3 else "")
        reasons = g.reason.split("; ") if g.reason else []
        more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
        padded = f"padded at {g.padded} edge(s)" if g.padded else ""
        note = reasons[0] + more if reasons else padded
        rows.append([g.id, g.channels, g.kept, producers, note])
    lines += ["", "groups:", render_table(["id", "channels", "kept", "producers", "note"], rows,
                                          align="rrrll")]  # fmt: skip
    layer_rows = [[layer.layer, layer.op_type, layer.before, layer.after]
                  for layer in report.layers]  # fmt: skip
    lines += ["", "channels per layer:",
              render_table(["layer", "op", "before", "after"], layer_rows)]  # fmt: skip
    return "\n".join(lines)
