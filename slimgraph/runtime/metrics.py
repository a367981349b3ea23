"""The metric every approximate step is judged by, on data read by `runtime.data`.

With a labels key in the data the metric is top-1 accuracy of the first output (class scores on
its last axis); without it, the worst output cosine against a reference model (the model before
compression). `LabelledData`, `load_data`, `split_labels` and `top1_correct` live in
`runtime.data` and are re-exported here.

Example:
    >>> data = load_data("val.npz", model)  # doctest: +SKIP
    >>> evaluate(pruned, data, reference=model).metric  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from slimgraph._tables import format_cosine, format_db, format_metric, format_metric_change
from slimgraph.errors import BadDataError
from slimgraph.runtime.compare import FidelityAccumulator
from slimgraph.runtime.data import (
    DEFAULT_LABELS,
    LabelledData,
    load_data,
    split_labels,
    top1_correct,
)
from slimgraph.runtime.feeds import sample_count
from slimgraph.runtime.session import create_session, is_session, run

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "DEFAULT_LABELS",
    "Metric",
    "LabelledData",
    "Evaluation",
    "load_data",
    "split_labels",
    "top1_correct",
    "evaluate",
]

# A user metric: the model's outputs (name -> array [N, ...]) on all of the data and the labels
# (int64 [N], or None) -> one number, higher is better (e.g. F1, or minus a loss).
Metric = Callable[[dict[str, np.ndarray], "np.ndarray | None"], float]


@dataclass(frozen=True)
class Evaluation:
    """A model's metric on data.

    Attributes:
        samples: rows evaluated.
        accuracy: top-1 accuracy (fraction, 0..1) of the first output when labels were given.
        cosine: worst output cosine against the reference model, when one was given.
        sqnr_db: worst output SQNR (dB) against the reference, when one was given.
        custom: the value of the user's `Metric`, when one was given (it is then the metric).
        reference_metric: the same metric for the reference model, when it was measured (a
            budget check does); `drop` is the difference.
    """

    samples: int
    accuracy: float | None
    cosine: float | None
    sqnr_db: float | None
    custom: float | None = None
    reference_metric: float | None = None

    @property
    def metric_name(self) -> str:
        if self.custom is not None:
            return "metric"
        return "accuracy" if self.accuracy is not None else "cosine"

    @property
    def metric(self) -> float:
        """The user's metric, else accuracy when labels were given, else the output cosine."""
        value = self.custom if self.custom is not None else self.accuracy
        value = value if value is not None else self.cosine
        if value is None:
            raise BadDataError("no metric: the data has no labels and no reference model was given")
        return value

    @property
    def drop(self) -> float | None:
        """reference metric - this metric (accuracy: a fraction, 0.01 is one point), if known."""
        if self.reference_metric is None or self.metric_name == "cosine":
            return None
        return self.reference_metric - self.metric

    def with_reference(self, reference: Evaluation) -> Evaluation:
        """This evaluation with the reference model's metric attached (for `drop`)."""
        return replace(self, reference_metric=reference.metric)

    def __str__(self) -> str:
        """One line: the metric (and the reference's with the drop), cosine and SQNR."""
        name = self.metric_name
        parts = [f"{name} {format_metric(self.metric, name)}"]
        if self.reference_metric is not None and self.drop is not None:
            parts[0] += (f" (before {format_metric(self.reference_metric, name)}, change "
                         f"{format_metric_change(-self.drop, name)})")
        if self.cosine is not None and name != "cosine":
            parts.append(f"output cosine {format_cosine(self.cosine)}")
        if self.sqnr_db is not None:
            parts.append(f"SQNR {format_db(self.sqnr_db)} dB")
        return ", ".join(parts) + f" on {self.samples} samples"

    def __repr__(self) -> str:
        return f"<Evaluation: {self}>"

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {
            "samples": self.samples, "accuracy": self.accuracy, "cosine": self.cosine,
            "sqnr_db": self.sqnr_db,
        }
        if self.custom is not None:
            data["metric"] = self.custom
        if self.reference_metric is not None:
            data["reference_" + self.metric_name] = self.reference_metric
            data["drop"] = self.drop
        return data


# An `Evaluator` keeps its reference's outputs up to this size, so that each candidate runs
# only itself (a rank allocation measures dozens of candidates on the same data).
REFERENCE_CACHE_BYTES = 256 * 2**20


def _nbytes(outputs: dict[tuple[int, int], dict[str, np.ndarray]]) -> int:
    return sum(np.asarray(a).nbytes for batch in outputs.values() for a in batch.values())


def evaluate(
    model: ir.Model | ort.InferenceSession,
    data: LabelledData,
    *,
    reference: ir.Model | ort.InferenceSession | None = None,
    batch_size: int = 256,
    metric: Metric | None = None,
    reference_outputs: dict[tuple[int, int], dict[str, np.ndarray]] | None = None,
) -> Evaluation:
    """Top-1 accuracy (with labels) and fidelity to `reference` (when given) on `data`.

    Args:
        model: the model (or its session) to measure.
        data: inputs and optional labels.
        reference: the model before compression, for output cosine/SQNR.
        batch_size: rows per onnxruntime run.
        metric: a user `Metric`, called once with the outputs of all rows concatenated
            (memory grows with the data: meant for validation sets, not calibration streams).
        reference_outputs: the reference's outputs by (first row, end row) of a batch, kept
            between calls (`Evaluator`): a batch found there is not run again; one not found
            is run and kept while the kept outputs hold at most `REFERENCE_CACHE_BYTES`.

    Raises:
        BadDataError: neither labels, a reference nor a metric: there is nothing to measure.
    """
    if data.labels is None and reference is None and metric is None:
        raise BadDataError(
            f"{data.source}: has no labels and no reference model was given: nothing to measure"
        )
    session = model if is_session(model) else create_session(model)
    ref_session = None
    if reference is not None:
        ref_session = (reference if is_session(reference)
                       else create_session(reference))
    fixed = model if isinstance(model, ir.Model) else None
    correct = rows = 0
    fidelity = FidelityAccumulator()
    kept: dict[str, list[np.ndarray]] = {}
    for feed, labels in data.batches(batch_size, fixed):
        outputs = run(session, feed)
        rows += sample_count(feed)
        if labels is not None:
            correct += top1_correct(next(iter(outputs.values())), labels)
        if ref_session is not None:
            span = (rows - sample_count(feed), rows)
            expected = reference_outputs.get(span) if reference_outputs is not None else None
            if expected is None:
                expected = run(ref_session, feed)
                if reference_outputs is not None and _nbytes(reference_outputs) + _nbytes(
                        {span: expected}) <= REFERENCE_CACHE_BYTES:
                    reference_outputs[span] = expected
            fidelity.add(expected, outputs)
        if metric is not None:
            for name, array in outputs.items():
                kept.setdefault(name, []).append(array)
    accuracy = correct / rows if data.labels is not None and rows else None
    cosine = sqnr = None
    if ref_session is not None:
        result = fidelity.result()
        cosine, sqnr = result.worst_cosine, result.worst_sqnr_db
    custom = None
    if metric is not None:
        joined = {name: np.concatenate(parts) for name, parts in kept.items()}
        labels_used = None if data.labels is None else data.labels[:rows]
        custom = float(metric(joined, labels_used))
    return Evaluation(rows, accuracy, cosine, sqnr, custom)
