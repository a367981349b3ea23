"""The accuracy budget options of every approximate command, parsed in one place.

`--data VAL.npz [--labels KEY] --max-drop D | --min-cosine C`, for quantize, prune, factorize and
optimize.

The judging itself is `slimgraph.runtime.budget`; a command builds its judge from the parsed
arguments before compressing and calls `judge.check(result)` before writing: a result that misses
the budget raises `VerificationError` (exit 1) with the measured figure and nothing is written.
"""

from __future__ import annotations

import argparse

import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.runtime.budget import BudgetJudge, budget_judge
from slimgraph.runtime.metrics import DEFAULT_LABELS, Evaluation

__all__ = ["add_budget_arguments", "judge_from_args", "describe_evaluation"]


def add_budget_arguments(
    parser: argparse.ArgumentParser, *, data: bool = True, labels: bool = True,
    data_flag: str = "--data", reference: str = "the input model",
) -> None:
    """Add `--max-drop`, `--min-cosine` (and `--data`, `--labels` unless the command has them;
    `data_flag` names the command's validation-data option in the help)."""
    group = parser.add_argument_group("accuracy budget (a result that misses it is not written)")
    if data:
        group.add_argument("--data", metavar="VAL.npz", default=None,
                           help="validation data: input names stacked on axis 0, plus labels")
    if labels:
        group.add_argument("--labels", metavar="KEY", default=DEFAULT_LABELS,
                           help="key of the class labels in --data (default 'labels'), never fed")
    group.add_argument("--max-drop", dest="max_drop", type=float, default=None, metavar="D",
                       help=f"largest top-1 accuracy drop on {data_flag} against {reference}, a "
                       "fraction (0.01 = 1 point); needs labels")
    group.add_argument("--min-cosine", dest="min_cosine", type=float, default=None, metavar="C",
                       help=f"lowest output cosine to {reference} on {data_flag}")


def judge_from_args(
    args: argparse.Namespace, model: ir.Model, *, data_for_budget: bool = True
) -> BudgetJudge | None:
    """The budget judge the options ask for (None without `--max-drop`/`--min-cosine`).

    With `data_for_budget` (the command's `--data` exists for the budget alone), `--data`
    without a limit is an error rather than a silent no-op.

    Raises:
        BadOptionError: a limit without `--data`, a limit out of range, `--max-drop` on data
            without labels.
        BadDataError: `--data` that does not fit the model.
    """
    if data_for_budget and args.data and args.max_drop is None and args.min_cosine is None:
        raise BadOptionError("--data VAL.npz is the accuracy budget's data: add --max-drop D "
                             "or --min-cosine C")
    return budget_judge(model, args.data, max_drop=args.max_drop, min_cosine=args.min_cosine,
                        labels=args.labels)


def describe_evaluation(evaluation: Evaluation, judge: BudgetJudge) -> str:
    """One line: the budget held, with the measured figures."""
    parts = []
    if evaluation.accuracy is not None or evaluation.custom is not None:
        parts.append(
            f"{evaluation.metric_name} {evaluation.metric:.4f} (before "
            f"{evaluation.reference_metric:.4f}, drop {evaluation.drop:+.4f})"
        )
    if evaluation.cosine is not None:
        parts.append(f"output cosine {evaluation.cosine:.6f}")
    return (f"budget held ({judge.budget.describe()}) on {judge.data.source}, "
            f"{evaluation.samples} samples: " + ", ".join(parts))
