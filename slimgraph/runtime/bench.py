"""Side-by-side latency: models interleaved in a shuffled order each round, medians and ratios.

This is how every performance figure in slimgraph is measured (DESIGN.md section 8): absolute
times on a shared 2-core machine drift, ratios measured in the same rounds hold.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from slimgraph._tables import format_ratio, render_table
from slimgraph.errors import BadOptionError
from slimgraph.runtime.session import _LEVELS, OptLevel, create_session, run

__all__ = ["Timing", "BenchmarkResult", "benchmark"]

# One measurement repeats a model's run until it takes at least this long, so that timer and
# scheduling noise stay small next to tiny models' run times.
_MIN_MEASUREMENT_S = 0.005


@dataclass(frozen=True)
class Timing:
    """Latency of one model: median and 90th percentile in ms, median as a ratio to the first."""

    label: str
    median_ms: float
    p90_ms: float
    ratio: float


@dataclass(frozen=True)
class BenchmarkResult:
    timings: tuple[Timing, ...]
    rounds: int
    threads: int
    optimization: str

    def to_dict(self) -> dict[str, object]:
        return {
            "rounds": self.rounds,
            "threads": self.threads,
            "optimization": self.optimization,
            "models": [asdict(t) for t in self.timings],
        }

    def table(self, inputs: Sequence[str] | None = None) -> str:
        """The table `slimgraph bench` prints; `inputs` adds a column (one text per model)."""
        headers = ["model", "median ms", "p90 ms", "ratio"]
        rows: list[list[object]] = [
            [t.label, f"{t.median_ms:.3f}", f"{t.p90_ms:.3f}", format_ratio(t.ratio)]
            for t in self.timings
        ]
        align = "lrrr"
        if inputs is not None:
            headers.append("inputs")
            rows = [[*row, text] for row, text in zip(rows, inputs, strict=True)]
            align += "l"
        return (
            render_table(headers, rows, align=align)
            + f"\n\n{self.rounds} interleaved rounds, {self.threads} intra-op thread(s), "
            f"onnxruntime optimization '{self.optimization}'; ratio = median / first model's "
            "median"
        )

    def __str__(self) -> str:
        return self.table()


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
        m if isinstance(m, ort.InferenceSession)
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
    timings = tuple(
        Timing(label, median, _percentile(s, 90), median / medians[0])
        for label, median, s in zip(labels, medians, samples, strict=True)
    )
    # What the sessions were built with (a caller may pass ready sessions), not the arguments.
    options = sessions[0].get_session_options()
    used_threads = options.intra_op_num_threads or (os.cpu_count() or 1)
    level = next((name for name, value in _LEVELS.items()
                  if value == options.graph_optimization_level), optimization)
    return BenchmarkResult(timings, rounds, used_threads, level)


def _runner(session: ort.InferenceSession, feed: dict[str, np.ndarray]):  # noqa: ANN202
    names = [output.name for output in session.get_outputs()]
    return lambda: session.run(names, feed)


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))
