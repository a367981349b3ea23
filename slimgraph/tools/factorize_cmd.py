"""`slimgraph factorize MODEL -o OUT [--rank-ratio R | --energy E | --rank auto] ...`.

Low-rank factorization (DESIGN.md sections 5, 7): Gemm/MatMul layers split by SVD, Conv layers
by Tucker-2. Prints one row per factorized layer (rank, parameters, MACs, weight error, output
SQNR with --data), the totals and why layers were skipped; `--json` prints one object. Written
atomically, never over the input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slimgraph import ir as sg_ir
from slimgraph.errors import BadOptionError, OutputPathError
from slimgraph.passes.lowrank import FactorizeReport, factorize_with_report
from slimgraph.runtime import iter_batches
from slimgraph.runtime.metrics import load_data
from slimgraph.tools.budget_args import add_budget_arguments, describe_evaluation, judge_from_args
from slimgraph.tools.report import (
    MAX_BARS,
    add_report_option,
    before_after,
    check_report_dir,
    command_line,
    model_figures,
    write_report,
)
from slimgraph.tools.tables import emit, format_count, format_ratio, render_table, to_json

__all__ = ["register", "run", "format_report"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "factorize",
        help="low-rank factorization: SVD split of Gemm/MatMul, Tucker-2 of Conv",
        description=(
            "Replace each Gemm/MatMul with a constant weight W (n x m) by two products of rank "
            "k (k(n+m) parameters instead of nm) and each k x k Conv by 1x1 -> k x k core -> "
            "1x1 (Tucker-2). Layers whose factors would not be smaller are left alone. "
            "--rank auto factorizes only where the estimated MACs drop to 0.8x or less; alone "
            "it takes the largest such rank, with --rank-ratio/--energy/--error-budget it gates "
            "their ranks."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="the .onnx model")
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="the output .onnx")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--rank-ratio", dest="rank_ratio", type=float, metavar="R",
                      help="keep round(R * min(n, m)) singular values, R in (0, 1]")  # fmt: skip
    rule.add_argument("--energy", type=float, metavar="E",
                      help="keep the fewest singular values holding E of the squared sum")
    rule.add_argument("--error-budget", dest="error_budget", type=float, metavar="B",
                      help="largest relative Frobenius error of each weight, B in [0, 1)")
    parser.add_argument("--rank", metavar="auto|K",
                        help="'auto' (ranks in multiples of 16, only where the MACs drop to "
                             "0.8x or less) or a fixed rank K")  # fmt: skip
    parser.add_argument("--include", nargs="+", default=None, metavar="PAT",
                        help="only these layer or node names (fnmatch patterns)")  # fmt: skip
    parser.add_argument("--exclude", nargs="+", default=None, metavar="PAT",
                        help="layer or node names (fnmatch patterns) left unchanged")  # fmt: skip
    parser.add_argument("--op-types", dest="op_types", nargs="+", default=None, metavar="OP",
                        help="op types to factorize (default: Gemm MatMul Conv)")  # fmt: skip
    parser.add_argument("--pointwise-convs", dest="pointwise_convs", action="store_true",
                        help="also split 1x1 convs by SVD")  # fmt: skip
    parser.add_argument("--data", metavar="DATA.npz", default=None,
                        help="sample inputs: report output fidelity and per-layer SQNR")
    parser.add_argument("--samples", type=int, default=8, metavar="N",
                        help="use at most N samples of --data (default 8)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_report_option(parser, "per-layer ranks, size, parameters and MACs before/after")
    add_budget_arguments(parser, data=False)
    parser.set_defaults(handler=run)


def _rank(text: str | None) -> int | str | None:
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise BadOptionError(f"--rank must be 'auto' or an integer, got '{text}'") from None


def run(args: argparse.Namespace) -> int:
    source, target = Path(args.model), Path(args.output)
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise OutputPathError(f"{target}: refusing to write over the input model")
    if args.samples < 1:
        raise BadOptionError(f"--samples must be >= 1, got {args.samples}")
    rank = _rank(args.rank)
    if rank is None and all(
        getattr(args, name) is None for name in ("rank_ratio", "energy", "error_budget")
    ):
        raise BadOptionError(
            "give a rank rule: --rank-ratio R, --energy E, --error-budget B or --rank auto|K"
        )
    report_dir = check_report_dir(args.report)
    model = sg_ir.load(source)
    feeds = None
    judge = judge_from_args(args, model, data_for_budget=False)
    if args.data is not None:
        data = judge.data if judge is not None else load_data(args.data, model,
                                                               labels=args.labels)
        feeds = [batch for _, batch in zip(range(args.samples),
                                           iter_batches(data.feeds, 1, model), strict=False)]
    factorized, report = factorize_with_report(
        model,
        rank_ratio=args.rank_ratio,
        energy=args.energy,
        error_budget=args.error_budget,
        rank=rank,  # type: ignore[arg-type]
        include=args.include,
        exclude=args.exclude,
        op_types=tuple(args.op_types) if args.op_types else ("Gemm", "MatMul", "Conv"),
        feeds=feeds,
        pointwise_convs=args.pointwise_convs,
        data=None if judge is None else judge.data,
        budget=None if judge is None else judge.budget,
    )
    sg_ir.save(factorized, target)
    result = {"input": str(source), "output": str(target), **report.to_dict()}
    text = f"wrote {target}\n" + format_report(report)
    if report.budget_search is not None and judge is not None and report.evaluation:
        text += "\n" + report.budget_search.summary()
        text += "\n" + describe_evaluation(report.evaluation, judge)
    if report_dir is not None:
        page = _page(args, result, report, model_figures(model, source),
                     model_figures(factorized, target))
        write_report(report_dir, page, text=text)
    emit(to_json(result) if args.json else text)
    return 0


def _page(
    args: argparse.Namespace,
    data: dict[str, object],
    report: FactorizeReport,
    before: dict[str, int],
    after: dict[str, int],
) -> dict[str, object]:
    """The report dict (tools.report schema): per-layer ranks, figures before/after."""
    figures, ratio_plot = before_after(before, after)
    summary: dict[str, object] = {"factorized layers": len(report.layers),
                                  "skipped layers": len(report.skipped), **figures}
    if report.fidelity is not None:
        summary["output cosine"] = f"{report.fidelity.worst_cosine:.5f}"
    rows = report.layers[:MAX_BARS]
    names = [f"{r.layer or r.node} [{r.method}]" for r in rows]
    # the rank kept against the full rank: min(n, m) for an SVD split, the output channels for
    # Tucker-2 (whose rank is (r_in, r_out); r_out is the one the next layer sees)
    kept = [r.rank[-1] for r in rows]
    full = [min(r.shape[:2]) if r.method == "svd" else r.shape[0] for r in rows]
    plots: list[dict[str, object]] = [] if not rows else [{
        "kind": "barh", "title": "Rank per layer", "x_label": "rank",
        "series": [{"name": "full rank", "x": names, "y": full},
                   {"name": "rank kept", "x": names, "y": kept}],
        "description": "Torch layer names; SVD: rank k of W (n x m) against min(n, m); Tucker-2: "
                       "output rank against the output channels.",
    }]
    plots.append(ratio_plot)
    table = {"title": "Factorized layers", "columns": ["layer", "op", "method", "weight", "rank",
             "params before", "params after", "weight error", "output SQNR dB"],
             "rows": [[r.layer, r.op_type, r.method, "x".join(str(d) for d in r.shape),
                       "/".join(str(k) for k in r.rank), r.params_before, r.params_after,
                       r.weight_error, r.output_sqnr_db] for r in report.layers]}
    skipped = {"title": "Skipped layers", "columns": ["node", "op", "reason"],
               "rows": [[s.node, s.op_type, s.reason] for s in report.skipped]}
    return {"title": f"Factorize {Path(args.model).name}", "command": command_line(args),
            "summary": summary, "plots": plots, "tables": [table, skipped], "result": data}


def _count(value: int | None) -> str:
    return "?" if value is None else format_count(value)


def _ratio(after: int | None, before: int | None) -> str:
    return format_ratio(after / before if after is not None and before else None)


def format_report(report: FactorizeReport) -> str:
    """The per-layer table, totals and skip reasons as plain text."""
    rows = []
    for r in report.layers:
        rows.append(
            [
                r.layer,
                r.op_type,
                r.method,
                "x".join(str(d) for d in r.shape),
                "/".join(str(k) for k in r.rank) + (" *" if r.shared_with else ""),
                f"{_count(r.params_before)} -> {_count(r.params_after)}",
                f"{_count(r.macs_before)} -> {_count(r.macs_after)}",
                f"{r.weight_error:.4f}",
                None if r.output_sqnr_db is None else f"{r.output_sqnr_db:.1f}",
            ]
        )
    lines = []
    if rows:
        lines.append(
            render_table(
                ["layer", "op", "method", "weight", "rank", "params", "MACs", "W err", "SQNR dB"],
                rows,
                align="lllllrrrr",
            )
        )
        lines.append("")
    lines.append(
        f"factorized {len(report.layers)} layers, skipped {len(report.skipped)}"
        + (f"; folded {report.folded} computed weights/biases first" if report.folded else "")
    )
    lines.append(
        f"parameters: {_count(report.params_before)} -> {_count(report.params_after)} "
        f"({_ratio(report.params_after, report.params_before)})"
    )
    lines.append(
        f"MACs:       {_count(report.macs_before)} -> {_count(report.macs_after)} "
        f"({_ratio(report.macs_after, report.macs_before)})"
    )
    if report.fidelity is not None:
        lines.append(
            f"outputs:    worst cosine {report.fidelity.worst_cosine:.6f}, worst SQNR "
            f"{report.fidelity.worst_sqnr_db:.1f} dB ({report.fidelity.samples} samples)"
        )
    if any(r.shared_with for r in report.layers):
        lines.append("* reuses the factors of a tied weight")
    reasons: dict[str, int] = {}
    for skipped in report.skipped:
        reasons[skipped.reason] = reasons.get(skipped.reason, 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"skipped {count:>3}: {reason}")
    return "\n".join(lines)
