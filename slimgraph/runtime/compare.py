"""Output fidelity of a candidate model against a reference, both run on onnxruntime.

Statistics accumulate over all samples (sums, not stored outputs), so comparing on many samples
costs no more memory than on one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from slimgraph._tables import format_float, format_shape, render_table
from slimgraph.errors import BadDataError
from slimgraph.runtime.feeds import iter_feeds
from slimgraph.runtime.quant_math import sqnr_db
from slimgraph.runtime.session import create_session, is_session, run

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["OutputFidelity", "Fidelity", "compare", "compare_outputs", "FidelityAccumulator"]


@dataclass(frozen=True)
class OutputFidelity:
    """How close one output of the candidate is to the reference's.

    `sqnr_db` is 10*log10(sum(ref^2) / sum((ref - cand)^2)), infinite for identical outputs.
    `top1_agreement` is the share of rows whose argmax agrees, for class-score outputs (float,
    rank 2, more than one class); None otherwise. `nonfinite` counts candidate values that are
    NaN or Inf where the reference is finite; any such value makes the errors infinite, the
    cosine -1 and the SQNR -inf, so that every threshold check fails (NaN would pass them).
    """

    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    mean_abs_error: float
    cosine: float
    sqnr_db: float
    top1_agreement: float | None
    reference_max_abs: float
    nonfinite: int = 0


@dataclass(frozen=True)
class Fidelity:
    """Per-output fidelity over `samples` runs."""

    outputs: tuple[OutputFidelity, ...]
    samples: int

    @property
    def worst_cosine(self) -> float:
        return min(output.cosine for output in self.outputs)

    @property
    def worst_sqnr_db(self) -> float:
        return min(output.sqnr_db for output in self.outputs)

    def to_dict(self) -> dict[str, object]:
        return {"samples": self.samples, "outputs": [asdict(o) for o in self.outputs]}

    def table(self) -> str:
        """The table `slimgraph compare` prints: one row per output, then the worst figures."""
        rows = [
            [
                out.name, format_shape(out.shape), out.max_abs_error, out.mean_abs_error,
                out.cosine, out.sqnr_db,
                None if out.top1_agreement is None else f"{out.top1_agreement:.2%}",
            ]
            for out in self.outputs
        ]  # fmt: skip
        headers = ["output", "shape", "max abs", "mean abs", "cosine", "SQNR dB", "top-1"]
        return (
            render_table(headers, rows, align="llrrrrr")
            + f"\n\nworst cosine {format_float(self.worst_cosine, 6)}, "
            f"worst SQNR {format_float(self.worst_sqnr_db)} dB"
        )

    def __str__(self) -> str:
        return self.table()


@dataclass
class _Sums:
    shape: tuple[int, ...] = ()
    count: int = 0
    abs_sum: float = 0.0
    max_abs: float = 0.0
    ref_max_abs: float = 0.0
    ref_sq: float = 0.0
    cand_sq: float = 0.0
    err_sq: float = 0.0
    dot: float = 0.0
    rows: int = 0
    rows_agree: int = 0
    class_scores: bool = False
    nonfinite: int = 0


@dataclass
class FidelityAccumulator:
    """Streams pairs of outputs into fidelity statistics (used by `compare` and by passes)."""

    sums: dict[str, _Sums] = field(default_factory=dict)
    samples: int = 0

    def add(self, reference: Mapping[str, Any], candidate: Mapping[str, Any]) -> None:
        """Add one run's outputs (by name); only running sums are kept, never the arrays.

        Outputs may be arrays, sequences (lists of arrays: their elements' values in order) or
        empty optionals (None: no values); strings count as equal (error 0) or not (error 1).
        """
        for name, ref_value in reference.items():
            if name not in candidate:
                raise BadDataError(f"the candidate model has no output '{name}'")
            ref_form, cand_form = _form(ref_value), _form(candidate[name])
            if ref_form != cand_form:
                raise BadDataError(
                    f"output '{name}' has shape {_show(cand_form)} in the candidate and "
                    f"{_show(ref_form)} in the reference"
                )
        self.samples += 1
        for name, ref_value in reference.items():
            ref64, cand64 = _vectors(ref_value, candidate[name])
            shape = np.shape(ref_value) if isinstance(ref_value, np.ndarray) else (
                (len(ref_value),) if isinstance(ref_value, list) else (0,)
            )
            sums = self.sums.setdefault(name, _Sums(shape=tuple(shape)))
            broken = np.isfinite(ref64) & ~np.isfinite(cand64)
            if broken.any():
                sums.nonfinite += int(broken.sum())
                cand64 = np.where(broken, 0.0, cand64)  # keep the other sums meaningful
            err = ref64 - cand64
            sums.count += ref64.size
            if ref64.size:
                sums.abs_sum += float(np.abs(err).sum())
                sums.max_abs = max(sums.max_abs, float(np.abs(err).max()))
                sums.ref_max_abs = max(sums.ref_max_abs, float(np.abs(ref64).max()))
            sums.ref_sq += float(ref64 @ ref64)
            sums.cand_sq += float(cand64 @ cand64)
            sums.err_sq += float(err @ err)
            sums.dot += float(ref64 @ cand64)
            ref = ref_value
            if isinstance(ref, np.ndarray) and ref.dtype.kind == "f" and ref.ndim == 2 and (
                ref.shape[1] > 1
            ):
                cand = np.asarray(candidate[name])
                sums.class_scores = True
                sums.rows += ref.shape[0]
                sums.rows_agree += int((ref.argmax(axis=1) == cand.argmax(axis=1)).sum())

    def result(self) -> Fidelity:
        if not self.samples:
            raise BadDataError("no samples were compared")
        outputs = []
        for name, s in self.sums.items():
            norm = math.sqrt(s.ref_sq) * math.sqrt(s.cand_sq)
            if s.nonfinite:
                cosine = -1.0
            elif s.err_sq == 0:
                cosine = 1.0  # identical outputs (rounding would give 0.9999999999999998)
            elif norm > 0:
                cosine = s.dot / norm
            else:
                cosine = 1.0 if s.ref_sq == s.cand_sq else 0.0
            sqnr = -math.inf if s.nonfinite else sqnr_db(s.ref_sq, s.err_sq)
            outputs.append(
                OutputFidelity(
                    name=name,
                    shape=s.shape,
                    max_abs_error=math.inf if s.nonfinite else s.max_abs,
                    mean_abs_error=(
                        math.inf if s.nonfinite else s.abs_sum / s.count if s.count else 0.0
                    ),
                    cosine=cosine,
                    sqnr_db=sqnr,
                    top1_agreement=s.rows_agree / s.rows if s.class_scores and s.rows else None,
                    reference_max_abs=s.ref_max_abs,
                    nonfinite=s.nonfinite,
                )
            )
        return Fidelity(tuple(outputs), self.samples)


def _form(value: Any) -> object:
    """The structure of an output value: an array's shape, a sequence's element forms, or None
    for an empty optional (two values compare only when their forms are equal)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return ("sequence", tuple(_form(v) for v in value))
    return tuple(np.shape(value))


def _show(form: object) -> str:
    if form is None:
        return "(empty optional)"
    if isinstance(form, tuple) and form[:1] == ("sequence",):
        return f"sequence of {len(form[1])}"  # type: ignore[arg-type]
    return str(list(form))  # type: ignore[call-overload]


def _vectors(reference: Any, candidate: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both values as flat float64 vectors of equal length (same `_form`): arrays raveled,
    sequences concatenated, empty optionals empty; strings as 1 (reference) and 1 or 0
    (candidate, equal or not)."""
    if reference is None:
        return np.zeros(0), np.zeros(0)
    if isinstance(reference, (list, tuple)):
        pairs = [_vectors(r, c) for r, c in zip(reference, candidate, strict=True)]
        if not pairs:
            return np.zeros(0), np.zeros(0)
        return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    ref, cand = np.asarray(reference), np.asarray(candidate)
    if ref.dtype.kind in "OSU" or cand.dtype.kind in "OSU":
        same = (ref == cand).astype(np.float64).ravel()
        return np.ones_like(same), same
    return ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()


def compare_outputs(
    reference: Iterable[Mapping[str, Any]], candidate: Iterable[Mapping[str, Any]]
) -> Fidelity:
    """Fidelity of already-computed outputs, paired in order."""
    accumulator = FidelityAccumulator()
    for ref, cand in zip(reference, candidate, strict=True):
        accumulator.add(ref, cand)
    return accumulator.result()


def compare(
    reference: ir.Model | ort.InferenceSession,
    candidate: ir.Model | ort.InferenceSession,
    feeds: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]],
    *,
    threads: int | None = None,
) -> Fidelity:
    """Run both models on every feed and measure how close the candidate's outputs are.

    Args:
        reference: the model before a transformation: an `onnx_ir.Model`, a path or a session.
        candidate: the model after it (same kinds); it must have the same output names.
        feeds: one feed dict or an iterable of them.
        threads: intra-op threads for sessions created here.

    Returns:
        A `Fidelity`; `print()` shows the table `slimgraph compare` prints.

    Raises:
        BadDataError: feeds that do not fit the models, or output names that differ.
        ModelLoadError: a path that cannot be loaded.

    Example:
        >>> fidelity = compare(model, quantized, random_feeds(model))  # doctest: +SKIP
        >>> fidelity.worst_cosine > 0.99  # doctest: +SKIP
    """
    ref_session = _session(reference, threads)
    cand_session = _session(candidate, threads)
    accumulator = FidelityAccumulator()
    for feed in iter_feeds(feeds):
        accumulator.add(run(ref_session, feed), run(cand_session, feed))
    return accumulator.result()


def _session(model: ir.Model | ort.InferenceSession, threads: int | None) -> ort.InferenceSession:
    if is_session(model):
        return model
    return create_session(model, threads=threads)
