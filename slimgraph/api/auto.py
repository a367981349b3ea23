"""`slimgraph.auto`: the fastest model on onnxruntime that holds an accuracy budget.

The search reuses the package's verbs and runner rather than compression code of its own: the
candidates are `sweep` grids (`slimgraph.api.auto_plan`: channel pruning at a few global ratios
with distillation from the input model when training data is given, low-rank factorization,
static int8 per-channel, dynamic int8, the transformer fusions, int4 weight-only where the batch
is small), each grid built on dask.distributed with progress and timed side by side with the
input model at the user's batch (`runtime.benchmark`: interleaved shuffled rounds, medians). The
fronts are marked over all candidates (latency against the metric, size against the metric);
the winner is the fastest candidate that holds the budget and is faster than the input.

The finalists (the fastest candidates that hold the budget, at most `FINALISTS`) are then
raced once more side by side with the input, with more rounds (`confirm_speed`, the one place a
stricter speed guard plugs in). As the speed guard of the other commands does, the race judges
them against the input in the form `slimgraph optimize` writes it by default (the lossless
preset, `api._speed.speed_baseline`), timed in the same race: the fastest measured faster than
that wins; a race where none is faster refuses them all unless `allow_slower`. Latency ratios in
the table stay relative to the input as given (the grids time against it).

Budgets: `max_drop` is an absolute drop of top-1 accuracy (the data must carry labels; 0.01 is
one point), `min_cosine` the worst output cosine to the input model. A budget no candidate
meets raises `BudgetNotMetError` (exit 1) naming the best figures found; nothing is written.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx_ir as ir

import slimgraph.ir as sg_ir
from slimgraph._tables import format_metric, format_ratio
from slimgraph.api._options import takes_options
from slimgraph.api._speed import speed_baseline
from slimgraph.api.auto_plan import Stage, matmul_rows, plan
from slimgraph.api.sweep import CandidateResult, SweepResult, pareto_flags, sweep
from slimgraph.errors import BadOptionError, SlimgraphError
from slimgraph.runtime.bench import benchmark
from slimgraph.runtime.metrics import DEFAULT_LABELS, load_data
from slimgraph.runtime.speed_guard import LOSSLESS_BASELINE

__all__ = ["AutoOptions", "AutoResult", "BudgetNotMetError", "Race", "auto", "auto_with_report",
           "confirm_speed"]

logger = logging.getLogger(__name__)

# Latency rounds of the search (per grid) and of the winner's confirmation.
SEARCH_ROUNDS = 10
CONFIRM_ROUNDS = 30
# Candidates raced against each other and the input at the end.
FINALISTS = 6
# Distillation epochs per pruned or factorized candidate.
DEFAULT_EPOCHS = 8


class BudgetNotMetError(SlimgraphError):
    """No candidate holds the budget (or none is faster than the input): exit 1, nothing written.

    Attributes:
        result: the search's `AutoResult` (every candidate's figures).
    """

    exit_code = 1

    def __init__(self, message: str, result: AutoResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True, kw_only=True)
class AutoOptions:
    """The keywords of `auto` (each is described there).

    Example:
        >>> AutoOptions(max_drop=0.01, batch=256).batch
        256
    """

    max_drop: float | None = None
    min_cosine: float | None = None
    train: str | os.PathLike[str] | None = None
    batch: int = 1
    time_budget: float | None = None
    epochs: int = DEFAULT_EPOCHS
    workers: int | None = None
    labels: str = DEFAULT_LABELS
    progress: bool | None = None
    speed_check: bool = True
    allow_slower: bool = False


@dataclass
class AutoResult:
    """What `auto` tried and chose.

    Attributes:
        candidates: every candidate of every grid run (renumbered in order), with its figures;
            `pareto` / `pareto_size` mark the fronts over all of them.
        metric_name: "accuracy" (`max_drop`) or "cosine" (`min_cosine`).
        threshold: the lowest metric the budget allows; `budget`: the budget as text.
        baseline: the input model's figures (size, MACs, metric, samples).
        winner: index into `candidates` of the model written, or None.
        confirmed: the winner's latency / the lossless-optimized input's (`confirmed_against`
            names the baseline: the input itself when the preset changes nothing) from
            `confirm_speed`, and its 90% interval; None (no winner, or the check was skipped).
        stages: the grids run, by name; `skipped`: the ones the time budget left out.
        seconds: wall time of the search; `batch`: rows per timed run.
    """

    candidates: list[CandidateResult]
    metric_name: str
    threshold: float
    budget: str
    baseline: dict[str, Any]
    batch: int
    stages: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    winner: int | None = None
    confirmed: tuple[float, float, float] | None = None
    confirmed_against: str = "input"
    seconds: float = 0.0
    cluster: str = ""

    def metric_of(self, record: CandidateResult) -> float | None:
        return record.cosine if self.metric_name == "cosine" else record.accuracy

    def holds(self, record: CandidateResult) -> bool:
        """The candidate was built and holds the budget."""
        value = self.metric_of(record)
        return record.status == "ok" and value is not None and value >= self.threshold - 1e-12

    @property
    def best(self) -> CandidateResult | None:
        """The winner, else the candidate closest to the budget (highest metric, then fastest)."""
        if self.winner is not None:
            return self.candidates[self.winner]
        ok = [c for c in self.candidates if c.status == "ok" and self.metric_of(c) is not None]
        return max(ok, key=lambda c: (self.metric_of(c) or 0.0, -(c.latency_ratio or 9.0)),
                   default=None)

    def as_sweep(self) -> SweepResult:
        """The candidates as one `SweepResult` (its table, report page and JSON)."""
        return SweepResult(self.candidates, self.metric_name, self.baseline, self.cluster,
                           SEARCH_ROUNDS)

    def figures(self, record: CandidateResult | None) -> str:
        """`'prune=0.5 ... ': accuracy 99.1%, 0.31x latency, 40 KiB`."""
        if record is None:
            return "no candidate was built"
        name = self.metric_name
        return (f"'{record.candidate.name}': {name} {format_metric(self.metric_of(record), name)}"
                f", latency {format_ratio(record.latency_ratio)} of the input at batch "
                f"{self.batch}, {(record.size_bytes or 0) / 1024:.1f} KiB")

    def to_dict(self) -> dict[str, Any]:
        return {**self.as_sweep().to_dict(), "budget": self.budget, "threshold": self.threshold,
                "batch": self.batch, "stages": self.stages, "skipped": self.skipped,
                "notes": self.notes, "winner": self.winner,
                "confirmed": list(self.confirmed) if self.confirmed else None,
                "confirmed_against": self.confirmed_against,
                "seconds": self.seconds}

    def __str__(self) -> str:
        lines = [str(self.as_sweep()), f"budget: {self.budget}; {len(self.stages)} grid(s) run"
                 + (f", skipped for time: {', '.join(self.skipped)}" if self.skipped else "")
                 + f", {self.seconds:.0f} s"]
        lines += [f"note: {note}" for note in self.notes]
        if self.winner is not None:
            lines.append(f"winner #{self.winner} {self.figures(self.candidates[self.winner])}")
            if self.confirmed is not None:
                ratio, low, high = self.confirmed
                lines.append(f"confirmed: {format_ratio(ratio)} of the {self.confirmed_against}'s "
                             f"latency [{low:.2f}-{high:.2f}], {CONFIRM_ROUNDS} interleaved "
                             "rounds")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<AutoResult: {len(self.candidates)} candidates, winner {self.winner}, "
                f"{self.budget}>")


@dataclass(frozen=True)
class Race:
    """A finalist's figures in `confirm_speed`'s race: median latency / the input's
    (`to_input`) and / the baseline's (`to_baseline`, what is judged: the lossless-optimized
    input, or the input itself), each `(ratio, low, high)` with its 90% bootstrap interval."""

    to_input: tuple[float, float, float]
    to_baseline: tuple[float, float, float]


def confirm_speed(
    model: str | os.PathLike[str] | ir.Model,
    candidates: Sequence[str | os.PathLike[str] | ir.Model],
    feed: dict[str, Any],
    *,
    rounds: int = CONFIRM_ROUNDS,
    baseline: ir.Model | None = None,
) -> list[Race]:
    """Each candidate's median latency / the input's and / `baseline`'s (the lossless-optimized
    input, `api._speed.speed_baseline`; None: the input is the baseline), all side by side in one
    `runtime.benchmark` (interleaved shuffled rounds), with 90% bootstrap intervals. The one
    place `auto` measures the finalists' speed (a stricter speed guard plugs in here)."""
    labels = [f"candidate {i}" for i in range(len(candidates))]
    if baseline is None:
        timed = benchmark([model, *candidates], feed, labels=["input", *labels], rounds=rounds,
                          warmup=2)  # fmt: skip
        return [Race(figures, figures) for figures in
                ((t.ratio, t.ratio_low, t.ratio_high) for t in timed.timings[1:])]
    timed = benchmark([model, baseline, *candidates], feed,
                      labels=["input", "lossless-optimized input", *labels], rounds=rounds,
                      warmup=2)  # fmt: skip
    # `comparisons` hold a / b for a listed before b: the baseline before every candidate
    inverse = {c.b: (1 / c.ratio, 1 / c.high, 1 / c.low) for c in timed.comparisons
               if c.a == "lossless-optimized input"}
    return [Race((t.ratio, t.ratio_low, t.ratio_high), inverse[t.label])
            for t in timed.timings[2:]]


@takes_options(AutoOptions)
def auto_with_report(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    options: AutoOptions,
) -> tuple[ir.Model, AutoResult]:
    """Like `auto`, also returning the search.

    Args: as for `auto`.

    Returns:
        (the winning model, `AutoResult`: every candidate with its figures, the fronts, the
        winner, the grids run and the ones the time budget left out).

    Raises: as for `auto`.

    Example:
        >>> fast, search = auto_with_report("m.onnx", "val.npz", min_cosine=0.99)  # doctest: +SKIP
    """
    return _auto(model, data, options)


@takes_options(AutoOptions)
def auto(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    options: AutoOptions,
) -> ir.Model:
    """The fastest model on onnxruntime that holds the accuracy budget.

    Searches channel pruning (a few global ratios, distilled from the input model on `train`),
    low-rank factorization (with `train`), precision (static int8 per-channel calibrated on
    `train`'s inputs, else `data`'s; dynamic int8; int4 weight-only at small batches) and, on
    models with attention, the transformer fusions (`slimgraph.api.auto_plan`). Every candidate is
    built on dask.distributed like `sweep`, judged on `data` and timed against the input at
    `batch`; the winner is the fastest that holds the budget and is faster than the input.

    Args:
        model: the input .onnx path (never modified).
        data: validation .npz: the model's inputs, plus `labels` for `max_drop`.
        max_drop: largest absolute drop of top-1 accuracy (0.01: one point); or
        min_cosine: lowest worst-output cosine to the input model.
        train: training .npz (inputs + labels) for distillation after pruning and low-rank.
        batch: rows of `data` per timed run (give the batch the model is served at).
        time_budget: minutes; no grid is launched after this much time (the first always runs,
            a running one finishes).
        epochs: distillation epochs per candidate.
        workers: dask worker processes (default min(4, cores)).
        labels: the labels key of `data` and `train`.
        progress: progress bars (None: when stderr is a terminal).
        speed_check: confirm the winner is faster than the input in the form `optimize` writes
            it by default (`confirm_speed`).
        allow_slower: keep a winner the confirmation measures slower (logged), not refuse it.

    Returns:
        The winning model (an `ir.Model`).

    Raises:
        BadOptionError: neither or both budgets, `max_drop` without labels in `data`, a batch
            below 1 or larger than `data`, a bad time budget; dask.distributed missing.
        BadDataError: data that does not fit the model.
        BudgetNotMetError: no candidate holds the budget and is faster than the input (the
            message names the best figures found; `.result` has them all).

    Example:
        >>> fast = sg.auto("cnn.onnx", "val.npz", train="train.npz", max_drop=0.01,
        ...                batch=64)  # doctest: +SKIP
    """
    return _auto(model, data, options)[0]


def _check(options: AutoOptions, rows: int, labelled: bool) -> None:
    if (options.max_drop is None) == (options.min_cosine is None):
        raise BadOptionError("give one budget: --max-drop D or --min-cosine C")
    if options.max_drop is not None and not 0 <= options.max_drop < 1:
        raise BadOptionError(f"--max-drop is an absolute accuracy drop in [0, 1) (0.01 is one "
                             f"point), got {options.max_drop}")
    if options.min_cosine is not None and not -1 <= options.min_cosine <= 1:
        raise BadOptionError(f"--min-cosine must be in [-1, 1], got {options.min_cosine}")
    if options.max_drop is not None and not labelled:
        raise BadOptionError(f"--max-drop needs labels in --data (key '{options.labels}'); "
                             "without labels give --min-cosine")
    if options.batch < 1 or options.batch > rows:
        raise BadOptionError(f"--batch must be between 1 and the {rows} rows of --data, "
                             f"got {options.batch}")
    if options.time_budget is not None and not options.time_budget > 0:
        raise BadOptionError(f"--time-budget is minutes > 0, got {options.time_budget}")
    if options.epochs < 1:
        raise BadOptionError(f"--epochs must be at least 1, got {options.epochs}")


def _auto(
    model: str | os.PathLike[str], data: str | os.PathLike[str], options: AutoOptions
) -> tuple[ir.Model, AutoResult]:
    start = time.perf_counter()
    source = Path(model)
    input_model = sg_ir.load(source)
    values = load_data(data, input_model, labels=options.labels)
    _check(options, values.samples, values.labels is not None)
    train = None
    if options.train is not None:
        train = str(Path(options.train).resolve())
        load_data(train, input_model, labels=options.labels)
    feed = next(values.batches(options.batch, input_model))[0]
    # Calibration: the training inputs when given (the validation rows stay unseen), else the
    # validation inputs.
    calibration = train or str(Path(data).resolve())
    stages = plan(input_model, train=train, calibration=True, rows=matmul_rows(feed),
                  epochs=options.epochs)
    metric = "cosine" if options.min_cosine is not None else "accuracy"
    result = AutoResult([], metric, 0.0, "", {}, options.batch)
    with tempfile.TemporaryDirectory(prefix="slimgraph-auto-") as scratch:
        for index, stage in enumerate(stages):
            minutes = (time.perf_counter() - start) / 60
            if index and options.time_budget is not None and minutes >= options.time_budget:
                result.skipped += [s.name for s in stages[index:]]
                logger.warning("time budget of %g min reached after %.1f min: %s not tried",
                               options.time_budget, minutes, ", ".join(result.skipped))
                break
            _run_stage(result, stage, source, data, calibration, Path(scratch) / str(index),
                       options)
        result.threshold, result.budget = _threshold(result, options)
        _mark_fronts(result.candidates)
        result.seconds = time.perf_counter() - start
        winner = _choose(result, input_model, source, feed, options)
        result.seconds = time.perf_counter() - start
        chosen = None if winner is None else sg_ir.load(str(result.candidates[winner].path))
        for record in result.candidates:
            record.path = None  # the scratch folder goes now
    if chosen is None:
        raise BudgetNotMetError(_unmet(result), result)
    return chosen, result


def _run_stage(
    result: AutoResult,
    stage: Stage,
    source: Path,
    data: str | os.PathLike[str],
    calibration: str,
    scratch: Path,
    options: AutoOptions,
) -> None:
    """One grid on dask (sweep); its candidates join `result`, renumbered, files kept in
    `scratch` (the sweep keeps every model on one of its fronts; the winner is always one)."""
    logger.info("auto: %s (%s)", stage.name, stage.grid)
    swept = sweep(source, stage.grid, data, calibration=calibration, out=scratch,
                  workers=options.workers, labels=options.labels, rounds=SEARCH_ROUNDS,
                  batch=options.batch, progress=options.progress)
    result.stages.append(stage.name)
    result.notes += list(stage.notes)
    result.baseline, result.cluster = dict(swept.baseline), swept.cluster
    if result.metric_name == "cosine":  # the input model against itself
        result.baseline.update(metric_name="cosine", metric=1.0)
    for record in swept.candidates:
        if not record.candidate.steps:
            continue  # the input model itself: it is the baseline
        number = len(result.candidates)
        candidate = replace(record.candidate, index=number)
        merged = replace(record, candidate=candidate)
        merged.metric = result.metric_of(merged)
        result.candidates.append(merged)


def _threshold(result: AutoResult, options: AutoOptions) -> tuple[float, str]:
    if options.min_cosine is not None:
        return options.min_cosine, f"cosine >= {options.min_cosine:g}"
    base = float(result.baseline.get("metric") or 0.0)
    drop = float(options.max_drop or 0.0)
    return base - drop, (f"accuracy >= {format_metric(base - drop, 'accuracy')} (input "
                         f"{format_metric(base, 'accuracy')} - {drop:g})")


def _mark_fronts(records: Sequence[CandidateResult]) -> None:
    """The fronts over every grid's candidates (latency vs metric, size vs metric)."""
    def points(key: str) -> list[tuple[float, float] | None]:
        out: list[tuple[float, float] | None] = []
        for r in records:
            x = getattr(r, key)
            ok = r.status == "ok" and x is not None and r.metric is not None
            out.append((float(x), float(r.metric)) if ok else None)  # type: ignore[arg-type]
        return out

    for record, flag in zip(records, pareto_flags(points("latency_ratio")), strict=True):
        record.pareto = flag
    for record, flag in zip(records, pareto_flags(points("size_bytes")), strict=True):
        record.pareto_size = flag


def _choose(
    result: AutoResult, model: ir.Model, source: Path, feed: dict[str, Any],
    options: AutoOptions,
) -> int | None:
    """The winner: the candidates that hold the budget and looked faster than the input in
    their grid's timing (at most `FINALISTS`, fastest first) are raced once more side by side
    with the input and its lossless-optimized form (`confirm_speed`, `CONFIRM_ROUNDS` rounds;
    their latencies become the race's figures, still relative to the input as given); the
    fastest of them measured faster than the lossless-optimized input wins (with
    `allow_slower`, the fastest). Without `speed_check` the grid timings decide."""
    holding = sorted((r for r in result.candidates
                      if result.holds(r) and r.latency_ratio is not None and r.path is not None
                      and (r.latency_ratio < 1 or options.allow_slower)),
                     key=lambda r: (r.latency_ratio, -(result.metric_of(r) or 0.0)))
    finalists = holding[:FINALISTS]
    if not finalists:
        return None
    if not options.speed_check:
        result.winner = finalists[0].candidate.index
        return result.winner
    baseline = speed_baseline(model)
    against = "input" if baseline is None else LOSSLESS_BASELINE
    raced = confirm_speed(source, [str(r.path) for r in finalists], feed, baseline=baseline)
    for record, race in zip(finalists, raced, strict=True):
        record.latency_ratio, record.latency_interval = race.to_input[0], race.to_input[1:]
    _mark_fronts(result.candidates)
    result.notes.append(f"{len(finalists)} finalist(s) raced side by side with the input"
                        + ("" if baseline is None else f" and the {against}")
                        + f" ({CONFIRM_ROUNDS} rounds): their latencies are the race's")
    best = min(range(len(finalists)), key=lambda i: raced[i].to_baseline[0])
    ratio = raced[best].to_baseline[0]
    if ratio >= 1.0:
        if not options.allow_slower:
            result.notes.append(f"the fastest finalist ran {format_ratio(ratio)} of the "
                                f"{against}'s latency")
            return None
        logger.warning("the winner is %s of the %s's latency at batch %d; written anyway "
                       "(--allow-slower)", format_ratio(ratio), against, options.batch)
    result.winner, result.confirmed = finalists[best].candidate.index, raced[best].to_baseline
    result.confirmed_against = against
    return result.winner


def _unmet(result: AutoResult) -> str:
    best = result.best
    if best is not None and result.holds(best):
        return (f"no candidate faster than the input (in the form `slimgraph optimize` writes it) "
                f"holds {result.budget}; the best found: "
                f"{result.figures(best)}; nothing written")
    return (f"no candidate holds {result.budget}; the best found: {result.figures(best)}; "
            "nothing written")
