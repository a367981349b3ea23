"""`slimgraph auto`: the fastest model on onnxruntime within an accuracy budget.

`slimgraph auto MODEL -o OUT --data VAL.npz [--train TRAIN.npz] (--max-drop D | --min-cosine C)
[--batch N] [--time-budget MIN] [--epochs E] [--workers N] [--report DIR] [--json]
[--no-speed-check] [--allow-slower]`.

Searches pruning, low-rank and precision (`slimgraph.api.auto`), prints every candidate with the
Pareto front marked and the winner, writes the winner to OUT and the report (the fronts as
plots, every candidate as a table) to `--report DIR` (default `OUT` without `.onnx` plus
`-report/`, when matplotlib is installed). A budget no candidate meets: exit 1, the best figures
found on stderr, the table on stdout, nothing written.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from slimgraph._tables import format_ratio
from slimgraph.api.auto import AutoResult, BudgetNotMetError, auto_with_report
from slimgraph.errors import BadOptionError
from slimgraph.ir import save
from slimgraph.tools._common import add_json_option, add_model_arguments, output_paths, print_result
from slimgraph.tools.compare_cmd import positive_int
from slimgraph.tools.report import check_report_dir, command_line, require_plotting, write_report
from slimgraph.tools.sweep_cmd import report_page

__all__ = ["register", "run", "auto_page"]

logger = logging.getLogger(__name__)

_HELP = "search pruning, low-rank and precision for the fastest model within a budget"
_DESCRIPTION = (
    "Try channel pruning (distilled on --train), low-rank factorization, static and dynamic "
    "int8, int4 weights and the transformer fusions; time every candidate against MODEL at "
    "--batch on onnxruntime; write the fastest one that holds the budget, with a report of the "
    "Pareto front. A budget nothing meets exits 1 with the best figures found."
)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("auto", help=_HELP, description=_DESCRIPTION)
    add_model_arguments(parser, "the input .onnx model (never modified)")
    parser.add_argument("--data", required=True, metavar="VAL.npz",
                        help="validation inputs (+ 'labels' for --max-drop)")
    parser.add_argument("--train", metavar="TRAIN.npz",
                        help="training inputs + labels: pruned and low-rank candidates are "
                             "distilled from MODEL on them")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-drop", type=float, metavar="D",
                        help="largest absolute top-1 accuracy drop (0.01: one point)")
    budget.add_argument("--min-cosine", type=float, metavar="C",
                        help="lowest worst-output cosine to MODEL")
    parser.add_argument("--labels", default="labels", metavar="KEY",
                        help="labels key of --data and --train (default labels)")
    parser.add_argument("--batch", type=positive_int, default=1,
                        help="rows per timed run: the batch you serve at (default 1)")
    parser.add_argument("--time-budget", type=_positive_float, metavar="MIN",
                        help="launch no more candidates after this many minutes")
    parser.add_argument("--epochs", type=positive_int, default=8,
                        help="distillation epochs per candidate (default 8)")
    parser.add_argument("--workers", type=positive_int, metavar="N",
                        help="dask worker processes (default min(4, cores))")
    parser.add_argument("--no-speed-check", action="store_true",
                        help="skip the winner's confirming side-by-side timing")
    parser.add_argument("--allow-slower", action="store_true",
                        help="write a winner the confirmation measures slower than MODEL")
    parser.add_argument("--report", metavar="DIR", default=None,
                        help="write report.json/.txt/.html here (default OUT-report/ next to "
                             "OUT, when matplotlib is installed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def _report_dir(args: argparse.Namespace, target: Path) -> Path | None:
    if args.report is not None:
        return check_report_dir(args.report)
    default = target.with_name(target.stem + "-report")
    try:
        require_plotting()
    except BadOptionError:
        logger.info("no report written: matplotlib is not installed")
        return None
    return check_report_dir(default)


def run(args: argparse.Namespace) -> int:
    source, target = output_paths(args, [(args.data, "--data"), (args.train, "--train")])
    if not target.resolve().parent.is_dir():
        raise BadOptionError(f"-o {target}: its folder does not exist")
    report_dir = _report_dir(args, target)
    try:
        model, result = auto_with_report(
            str(source), args.data, train=args.train, max_drop=args.max_drop,
            min_cosine=args.min_cosine, batch=args.batch, time_budget=args.time_budget,
            epochs=args.epochs, workers=args.workers, labels=args.labels,
            progress=False if args.no_progress or args.json else None,
            speed_check=not args.no_speed_check, allow_slower=args.allow_slower,
        )
    except BudgetNotMetError as error:
        print_result(args, {"input": args.model, "written": None, **error.result.to_dict()},
                     str(error.result))
        raise
    save(model, target)
    data = {"input": args.model, "written": str(target), **result.to_dict()}
    text = str(result) + f"\nwrote {target}"
    if report_dir is not None:
        write_report(report_dir, {**auto_page(result, command_line(args), source.name),
                                  "result": data}, text=text)
        text += f"; report in {report_dir}"
    return print_result(args, data, text)


def auto_page(result: AutoResult, command: str, model_name: str) -> dict[str, object]:
    """The report dict (tools.report schema): the sweep page of every candidate (both fronts
    plotted) with the budget and the winner in its summary."""
    page = report_page(result.as_sweep(), command, model_name)
    summary = dict(page["summary"])  # type: ignore[call-overload]
    summary["budget"] = result.budget
    summary["batch"] = result.batch
    if result.winner is not None:
        summary["winner"] = f"#{result.winner}"
        if result.confirmed is not None:
            summary["winner latency"] = (f"{format_ratio(result.confirmed[0])} of the "
                                         f"{result.confirmed_against}")
    notes = list(page["notes"])  # type: ignore[call-overload]
    notes.append(f"Grids run: {', '.join(result.stages)}"
                 + (f"; skipped for time: {', '.join(result.skipped)}" if result.skipped else "")
                 + f"; {result.seconds:.0f} s in all.")
    if result.winner is not None:
        notes.append(f"Winner: #{result.winner} {result.figures(result.best)}.")
    notes += [f"Note: {note}" for note in result.notes]
    return {**page, "title": f"auto: {model_name}", "summary": summary, "notes": notes}
