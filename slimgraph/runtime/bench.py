"""Side-by-side latency: models interleaved in a shuffled order each round, medians and ratios.

This is how every performance figure in slimgraph is measured (docs/architecture.md, "Runtime"):
absolute times on a shared 2-core machine drift, ratios measured in the same rounds hold.

Each ratio comes with its noise: a 90% paired bootstrap interval (rounds resampled with
replacement, the same rounds for both models, 1000 times; the 5th and 95th percentiles of the
ratio of medians; Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13). Two
models whose interval contains 1.0 are within noise of each other.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from slimgraph._tables import format_ratio, render_table
from slimgraph.errors import BadOptionError
from slimgraph.runtime.session import OptLevel, create_session, is_session, level_name, run

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["Timing", "Comparison", "BenchmarkResult", "benchmark", "bootstrap_ratio"]

# One measurement repeats a model's run until it takes at least this long, so that timer and
# scheduling noise stay small next to tiny models' run times.
_MIN_MEASUREMENT_S = 0.005

# Bootstrap resamples and the interval's coverage.
_BOOTSTRAP = 1000
_COVERAGE = 0.90


@dataclass(frozen=True)
class Timing:
    """Latency of one model: median and 90th percentile in ms, median as a ratio to the first,
    and the ratio's 90% bootstrap interval (`ratio_low`, `ratio_high`; 1.0 for the first)."""

    label: str
    median_ms: float
    p90_ms: float
    ratio: float
    ratio_low: float = math.nan
    ratio_high: float = math.nan

    @property
    def ratio_interval(self) -> tuple[float, float]:
        return (self.ratio_low, self.ratio_high)

    @property
    def within_noise(self) -> bool:
        """The ratio to the first model is within noise of 1.0 (its interval contains 1)."""
        return self.ratio_low <= 1.0 <= self.ratio_high


@dataclass(frozen=True)
class Comparison:
    """Model `a` against model `b` (labels): ratio of medians a/b and its bootstrap interval."""

    a: str
    b: str
    ratio: float
    low: float
    high: float

    @property
    def within_noise(self) -> bool:
        return self.low <= 1.0 <= self.high


@dataclass(frozen=True)
class BenchmarkResult:
    """What `benchmark` measured; `print()` shows the table `slimgraph bench` prints.

    Attributes:
        timings: one `Timing` per model, in the order given (the first is the baseline).
        rounds: measured rounds (each ran every model once, in a shuffled order).
        threads: intra-op threads of the sessions.
        optimization: onnxruntime's graph optimization level of the sessions ("all", ...).
        comparisons: every pair of models (a before b in the order given), ratio a/b.
    """

    timings: tuple[Timing, ...]
    rounds: int
    threads: int
    optimization: str
    comparisons: tuple[Comparison, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "rounds": self.rounds,
            "threads": self.threads,
            "optimization": self.optimization,
            "interval": f"{_COVERAGE:.0%} paired bootstrap of the ratio of medians",
            "models": [
                {**asdict(t), "within_noise_of_first": t.within_noise}
                for t in self.timings
            ],
            "comparisons": [
                {**asdict(c), "within_noise": c.within_noise} for c in self.comparisons
            ],
        }

    def table(self, inputs: Sequence[str] | None = None) -> str:
        """The table `slimgraph bench` prints; `inputs` adds a column (one text per model)."""
        headers = ["model", "median ms", "p90 ms", "ratio", "90% interval"]
        rows: list[list[object]] = [
            [t.label, f"{t.median_ms:.3f}", f"{t.p90_ms:.3f}", format_ratio(t.ratio),
             "-" if i == 0 else f"{t.ratio_low:.2f}-{t.ratio_high:.2f}"]
            for i, t in enumerate(self.timings)
        ]  # fmt: skip
        align = "lrrrr"
        if inputs is not None:
            headers.append("inputs")
            rows = [[*row, text] for row, text in zip(rows, inputs, strict=True)]
            align += "l"
        return (
            render_table(headers, rows, align=align)
            + f"\n\n{self.rounds} interleaved rounds, {self.threads} intra-op thread(s), "
            f"onnxruntime optimization '{self.optimization}'; ratio = median / first model's "
            "median; interval: 90% paired bootstrap over the rounds"
        )

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        ratios = ", ".join(f"{t.label} {t.ratio:.2f}x" for t in self.timings)
        return f"<BenchmarkResult: {self.rounds} rounds, {ratios}>"


def benchmark(
    models: Sequence[ir.Model | str | os.PathLike[str] | ort.InferenceSession],
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    *,
    labels: Sequence[str] | None = None,
    rounds: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    optimization: OptLevel = "all",
    seed: int = 0,
) -> BenchmarkResult:
    """Time several models side by side on the same inputs.

    Each round runs every model once (repeated to at least 5 ms per measurement) in a freshly
    shuffled order; the result gives each model's median and p90 per run and its median as a
    ratio to the first model's.

    Args:
        models: models, paths or sessions; the first is the baseline of the ratios.
        feeds: one feed dict for all models, or one per model (models with different input names).
        labels: names for the table; default "model 0", "model 1", ...
        rounds: measured rounds (20 or more for figures worth quoting).
        warmup: unmeasured runs of each model before the first round.
        threads: intra-op threads per session (None: all cores).
        optimization: onnxruntime graph optimization level for sessions created here.

    Returns:
        A `BenchmarkResult`; `print()` shows the table `slimgraph bench` prints.

    Raises:
        BadOptionError: rounds < 1 or warmup < 0, or as many labels or feed dicts as models
            not given.
        BadDataError: feeds that do not fit a model.
        ModelLoadError: a path that cannot be loaded.

    Example:
        >>> print(benchmark([model, quantized], random_feeds(model, batch=8)))  # doctest: +SKIP
    """
    if not models:
        raise BadOptionError("benchmark needs at least one model")
    if rounds < 1 or warmup < 0:
        raise BadOptionError(f"rounds must be >= 1 and warmup >= 0 (got {rounds}, {warmup})")
    labels = list(labels) if labels is not None else [f"model {i}" for i in range(len(models))]
    if len(labels) != len(models):
        raise BadOptionError(f"{len(labels)} labels given for {len(models)} models")
    per_model = list(feeds) if not isinstance(feeds, Mapping) else [feeds] * len(models)
    if len(per_model) != len(models):
        raise BadOptionError(f"{len(per_model)} feed dicts given for {len(models)} models")
    sessions = [
        m if is_session(m)
        else create_session(m, threads=threads, optimization=optimization)
        for m in models
    ]
    for session, feed in zip(sessions, per_model, strict=True):
        run(session, feed)  # feeds that do not fit fail here with a clear BadDataError
    runners = [
        _runner(session, dict(feed)) for session, feed in zip(sessions, per_model, strict=True)
    ]
    repeats = []
    for runner in runners:
        for _ in range(warmup):
            runner()
        start = time.perf_counter()
        runner()
        once = time.perf_counter() - start
        repeats.append(max(1, int(_MIN_MEASUREMENT_S / max(once, 1e-9))))
    samples: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    shuffler = random.Random(seed)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for index in order:
            runner, count = runners[index], repeats[index]
            start = time.perf_counter()
            for _ in range(count):
                runner()
            samples[index].append((time.perf_counter() - start) / count * 1000)
    medians = [statistics.median(s) for s in samples]
    boot = _bootstrap_medians(samples, seed)
    timings = tuple(
        Timing(label, median, _percentile(s, 90), median / medians[0],
               *bootstrap_ratio(boot[i], boot[0]))
        for i, (label, median, s) in enumerate(zip(labels, medians, samples, strict=True))
    )
    comparisons = tuple(
        Comparison(labels[i], labels[j], medians[i] / medians[j], *bootstrap_ratio(boot[i],
                   boot[j]))
        for i in range(len(labels)) for j in range(i + 1, len(labels))
    )
    # What the sessions were built with (a caller may pass ready sessions), not the arguments.
    options = sessions[0].get_session_options()
    used_threads = options.intra_op_num_threads or (os.cpu_count() or 1)
    level = level_name(options.graph_optimization_level) or optimization
    return BenchmarkResult(timings, rounds, used_threads, level, comparisons)


def _bootstrap_medians(samples: Sequence[Sequence[float]], seed: int) -> np.ndarray:
    """Medians of each model's rounds under `_BOOTSTRAP` resamplings of the rounds: [models, B].

    The same resampled rounds for every model (they ran interleaved: a slow round is slow for
    all), so ratios keep the pairing.
    """
    times = np.asarray(samples, dtype=np.float64)  # [models, rounds]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, times.shape[1], size=(_BOOTSTRAP, times.shape[1]))
    return np.median(times[:, picks], axis=2)


def bootstrap_ratio(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """The central `_COVERAGE` interval of the bootstrap ratios a/b (arrays of medians [B])."""
    ratios = np.asarray(a) / np.asarray(b)
    tail = (1 - _COVERAGE) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def _runner(session: ort.InferenceSession, feed: dict[str, np.ndarray]):  # noqa: ANN202
    names = [output.name for output in session.get_outputs()]
    return lambda: session.run(names, feed)


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))
