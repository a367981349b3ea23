"""The speed guard: a compressed model must not run slower than its input on onnxruntime.

Every compressing command (quantize, prune, factorize, optimize, auto) times the model it is
about to write against the model it read, side by side (`runtime.bench.benchmark`: interleaved
rounds in a shuffled order, medians, a 90% paired bootstrap interval of the ratio of medians),
at each batch size asked (default 1 and 64; only the model's own size where its batch is fixed).

The input is judged in its fair fp32 form: a `baseline` model, the input as `slimgraph optimize`
writes it by default (its lossless preset, exact; the caller makes it: `api._options.
speed_baseline`, since the runtime imports no passes). A raw export can run several times slower
than that form (a depthwise net's raw export ran 5x slower than its optimized form), and a
result that only beats the raw export is slower than what `optimize` alone gives. The input as
given is timed in the same rounds when a run of it costs at most half of a round of the other
two (its ratio is reported, not judged); otherwise one run's figure is noted. `optimize` itself
is judged against its own input (no baseline).

A result is *slower beyond noise* at a batch when the whole interval of output / baseline lies above
`1 + TOLERANCE`, in two measurements taken one after the other (the second only when the first
says slower; the figures kept are the measurement whose interval starts lower). The bootstrap
interval covers the noise of the rounds of one measurement; on a loaded machine that is not all
the noise there is: one model timed against itself (A/A) on this 2-core machine with five
helpers' work running (load average 14) gave intervals wholly above 1.05 in 2 of 16 single
measurements, since bursts of other work hit a run of rounds, not single ones, and at load 19 the
lossless preset's output (no slower in kind) once read 1.31x (1.05-1.64) in both measurements.
The tolerance (10%) keeps a model a user could not measure as slower themselves from being
refused; the second measurement keeps a burst from refusing a good model.

The cost is bounded (`BUDGET_S`, split over the batches): one timed run of each model sets the
number of rounds that fit (at least `MIN_ROUNDS`, at most `MAX_ROUNDS`; each measurement repeats
a tiny model to 5 ms); a default batch whose `MIN_ROUNDS` rounds would not fit its share is
halved until they do (the check says which batch it timed instead; a batch asked is timed as
asked), and a slower first measurement costs its share once more. Session creation
(onnxruntime's graph optimizations) is outside the budget.

`speed_check` measures; `judge_speed` is the decision alone, on given `Timing` figures
(deterministic, what tests and other searches such as `slimgraph auto` call); `speed_guard`
measures, decides and raises `VerificationError` with the figures on a slower result unless
`allow_slower`. The environment variable `SLIMGRAPH_NO_SPEED_CHECK=1` skips the guard (the test
suite sets it: hundreds of tests write models and need not pay a few seconds each).

`channel_multiple()` is the channel count convolutions run fast at here: onnxruntime's CPU
convolutions take its NCHWc path (blocked channels, the fast kernels) only when the output
channels (and input channels, past the first layer) are a multiple of MLAS's block, 16 on a CPU
with AVX-512F and 8 otherwise (onnxruntime `core/optimizer/nchwc_transformer.cc`,
`MlasNchwcGetBlockSize`). Pruning rounds kept channel counts to it by default.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

try:  # numpy's own CPU feature detection (numpy >= 2); without it nothing is known: 8
    from numpy._core._multiarray_umath import (  # type: ignore[import-not-found]
        __cpu_features__ as _CPU_FEATURES,
    )
except ImportError:  # pragma: no cover
    _CPU_FEATURES = {}

from slimgraph.errors import BadOptionError, VerificationError
from slimgraph.ir import ModelLike, as_model
from slimgraph.runtime.bench import Timing, benchmark
from slimgraph.runtime.feeds import input_specs, random_feeds
from slimgraph.runtime.session import create_session, run

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "BUDGET_S",
    "DEFAULT_BATCHES",
    "ENV_SKIP",
    "LOSSLESS_BASELINE",
    "TOLERANCE",
    "BatchSpeed",
    "SpeedCheck",
    "channel_multiple",
    "guard_batches",
    "judge_speed",
    "skipped_by_environment",
    "speed_check",
    "speed_guard",
]

logger = logging.getLogger(__name__)

# The environment variable that skips the guard everywhere ("1", "true", "yes").
ENV_SKIP = "SLIMGRAPH_NO_SPEED_CHECK"
# Batch sizes timed when none is asked: one request, and a batch that fills the cores.
DEFAULT_BATCHES = (1, 64)
# Slower beyond noise: the whole 90% interval of output / input above 1 + TOLERANCE.
TOLERANCE = 0.10
# Seconds of timing rounds per check (split over the batches), and the rounds' bounds.
BUDGET_S = 4.0
MIN_ROUNDS = 9
MAX_ROUNDS = 60
# What a check with a `baseline` model judges the output against.
LOSSLESS_BASELINE = "lossless-optimized input"
# The input as given is timed alongside a baseline when one run of it costs at most this share
# of a round of the baseline and the output (it would otherwise take the rounds' time).
_GIVEN_SHARE = 0.5
# A measurement repeats a model's run until this long (`runtime.bench`); a round costs at least
# this per model.
_MIN_MEASUREMENT_S = 0.005


@dataclass(frozen=True)
class BatchSpeed:
    """Output against input at one batch size.

    Attributes:
        batch: the batch size timed.
        input_ms, output_ms: median latency of one run, ms (`input_ms`: the baseline's, the
            lossless-optimized input when the check had one).
        ratio: output / baseline (ratio of medians); `low`, `high` its 90% paired bootstrap
            interval.
        rounds: interleaved rounds measured.
        tolerance: the margin above 1.0 the interval must clear to count as slower.
        given_ms, given_ratio: the input as given (when a baseline was judged instead and the
            input was timed alongside): its median, and output / it. Not judged.
    """

    batch: int
    input_ms: float
    output_ms: float
    ratio: float
    low: float
    high: float
    rounds: int
    tolerance: float = TOLERANCE
    given_ms: float | None = None
    given_ratio: float | None = None

    @property
    def slower(self) -> bool:
        """Slower beyond noise: the whole interval above 1 + tolerance."""
        return self.low > 1.0 + self.tolerance

    def describe(self) -> str:
        """`batch 64: 1.31x (1.25-1.40)`, then `[0.40x of the input as given]` when timed."""
        given = "" if self.given_ratio is None else (
            f" [{self.given_ratio:.2f}x of the input as given]")
        return f"batch {self.batch}: {self.ratio:.2f}x ({self.low:.2f}-{self.high:.2f}){given}"


@dataclass(frozen=True)
class SpeedCheck:
    """What the speed guard measured and decided.

    Attributes:
        batches: one `BatchSpeed` per batch timed.
        seconds: wall time of the check (sessions included).
        allowed: the result was slower and written anyway (`allow_slower`).
        notes: batches not timed and why; the input as given when it was not timed alongside.
        baseline: what the output was judged against: "input" (as given) or
            "lossless-optimized input" (`LOSSLESS_BASELINE`).
    """

    batches: tuple[BatchSpeed, ...]
    seconds: float = 0.0
    allowed: bool = False
    notes: tuple[str, ...] = field(default=())
    baseline: str = "input"

    @property
    def slower(self) -> bool:
        """Slower than the input beyond noise at some batch."""
        return any(b.slower for b in self.batches)

    def line(self) -> str:
        """One line: the ratios and intervals at every batch, and the verdict."""
        figures = ", ".join(b.describe() for b in self.batches) or "nothing timed"
        slower = [str(b.batch) for b in self.batches if b.slower]
        if not slower:
            verdict = "not slower beyond noise"
        else:
            verdict = f"slower beyond noise at batch {', '.join(slower)}"
            if self.allowed:
                verdict += ", written anyway (--allow-slower)"
        notes = "".join(f"; {note}" for note in self.notes)
        return (f"latency of the output / the {self.baseline} on onnxruntime, {figures}: "
                f"{verdict}{notes}")

    def to_dict(self) -> dict[str, object]:
        return {
            "slower": self.slower,
            "allowed_slower": self.allowed,
            "baseline": self.baseline,
            "seconds": self.seconds,
            "interval": "90% paired bootstrap of the ratio of medians",
            "tolerance": self.batches[0].tolerance if self.batches else TOLERANCE,
            "batches": [
                {"batch": b.batch, "input_ms": b.input_ms, "output_ms": b.output_ms,
                 "ratio": b.ratio, "low": b.low, "high": b.high, "rounds": b.rounds,
                 "slower": b.slower, "input_as_given_ms": b.given_ms,
                 "ratio_to_input_as_given": b.given_ratio}
                for b in self.batches
            ],
            "notes": list(self.notes),
        }

    def table(self) -> dict[str, object]:
        """The `--report` table (tools.report schema)."""
        given = any(b.given_ms is not None for b in self.batches)
        return {"title": f"Speed check (output / {self.baseline} latency on onnxruntime)",
                "columns": ["batch", f"{self.baseline} ms", "output ms", "ratio", "90% interval",
                            "rounds", "slower beyond noise",
                            *(["input as given ms", "ratio to it"] if given else [])],
                "rows": [[b.batch, b.input_ms, b.output_ms, f"{b.ratio:.2f}x",
                          f"{b.low:.2f}-{b.high:.2f}", b.rounds, b.slower,
                          *([b.given_ms, "-" if b.given_ratio is None
                             else f"{b.given_ratio:.2f}x"] if given else [])]
                         for b in self.batches]}  # fmt: skip


def skipped_by_environment() -> bool:
    """`SLIMGRAPH_NO_SPEED_CHECK` is set to 1, true or yes."""
    return os.environ.get(ENV_SKIP, "").strip().lower() in ("1", "true", "yes")


def judge_speed(
    timings: Mapping[int, tuple[Timing, ...]] | Sequence[tuple[int, Timing, Timing]]
    | Sequence[tuple[int, Timing, Timing, Timing | None]],
    *,
    tolerance: float = TOLERANCE,
    rounds: int | Mapping[int, int] = 0,
    baseline: str = "input",
) -> SpeedCheck:
    """The decision alone, on measured figures: per batch, the baseline's and the output's
    `Timing` (the output's `ratio`, `ratio_low`, `ratio_high` relative to the baseline, as
    `benchmark` gives them when the baseline is its first model), and optionally the input as
    given's `Timing` (reported, not judged). `baseline` names what the output is judged against
    ("input", or `LOSSLESS_BASELINE`).

    Example:
        >>> base = Timing("input", 10.0, 11.0, 1.0, 1.0, 1.0)
        >>> judge_speed({64: (base, Timing("output", 13.0, 14.0, 1.3, 1.2, 1.4))}).slower
        True
    """
    items: list[tuple[int, tuple[Timing | None, ...]]] = (
        [(batch, tuple(figures)) for batch, figures in timings.items()]
        if isinstance(timings, Mapping) else [(row[0], tuple(row[1:])) for row in timings])
    batches = []
    for batch, figures in items:
        count = rounds.get(batch, 0) if isinstance(rounds, Mapping) else rounds
        before, after = figures[0], figures[1]
        assert before is not None and after is not None
        given = figures[2] if len(figures) > 2 else None
        batches.append(BatchSpeed(
            batch, before.median_ms, after.median_ms, after.ratio, after.ratio_low,
            after.ratio_high, count, tolerance,
            given_ms=None if given is None else given.median_ms,
            given_ratio=None if given is None else after.median_ms / given.median_ms))
    return SpeedCheck(tuple(batches), baseline=baseline)


def guard_batches(model: ir.Model, asked: Sequence[int] | int | None = None) -> tuple[int, ...]:
    """The batch sizes the guard times `model` at: `asked`, else `DEFAULT_BATCHES`; only the
    model's own batch when an input fixes its leading dimension.

    Raises:
        BadOptionError: a batch below 1; a batch asked that the model's fixed batch excludes.
    """
    wanted = (asked,) if isinstance(asked, int) else tuple(asked or ())
    if any(b < 1 for b in wanted):
        raise BadOptionError(f"batch sizes must be at least 1, got {list(wanted)}")
    fixed = {spec.shape[0] for spec in input_specs(model)
             if spec.shape and isinstance(spec.shape[0], int)}  # fmt: skip
    if fixed:
        size = min(fixed)
        if wanted and set(wanted) != {size}:
            raise BadOptionError(f"the model's batch is fixed to {size}: cannot time it at "
                                 f"batch {', '.join(map(str, wanted))}")
        return (size,)
    return wanted or DEFAULT_BATCHES


def speed_check(
    reference: ModelLike,
    candidate: ModelLike,
    *,
    baseline: ModelLike | None = None,
    batches: Sequence[int] | int | None = None,
    budget_s: float = BUDGET_S,
    tolerance: float = TOLERANCE,
    threads: int | None = None,
    seed: int = 0,
) -> SpeedCheck:
    """Time `candidate` against `baseline` (else `reference`) side by side at each batch (see
    the module docstring for the rounds, the budget and what counts as slower).

    Args:
        reference: the model that was compressed (the input as given).
        candidate: the compressed model.
        baseline: the model to judge against instead of `reference`: the lossless-optimized
            input (`LOSSLESS_BASELINE`). `reference` is then timed alongside when cheap.
        batches: batch sizes (default: `guard_batches`: 1 and 64, or the fixed batch).
        budget_s: seconds of timing rounds, split over the batches.
        tolerance: margin above 1.0 the interval must clear.
        threads: intra-op threads (None: all cores).
        seed: the inputs' and the round order's seed.

    Returns:
        A `SpeedCheck`.

    Raises:
        BadOptionError: a batch below 1, or one the model's fixed batch excludes.
        BadDataError: generated inputs that one of the models does not take.
    """
    start = time.perf_counter()
    reference, candidate = as_model(reference), as_model(candidate)
    judged = reference if baseline is None else as_model(baseline)
    models = [judged, candidate] if baseline is None else [judged, candidate, reference]
    sizes = guard_batches(reference, batches)
    asked = batches is not None
    sessions = [create_session(m, threads=threads) for m in models]
    share = budget_s / len(sizes)
    measured: list[tuple[int, Timing, Timing, Timing | None]] = []
    rounds: dict[int, int] = {}
    notes: list[str] = []
    for wanted in sizes:
        batch, first = wanted, 0.0
        while True:
            feeds = [random_feeds(m, batch=batch, seed=seed) for m in models]
            once = [_one_run(s, f) for s, f in zip(sessions[:2], feeds, strict=False)]
            per_round = sum(max(t, _MIN_MEASUREMENT_S) for t in once)
            first = first or per_round
            smaller = batch // 2
            if asked or MIN_ROUNDS * per_round <= share or smaller < 2 or smaller in sizes:
                break
            batch = smaller  # a default batch too slow for the budget: half of it
        if batch != wanted:
            notes.append(f"batch {batch} timed instead of {wanted} (one run of both models at "
                         f"{wanted} took {first:.2f} s)")
        timed = 2
        if baseline is not None:  # the input as given, once the batch is settled
            once.append(_one_run(sessions[2], feeds[2]))
            given = max(once[2], _MIN_MEASUREMENT_S)
            if given <= _GIVEN_SHARE * per_round:
                timed, per_round = 3, per_round + given
            else:
                notes.append(f"the input as given not timed at batch {batch}: one run took "
                             f"{once[2] / max(once[0], 1e-9):.1f}x the {LOSSLESS_BASELINE}'s")
        count = max(MIN_ROUNDS, min(MAX_ROUNDS, int(share / per_round)))
        pair = (sessions[:timed], feeds[:timed])
        before, after, given_timing = _measure(*pair, count, seed)
        if after.ratio_low > 1.0 + tolerance:  # slower: confirm with a second measurement
            again = _measure(*pair, count, seed + 1)
            if again[1].ratio_low < after.ratio_low:
                before, after, given_timing = again
        measured.append((batch, before, after, given_timing))
        rounds[batch] = count
    check = judge_speed(measured, tolerance=tolerance, rounds=rounds,
                        baseline="input" if baseline is None else LOSSLESS_BASELINE)
    seconds = time.perf_counter() - start
    logger.info("speed check in %.2f s: %s", seconds, check.line())
    return SpeedCheck(check.batches, seconds, False, tuple(notes), check.baseline)


def speed_guard(
    reference: ModelLike,
    candidate: ModelLike,
    *,
    baseline: ModelLike | None = None,
    batches: Sequence[int] | int | None = None,
    allow_slower: bool = False,
    budget_s: float = BUDGET_S,
    tolerance: float = TOLERANCE,
) -> SpeedCheck | None:
    """`speed_check`, then refuse a slower result: what every compressing command runs before
    it writes (with `baseline`, the lossless-optimized input, made by the caller:
    `api._options.guard_speed`).

    Returns:
        The `SpeedCheck` (`allowed` set when it was slower and `allow_slower` let it through),
        or None when `SLIMGRAPH_NO_SPEED_CHECK` skips the guard.

    Raises:
        VerificationError: slower than the input beyond noise at some batch, without
            `allow_slower`; the message is `SpeedCheck.line()` and how to write it anyway.
        BadOptionError: as for `speed_check`.
    """
    if skipped_by_environment():
        logger.info("speed check skipped (%s is set)", ENV_SKIP)
        return None
    check = speed_check(reference, candidate, baseline=baseline, batches=batches,
                        budget_s=budget_s, tolerance=tolerance)  # fmt: skip
    if not check.slower:
        return check
    if allow_slower:
        allowed = SpeedCheck(check.batches, check.seconds, True, check.notes, check.baseline)
        logger.warning("%s", allowed.line())
        return allowed
    raise VerificationError.worded(
        "{line}; nothing written ({allow} writes it anyway, {skip} skips the check)",
        line=check.line(), allow=("allow_slower=True", "--allow-slower"),
        skip=("speed_check=False", "--no-speed-check"))


def _measure(
    sessions: Sequence[ort.InferenceSession], feeds: Sequence[Mapping[str, np.ndarray]],
    rounds: int, seed: int,
) -> tuple[Timing, Timing, Timing | None]:
    """One side-by-side measurement: the baseline's and the output's `Timing`, and the input as
    given's when a third session is timed."""
    labels = ["baseline", "output", "input as given"][: len(sessions)]
    result = benchmark(sessions, feeds, labels=labels, rounds=rounds, warmup=1, seed=seed)
    timings = result.timings
    return timings[0], timings[1], timings[2] if len(timings) > 2 else None


def _one_run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> float:
    """Seconds of one run after one untimed run (the first run allocates)."""
    run(session, feeds)
    start = time.perf_counter()
    run(session, feeds)
    return time.perf_counter() - start


def channel_multiple() -> int:
    """The channel multiple onnxruntime's CPU convolutions run fast at here: MLAS's NCHWc block,
    16 with AVX-512F, else 8 (read from numpy's CPU feature detection; 8 when it says nothing).
    """
    return 16 if _CPU_FEATURES.get("AVX512F") else 8
