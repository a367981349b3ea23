"""`slimgraph factorize MODEL -o OUT [--rank-ratio R | --energy E | --rank auto] ...`.

Low-rank factorization: Gemm/MatMul layers split by SVD, Conv layers by Tucker-2 (`--method cp`:
CP, `--method svd`: an SVD of the output channels). Ranks come from a rule, or per layer from
measured sensitivity on `--data` (`--target-macs F`, or a budget alone). Prints one row per
factorized layer (rank, parameters, MACs, weight error, output SQNR with --data), the totals and
why layers were skipped; `--json` prints one object. Written atomically, never over the input.
"""

from __future__ import annotations

import argparse
from typing import Literal

from slimgraph.api.factorize import factorize_with_report
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.passes.lowrank import METHODS, FactorizeReport
from slimgraph.runtime import iter_batches
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
    add_model_arguments(parser)
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
    parser.add_argument("--method", choices=METHODS, default="tucker",
                        help="how KxK convs are split: tucker (1x1 -> KxK core -> 1x1, the "
                             "default), cp (1x1 -> Kx1 -> 1xK depthwise -> 1x1) or svd (KxK to "
                             "k channels -> 1x1); Gemm/MatMul are split by SVD under each")
    parser.add_argument("--target-macs", dest="target_macs", type=float, default=None,
                        metavar="F", help="instead of a rank rule: ranks per layer from "
                        "measured sensitivity on --data, reaching F of the model's MACs "
                        "with the least loss")
    parser.add_argument("--data", metavar="DATA.npz", default=None,
                        help="validation data: output fidelity on all of it (and both "
                             "models' accuracy with labels), per-layer SQNR on --samples rows")
    parser.add_argument("--samples", type=int, default=8, metavar="N",
                        help="rows of --data for the per-layer SQNR column (default 8)")
    add_json_option(parser)
    add_report_option(parser, "per-layer ranks, size, parameters and MACs before/after")
    add_budget_arguments(parser, data=False)
    add_speed_arguments(parser)
    parser.set_defaults(handler=run)


def _rank(text: str | None) -> int | Literal["auto"] | None:
    if text is None:
        return None
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise BadOptionError(f"--rank must be 'auto' or an integer, got '{text}'") from None


def run(args: argparse.Namespace) -> int:
    rank: int | Literal["auto"] | None = None

    def check() -> None:
        nonlocal rank
        if args.samples < 1:
            raise BadOptionError(f"--samples must be >= 1, got {args.samples}")
        rank = _rank(args.rank)
        allocated = (args.target_macs is not None or args.max_drop is not None
                     or args.min_cosine is not None)
        if rank is None and not allocated and all(
            getattr(args, name) is None for name in ("rank_ratio", "energy", "error_budget")
        ):
            raise BadOptionError(
                "give a rank rule: --rank-ratio R, --energy E, --error-budget B or --rank auto|K"
            )

    job = Compression(args, check=check, data_for_budget=False)
    data = job.data()
    feeds = None if data is None else [
        batch for _, batch in zip(range(args.samples), iter_batches(data.feeds, 1, job.model),
                                  strict=False)]  # fmt: skip
    factorized, report = factorize_with_report(
        job.model,
        rank_ratio=args.rank_ratio,
        energy=args.energy,
        error_budget=args.error_budget,
        rank=rank,
        include=args.include,
        exclude=args.exclude,
        op_types=tuple(args.op_types) if args.op_types else ("Gemm", "MatMul", "Conv"),
        feeds=feeds,
        pointwise_convs=args.pointwise_convs,
        method=args.method,
        target_macs=args.target_macs,
        data=data,
        budget=job.budget,
    )
    if not report.layers:  # every layer stays whole under the rule: say so, write nothing
        reasons = list(dict.fromkeys(s.reason for s in report.skipped))[:2]
        raise UnsupportedModelError(
            "nothing to factorize: no layer gets smaller under this rank rule"
            + (f" ({'; '.join(reasons)})" if reasons else "") + "; nothing written")
    job.write(factorized)
    result = {"input": str(job.source), "output": str(job.target), **report.to_dict()}
    search = report.budget_search
    lines = [f"wrote {job.target}", str(report)]
    if search is not None and report.evaluation:
        lines += job.budget_lines(report.evaluation, search)
    return job.finish(result, "\n".join(lines), lambda figures: _page(job, result, report,
                                                                     figures))


def _page(
    job: Compression, data: dict[str, object], report: FactorizeReport, figures: Figures
) -> dict[str, object]:
    """The report dict (tools.report schema): per-layer ranks, figures before/after."""
    summary: dict[str, object] = {"factorized layers": len(report.layers),
                                  "skipped layers": len(report.skipped), **figures[0]}
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
    plots.append(figures[1])
    table: dict[str, object] = {
             "title": "Factorized layers", "columns": ["layer", "op", "method", "weight", "rank",
             "params before", "params after", "weight error", "output SQNR dB"],
             "rows": [[r.layer, r.op_type, r.method, "x".join(str(d) for d in r.shape),
                       "/".join(str(k) for k in r.rank), r.params_before, r.params_after,
                       r.weight_error, r.output_sqnr_db] for r in report.layers]}
    skipped: dict[str, object] = {"title": "Skipped layers", "columns": ["node", "op", "reason"],
               "rows": [[s.node, s.op_type, s.reason] for s in report.skipped]}
    return job.page("Factorize", summary=summary, plots=plots,
                       tables=[table, skipped], result=data)  # fmt: skip
