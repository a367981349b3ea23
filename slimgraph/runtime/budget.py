"""Accuracy budgets: the one check every approximate command and step runs before writing.

A budget is an absolute drop of the metric (`max_drop`: top-1 accuracy with labels, or the user's
`Metric`; 0.01 is one point of accuracy) and/or a lowest output cosine against the model before
compression (`min_cosine`), measured on validation data (docs/architecture.md, "Metrics,
budgets, sensitivity and search"). A candidate that misses it raises `VerificationError` with the
measured figure: the caller writes nothing.

`BudgetJudge` measures the reference once and then judges any number of candidates (the searches
of accuracy-aware quantization, pruning and low-rank); `slimgraph.check_budget`
(`slimgraph.api.budget`) is the one-shot form.

Example:
    >>> data = load_data("val.npz", model)  # doctest: +SKIP
    >>> judge = BudgetJudge(model, data, Budget(max_drop=0.01))  # doctest: +SKIP
    >>> judge.check(pruned).accuracy  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadOptionError, Term, VerificationError
from slimgraph.runtime.data import DEFAULT_LABELS, DataLike, LabelledData, as_data
from slimgraph.runtime.metrics import Evaluation, Metric, evaluate
from slimgraph.runtime.session import create_session

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "Budget", "Evaluator", "BudgetJudge", "DataLike", "as_data", "budget_judge",
]

# `DataLike` and `as_data` (the one reader of `data=`) live in `runtime.data`.

@dataclass(frozen=True)
class Budget:
    """What a compressed model must keep.

    Attributes:
        max_drop: largest absolute drop of the metric (accuracy as a fraction: 0.01 = 1 point).
        min_cosine: lowest worst-output cosine against the reference model, in [-1, 1].
    """

    max_drop: float | None = None
    min_cosine: float | None = None

    def __post_init__(self) -> None:
        if self.max_drop is None and self.min_cosine is None:
            raise BadOptionError.worded("a budget needs {max_drop} or {min_cosine}",
                                        max_drop=_MAX_DROP, min_cosine=_MIN_COSINE)
        if self.max_drop is not None and not (
            math.isfinite(self.max_drop) and 0 <= self.max_drop < 1
        ):
            raise BadOptionError.worded(
                "{max_drop} is an absolute drop as a fraction in [0, 1) (0.01 is one point), "
                "got {value}", max_drop=_MAX_DROP, value=f"{self.max_drop}")
        if self.min_cosine is not None and not (
            math.isfinite(self.min_cosine) and -1 <= self.min_cosine <= 1
        ):
            raise BadOptionError.worded("{min_cosine} must be in [-1, 1], got {value}",
                                        min_cosine=_MIN_COSINE, value=f"{self.min_cosine}")

    @classmethod
    def of(
        cls, max_drop: float | None = None, min_cosine: float | None = None
    ) -> Budget | None:
        """A budget when either limit is given, else None."""
        if max_drop is None and min_cosine is None:
            return None
        return cls(max_drop, min_cosine)

    def describe(self) -> str:
        parts = []
        if self.max_drop is not None:
            parts.append(f"drop <= {self.max_drop:g}")
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        return " and ".join(parts)

    def to_dict(self) -> dict[str, float | None]:
        return {"max_drop": self.max_drop, "min_cosine": self.min_cosine}


class Evaluator:
    """Measures the reference model once on `data`, then any number of candidates against it.

    Args:
        reference: the model before compression.
        data: validation data.
        metric: a user `Metric` replacing top-1 accuracy.
        batch_size: rows per onnxruntime run.
    """

    def __init__(
        self,
        reference: ir.Model,
        data: LabelledData,
        *,
        metric: Metric | None = None,
        batch_size: int = 256,
    ) -> None:
        self.data = data
        self.metric = metric
        self.batch_size = batch_size
        self.reference_session = create_session(reference)
        self.reference_outputs: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        # against itself: cosine 1, so `reference.metric` exists without labels too
        self.reference = evaluate(self.reference_session, data, batch_size=batch_size,
                                  metric=metric, reference=self.reference_session,
                                  reference_outputs=self.reference_outputs)

    def evaluate(self, candidate: ir.Model | ort.InferenceSession) -> Evaluation:
        """The candidate's metric, cosine and SQNR against the reference, and its drop."""
        result = evaluate(candidate, self.data, reference=self.reference_session,
                          batch_size=self.batch_size, metric=self.metric,
                          reference_outputs=self.reference_outputs)
        return result.with_reference(self.reference)

    __call__ = evaluate

    def subset(self, rows: int) -> Evaluator:
        """An `Evaluator` on the first `rows` rows of the data, sharing the reference session
        (a cheap estimate: the budget search ranks uncertain units with it)."""
        data = LabelledData({k: v[:rows] for k, v in self.data.feeds.items()},
                            None if self.data.labels is None else self.data.labels[:rows],
                            self.data.source)
        quick = Evaluator.__new__(Evaluator)
        quick.data, quick.metric, quick.batch_size = data, self.metric, self.batch_size
        quick.reference_session = self.reference_session
        quick.reference_outputs = {}
        quick.reference = evaluate(self.reference_session, data, batch_size=self.batch_size,
                                   metric=self.metric, reference=self.reference_session,
                                   reference_outputs=quick.reference_outputs)
        return quick

    def change(self, evaluation: Evaluation) -> float:
        """evaluation's metric - the reference's (negative: worse)."""
        return evaluation.metric - self.reference.metric


class BudgetJudge(Evaluator):
    """An `Evaluator` that judges candidates against a `Budget`.

    Raises:
        BadOptionError: `max_drop` with data that has no labels and no `metric`.
    """

    def __init__(
        self,
        reference: ir.Model,
        data: LabelledData,
        budget: Budget,
        *,
        metric: Metric | None = None,
        batch_size: int = 256,
    ) -> None:
        if budget.max_drop is not None and data.labels is None and metric is None:
            raise BadOptionError.worded(
                "{max_drop} needs labels: {source} has no labels key (name it with {labels}, or "
                "use {min_cosine})", max_drop=_MAX_DROP, source=data.source,
                labels=("labels=KEY", "--labels KEY"), min_cosine=_MIN_COSINE)
        self.budget = budget
        super().__init__(reference, data, metric=metric, batch_size=batch_size)

    def holds(self, evaluation: Evaluation) -> bool:
        """Whether a measured candidate is within the budget."""
        return not self.misses(evaluation)

    def misses(self, evaluation: Evaluation) -> list[Term]:
        """What the candidate misses (empty when it holds), with the measured figures, worded
        for Python and for the command line."""
        missed: list[Term] = []
        drop = evaluation.drop
        if self.budget.max_drop is not None and drop is not None and drop > self.budget.max_drop:
            measured = (f"{evaluation.metric_name} {_fmt(evaluation.metric)} vs "
                        f"{_fmt(evaluation.reference_metric)} before: drop {_fmt(drop)} > ")
            missed.append((f"{measured}max_drop={self.budget.max_drop:g}",
                           f"{measured}--max-drop {self.budget.max_drop:g}"))
        cosine = evaluation.cosine
        if self.budget.min_cosine is not None and (
            cosine is None or not cosine >= self.budget.min_cosine
        ):
            measured = f"output cosine {_fmt(cosine, 6)} < "
            missed.append((f"{measured}min_cosine={self.budget.min_cosine:g}",
                           f"{measured}--min-cosine {self.budget.min_cosine:g}"))
        return missed

    def check(self, candidate: ir.Model | ort.InferenceSession, *, what: str = "the result"
              ) -> Evaluation:
        """Evaluate and raise `VerificationError` (nothing is to be written) when it misses.

        Raises:
            VerificationError: the message names each missed limit with the measured figure.
        """
        evaluation = self.evaluate(candidate)
        missed = self.misses(evaluation)
        if missed:
            raise VerificationError.worded(
                "{what} misses the accuracy budget on {source} ({samples} samples): {missed}; "
                "nothing written", what=what, source=self.data.source,
                samples=str(evaluation.samples),
                missed=("; ".join(m[0] for m in missed), "; ".join(m[1] for m in missed)))
        return evaluation


def budget_judge(
    reference: ir.Model,
    data: DataLike | None,
    *,
    budget: Budget | None = None,
    max_drop: float | None = None,
    min_cosine: float | None = None,
    metric: Metric | None = None,
    labels: str = DEFAULT_LABELS,
) -> BudgetJudge | None:
    """The judge the public functions' `budget=`/`max_drop=`/`min_cosine=` + `data=` options ask
    for, or None when no limit is given.

    Raises:
        BadOptionError: a limit without data, both `budget` and a limit, or `max_drop` on data
            without labels.
    """
    if budget is not None and (max_drop is not None or min_cosine is not None):
        raise BadOptionError("give budget= or max_drop=/min_cosine=, not both")
    budget = budget or Budget.of(max_drop, min_cosine)
    if budget is None:
        return None
    if data is None:
        raise BadOptionError.worded(
            "an accuracy budget ({budget}) needs validation data: {data}",
            budget=budget.describe(), data=("pass data= (an .npz path or a dict of arrays, "
                                            "with 'labels' for max_drop)", "--data VAL.npz"))
    return BudgetJudge(reference, as_data(data, reference, labels=labels), budget, metric=metric)


# How messages name the budget options in Python and on the command line.
_MAX_DROP: Term = ("max_drop", "--max-drop")
_MIN_COSINE: Term = ("min_cosine", "--min-cosine")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
