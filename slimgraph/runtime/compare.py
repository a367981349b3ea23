"""Output fidelity of a candidate model against a reference, both run on onnxruntime.

Statistics accumulate over all samples (sums, not stored outputs), so comparing on many samples
costs no more memory than on one. `compare` reads its data like every public function
(`runtime.data.as_data`: an `.npz` path, stacked arrays, `LabelledData`), so a labels key adds
both models' top-1 accuracy; without data it draws random inputs and says so. Two causal language
models (token ids in, logits [batch, seq, vocab] out; `runtime.perplexity.lm_spec`) compared on
data also get both perplexities and their next-token agreement (`LMScores`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from slimgraph._tables import (
    format_cosine,
    format_db,
    format_percent,
    format_points,
    format_shape,
    render_fields,
    render_table,
)
from slimgraph.errors import (
    BadDataError,
    BadOptionError,
    SlimgraphError,
    UnsupportedModelError,
    first_line,
)
from slimgraph.ir import as_model, metadata
from slimgraph.runtime._decoder import decoder_io, empty_past_fitter
from slimgraph.runtime.data import DEFAULT_LABELS, DataLike, LabelledData, as_data, top1_correct
from slimgraph.runtime.feeds import calibrated_ranges, input_specs, random_feeds, sample_count
from slimgraph.runtime.perplexity import LMAccumulator, LMScores, LMSpec, lm_spec_or_reason
from slimgraph.runtime.quant_math import sqnr_db
from slimgraph.runtime.session import create_session, is_session, run

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "OutputFidelity", "Fidelity", "Accuracy", "compare", "compare_outputs",
    "FidelityAccumulator", "random_data_note", "DATA_BATCH", "RANDOM_BATCH", "RANDOM_BATCHES",
]

# What `compare` runs the models on: data as `data=` takes it, feed dicts (or (feeds, labels)
# pairs), or None for random inputs.
CompareData = DataLike | Iterable[Any] | None

# Rows per run when comparing on data; rows per random batch and how many random batches.
DATA_BATCH = 64
RANDOM_BATCH = 8
RANDOM_BATCHES = 4


@dataclass(frozen=True)
class OutputFidelity:
    """How close one output of the candidate is to the reference's.

    `shape` is the output's over every run, stacked on axis 0 ([450, 10] for 450 samples of 10
    class scores; one run's shape when runs differ beyond axis 0).
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
class Accuracy:
    """Top-1 accuracy of the reference and the candidate on the same labelled rows.

    Attributes:
        labels: the labels key of the data.
        samples: labelled rows.
        reference, candidate: fractions in [0, 1]; `drop` = reference - candidate.
    """

    labels: str
    samples: int
    reference: float
    candidate: float

    @property
    def drop(self) -> float:
        return self.reference - self.candidate

    def to_dict(self) -> dict[str, object]:
        return {"labels": self.labels, "samples": self.samples, "reference": self.reference,
                "candidate": self.candidate, "drop": self.drop}

    def __str__(self) -> str:
        return (f"top-1 accuracy ('{self.labels}', {self.samples} samples): reference "
                f"{format_percent(self.reference)}, candidate {format_percent(self.candidate)}, "
                f"drop {format_points(self.drop)}")


@dataclass(frozen=True)
class Fidelity:
    """Per-output fidelity over `samples` rows, and both models' accuracy with labels.

    Attributes:
        outputs: one `OutputFidelity` per output, in the reference's order.
        samples: rows compared (axis 0 of the inputs; of the outputs for precomputed ones).
        batches: onnxruntime runs they took.
        accuracy: both models' top-1 accuracy when the data had labels, else None.
        data: where the inputs came from ("val.npz (450 samples)", "random inputs (...)").
        note: what the figures mean when they come from random inputs.
        language_model: both models' perplexity and next-token agreement, for two causal
            LMs compared on data; else None.
    """

    outputs: tuple[OutputFidelity, ...]
    samples: int
    batches: int | None = None
    accuracy: Accuracy | None = None
    data: str | None = None
    note: str | None = None
    language_model: LMScores | None = None

    @property
    def worst_cosine(self) -> float:
        return min(output.cosine for output in self.outputs)

    @property
    def worst_sqnr_db(self) -> float:
        return min(output.sqnr_db for output in self.outputs)

    def to_dict(self) -> dict[str, object]:
        data: dict[str, object] = {}
        if self.data is not None:
            data["data"] = self.data
        if self.note is not None:
            data["note"] = self.note
        data.update(samples=self.samples, batches=self.batches,
                    outputs=[asdict(o) for o in self.outputs])
        if self.accuracy is not None:
            data["accuracy"] = self.accuracy.to_dict()
        if self.language_model is not None:
            data["language_model"] = self.language_model.to_dict()
        return data

    def table(self, head: Sequence[tuple[str, str]] = ()) -> str:
        """The table `slimgraph compare` prints: where the inputs came from (after the `head`
        fields, e.g. the models' files), one row per output, the worst figures, and both
        models' accuracy with labels."""
        rows = [
            [
                out.name, format_shape(out.shape), out.max_abs_error, out.mean_abs_error,
                format_cosine(out.cosine), format_db(out.sqnr_db),
                None if out.top1_agreement is None else format_percent(out.top1_agreement),
            ]
            for out in self.outputs
        ]  # fmt: skip
        headers = ["output", "shape", "max abs", "mean abs", "cosine", "SQNR dB", "top-1"]
        fields = [*head, *((k, v) for k, v in (("data", self.data), ("note", self.note))
                           if v is not None)]
        lines = [render_fields(fields), ""] if fields else []
        lines += [render_table(headers, rows, align="llrrrrr"), "", self.worst()]
        if self.accuracy is not None:
            lines.append(str(self.accuracy))
        if self.language_model is not None:
            lines += self.language_model.lines()
        return "\n".join(lines)

    def worst(self) -> str:
        """One line: the worst output's cosine and SQNR, on how many samples."""
        runs = f" in {self.batches} run{'s' if self.batches > 1 else ''}" if self.batches else ""
        return (f"worst cosine {format_cosine(self.worst_cosine)}, worst SQNR "
                f"{format_db(self.worst_sqnr_db)} dB ({self.samples} samples{runs})")

    def output_lines(self) -> list[str]:
        """One line per output: cosine, SQNR and top-1 agreement (the quantize summaries)."""
        lines = []
        for out in self.outputs:
            agreement = ("" if out.top1_agreement is None
                         else f", top-1 agreement {format_percent(out.top1_agreement)}")
            lines.append(f"output {out.name}: cosine {format_cosine(out.cosine)}, SQNR "
                         f"{format_db(out.sqnr_db)} dB{agreement}")
        return lines

    def summary_lines(self) -> list[str]:
        """`fidelity on DATA:` and one line per output, then both models' accuracy with labels
        (what `quantize` and `prune` print)."""
        lines = [f"fidelity on {self.data}:"]
        if self.note is not None:
            lines.append(f"  note: {self.note}")
        lines += [f"  {line}" for line in self.output_lines()]
        if self.accuracy is not None:
            lines.append(f"  {self.accuracy}")
        if self.language_model is not None:
            lines += [f"  {line}" for line in self.language_model.lines()]
        return lines

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        accuracy = "" if self.accuracy is None else f", drop {format_points(self.accuracy.drop)}"
        return (f"<Fidelity: {len(self.outputs)} output(s), {self.samples} samples, worst cosine "
                f"{format_cosine(self.worst_cosine)}{accuracy}>")


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
    """Streams pairs of outputs into fidelity statistics (used by `compare` and by passes).

    `samples` counts rows (the `rows` given to `add`, else axis 0 of the first output), `batches`
    the runs.
    """

    sums: dict[str, _Sums] = field(default_factory=dict)
    samples: int = 0
    batches: int = 0

    def add(
        self,
        reference: Mapping[str, Any],
        candidate: Mapping[str, Any],
        *,
        rows: int | None = None,
    ) -> None:
        """Add one run's outputs (by name); only running sums are kept, never the arrays.
        `rows`: the samples this run fed (default: axis 0 of the first output, else 1).

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
        self.batches += 1
        self.samples += rows if rows is not None else _leading_rows(reference)
        for name, ref_value in reference.items():
            ref64, cand64 = _vectors(ref_value, candidate[name])
            shape = _value_shape(ref_value)
            if name in self.sums:
                sums = self.sums[name]
                sums.shape = _stacked_shape(sums.shape, shape)
            else:
                sums = self.sums[name] = _Sums(shape=shape)
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
        if not self.batches:
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
        return Fidelity(tuple(outputs), self.samples, self.batches)


def _leading_rows(outputs: Mapping[str, Any]) -> int:
    first = _value_shape(next(iter(outputs.values()))) if outputs else ()
    return int(first[0]) if first else 1


def _value_shape(value: Any) -> tuple[int, ...]:
    """An array's shape; a sequence's length as (n,); (0,) for an empty optional."""
    if isinstance(value, (list, tuple)):
        return (len(value),)
    return tuple(np.shape(value)) if value is not None else (0,)


def _stacked_shape(shape: tuple[int, ...], more: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of two runs' outputs stacked on axis 0 (the first shape when they differ
    beyond axis 0: the column then shows one run's shape)."""
    if shape and more and shape[1:] == more[1:]:
        return (shape[0] + more[0], *shape[1:])
    return shape


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
    reference: ir.Model | str | os.PathLike[str] | ort.InferenceSession,
    candidate: ir.Model | str | os.PathLike[str] | ort.InferenceSession,
    data: CompareData = None,
    *,
    labels: str = DEFAULT_LABELS,
    batch_size: int | None = None,
    threads: int | None = None,
    random_batches: int = RANDOM_BATCHES,
    seed: int = 0,
    language_model: bool | None = None,
) -> Fidelity:
    """Run both models on the same inputs and measure how close the candidate's outputs are.

    Args:
        reference: the model before a transformation: an `onnx_ir.Model`, a path or a session.
        candidate: the model after it (same kinds); it must have the same output names.
        data: what to run them on, read like every public function's `data=`: an `.npz` path
            or a dict of arrays stacked on axis 0 (the model's input names, plus an optional
            labels key that is never fed: with it both models' top-1 accuracy is reported), or
            `LabelledData`; also an iterable of feed dicts (or of (feeds, labels) pairs). None:
            `random_batches` random batches (uniform in the candidate's calibrated input range
            when it is a statically quantized model, standard normal otherwise; the result's
            `note` says so).
        labels: the labels key of `data` (default "labels").
        batch_size: rows per run (default `DATA_BATCH` for data, `RANDOM_BATCH` for random
            inputs; a model with a fixed batch runs its own).
        threads: intra-op threads for sessions created here.
        random_batches, seed: the random inputs without `data`.
        language_model: score both models as causal LMs (perplexity, next-token agreement;
            `runtime.perplexity`): None does when both are models that look like one
            (`lm_spec`) and `data` is given, True requires it, False never does.

    Returns:
        A `Fidelity` (per output: cosine, SQNR, max/mean abs error, top-1 agreement; with labels
        `accuracy`; for two LMs `language_model`); `print()` shows the table `slimgraph
        compare` prints.

    Raises:
        BadDataError: data that does not fit the models (names, dtypes, shapes: the message
            lists what the model expects), or output names that differ.
        BadOptionError: no data and neither model given as a model (random inputs need its
            input spec), or a `data` of another type; `language_model=True` without data or
            for models that are not causal LMs.
        ModelLoadError: a path that cannot be loaded.

    Example:
        >>> print(compare(model, quantized, "val.npz"))  # doctest: +SKIP
        >>> compare(model, quantized, random_feeds(model)).worst_cosine > 0.99  # doctest: +SKIP
    """
    ref_model = None if is_session(reference) else as_model(reference)
    cand_model = None if is_session(candidate) else as_model(candidate)
    spec_model = ref_model if ref_model is not None else cand_model
    batches, source, note = _batches(data, spec_model, cand_model, labels=labels,
                                     batch_size=batch_size, random_batches=random_batches,
                                     seed=seed)
    lm = _lm_accumulator(ref_model, cand_model, data, language_model)
    ref_session = _session(reference if ref_model is None else ref_model, threads, "reference")
    cand_session = _session(candidate if cand_model is None else cand_model, threads,
                            "candidate")
    accumulator = FidelityAccumulator()
    rows = ref_correct = cand_correct = 0
    caches, cache_note = _pruned_caches(ref_model, cand_model)
    note = "; ".join(n for n in (note, cache_note) if n) or None
    ref_fit, cand_fit = empty_past_fitter(ref_model), empty_past_fitter(cand_model)
    for item in batches:
        feed, truth = item if isinstance(item, tuple) else (item, None)
        ref, cand = run(ref_session, ref_fit(feed)), run(cand_session, cand_fit(feed))
        if caches:
            ref = {k: v for k, v in ref.items() if k not in caches}
            cand = {k: v for k, v in cand.items() if k not in caches}
        accumulator.add(ref, cand, rows=_feed_rows(feed))
        if lm is not None:
            lm.add(feed, ref, cand)
        if truth is not None:
            ref_correct += top1_correct(next(iter(ref.values())), truth)
            cand_correct += top1_correct(next(iter(cand.values())), truth)
            rows += len(truth)
    fidelity = accumulator.result()
    accuracy = Accuracy(labels, rows, ref_correct / rows, cand_correct / rows) if rows else None
    return Fidelity(fidelity.outputs, fidelity.samples, fidelity.batches, accuracy, source, note,
                    None if lm is None else lm.result())


def _pruned_caches(reference: ir.Model | None, candidate: ir.Model | None
                   ) -> tuple[set[str], str | None]:
    """The present key/value outputs of two decode steps that declare different head counts
    (one has had heads pruned: its cache holds only the kept heads, nothing to compare them
    with), and the note saying they were left out."""
    if reference is None or candidate is None:
        return set(), None
    ref_io, cand_io = decoder_io(reference), decoder_io(candidate)
    if ref_io is None or cand_io is None:
        return set(), None

    def heads(model: ir.Model, names: Sequence[str]) -> dict[str, object]:
        shapes = {v.name: v.shape for v in model.graph.outputs}
        return {n: (s[1] if (s := shapes.get(n)) is not None and len(s) == 4 else None)
                for n in names}

    ref_heads = heads(reference, ref_io.present)
    cand_heads = heads(candidate, cand_io.present)
    differ = {n for n, h in ref_heads.items() if n in cand_heads and cand_heads[n] != h}
    if not differ:
        return set(), None
    return differ, (f"{len(differ)} present key/value outputs left out: the models keep "
                    "different numbers of key/value heads (head pruning)")


def _lm_accumulator(
    reference: ir.Model | None, candidate: ir.Model | None, data: CompareData,
    wanted: bool | None,
) -> LMAccumulator | None:
    """The LM scores' accumulator when both models are causal LMs scored on data (see
    `compare`'s `language_model`)."""
    if wanted is False:
        return None
    specs = [lm_spec_or_reason(m) if m is not None else "given as a session"
             for m in (reference, candidate)]
    spec = specs[0] if isinstance(specs[0], LMSpec) and specs[0] == specs[1] else None
    if wanted and spec is None:
        why = next((f"the {role} model: {found}" for role, found in
                    zip(("reference", "candidate"), specs, strict=True)
                    if isinstance(found, str)), "their inputs or logits differ")
        raise BadOptionError("perplexity needs two causal language models with the same "
                             "inputs (integer token ids [batch, seq] in, logits [batch, seq, "
                             f"vocab] out); {why}")
    if wanted and data is None:
        raise BadOptionError("perplexity needs token data (an .npz with input_ids [rows, seq])")
    return LMAccumulator(spec) if spec is not None and data is not None else None


def _batches(
    data: CompareData,
    model: ir.Model | None,
    candidate: ir.Model | None,
    *,
    labels: str,
    batch_size: int | None,
    random_batches: int,
    seed: int,
) -> tuple[Iterable[Any], str | None, str | None]:
    """The runs `compare` makes, where they come from, and the random-data note."""
    if data is None:
        if model is None:
            raise BadOptionError("compare: give data (random inputs need a model, not a session)")
        size = batch_size or _fixed_batch(model) or RANDOM_BATCH
        ranges = (calibrated_ranges(candidate) if candidate is not None else {}) or (
            calibrated_ranges(model))
        feeds = [random_feeds(model, batch=size, seed=seed + i, ranges=ranges)
                 for i in range(random_batches)]
        source = f"random inputs ({random_batches} batches of {size}, seed {seed})"
        return feeds, source, random_data_note(ranges)
    if isinstance(data, (LabelledData, str, os.PathLike, Mapping)) and model is not None:
        checked = as_data(data, model, labels=labels)
        runs = checked.batches(batch_size or DATA_BATCH, model)
        return runs, f"{checked.source} ({checked.samples} samples)", None
    if isinstance(data, Mapping):  # sessions only: one feed dict, as given
        return [data], None, None
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, os.PathLike)):
        return _feed_stream(data), None, None
    raise BadOptionError(
        f"compare: data must be an .npz path, a dict of arrays, LabelledData or an iterable of "
        f"feed dicts, got {type(data).__name__}"
    )


def _feed_stream(items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        if not isinstance(item, (Mapping, tuple)):
            raise BadOptionError(
                f"compare: an iterable of data must hold feed dicts or (feeds, labels) pairs, "
                f"got {type(item).__name__}"
            )
        yield item


def _feed_rows(feed: Mapping[str, np.ndarray]) -> int | None:
    try:
        return sample_count(feed) if feed else None
    except (IndexError, TypeError):  # a scalar input: no rows to count
        return None


def _fixed_batch(model: ir.Model) -> int | None:
    """The batch size of the model's first input with a fixed one, or None."""
    fixed = [s.shape[0] for s in input_specs(model) if s.shape and isinstance(s.shape[0], int)]
    return fixed[0] if fixed else None


def random_data_note(ranges: Mapping[str, tuple[float, float]]) -> str:
    """What a comparison on random inputs means: said wherever one is reported."""
    if ranges:
        spans = ", ".join(f"{name} in [{low:.4g}, {high:.4g}]" for name, (low, high) in
                          ranges.items())
        return (f"figures come from random data, drawn uniformly from the calibrated input "
                f"range of the quantized model ({spans}), not from real inputs")
    return ("figures come from random data (standard-normal floats, integer inputs 0 or 1), "
            "which may lie far outside what the model was calibrated or trained on, not real "
            "inputs")


def _session(
    model: ir.Model | ort.InferenceSession, threads: int | None, role: str
) -> ort.InferenceSession:
    """A session for `model`; one that onnxruntime cannot load is an `UnsupportedModelError`
    naming the model's file (or its role)."""
    if is_session(model):
        return model
    try:
        return create_session(model, threads=threads)
    except SlimgraphError:
        raise
    except Exception as error:  # onnxruntime's own classes (Fail, InvalidGraph, ...)
        name = model.meta.get(metadata.SOURCE_PATH) or f"the {role} model"
        raise UnsupportedModelError(
            f"{name}: onnxruntime cannot load the model: {first_line(error)}"
        ) from None
