"""Sweeps: build and evaluate every combination of step settings, keep the Pareto front.

A grid (YAML or JSON mapping, or a dict) names pipeline steps in the order they run and the
values to try for each; the candidates are the cartesian product::

    prune: {ratio: [0.0, 0.3, 0.5]}     # options of the step: every combination
    quantize: [none, int8]              # values: `none` skips the step

Grids are read and expanded by `slimgraph.api.sweep_grid`. Step names are the pipeline's
registered passes and presets (`slimgraph.passes.pipeline`) plus
the command names `prune` (main option `ratio`; ratio 0 skips the step), `quantize` (main option
`mode`: `int8`/`static` -> calibrated static int8, needs calibration data; `dynamic`;
`weight-only`), `factorize` (main option `rank_ratio`: SVD of Gemm/MatMul then Tucker-2 of Conv)
and `finetune` (main option `epochs`, 0 skips the step; its `data`, `val` and `teacher` paths are
made absolute; needs the registered `finetune` pass). A candidate's name shows the options that
vary in the grid. A value is `none` (skip), `true` or the
step's name (run with defaults), a mapping of options, or a scalar for the step's main option.

Each candidate is an independent job submitted with `concurrent.futures` semantics
(`client.submit`, `as_completed`) to dask.distributed: a `LocalCluster` of N single-threaded
worker processes, or an existing cluster at a scheduler address. Jobs receive the model and data
as file paths (local cluster: same machine) or bytes (a scheduler, whose workers may be on other
machines: serialized ONNX, the .npz files' bytes) inside each task, so a retry never depends on
data held by a worker that died; never pickled IR objects. They return the candidate's bytes and
figures: size, parameters, MACs, and the metric of
`slimgraph.runtime.metrics` (top-1 accuracy with labels, else worst output cosine to the input
model). Latency is measured afterwards in this process, serially, side by side with the input
model (`slimgraph.runtime.benchmark`: interleaved shuffled rounds, medians, ratios), so parallel
jobs never distort timing.

A worker that dies while building a candidate is retried once (the scheduler's
`distributed.scheduler.allowed-failures`, set to 1 for the local cluster; give an external
scheduler the same setting), then the candidate is reported failed; the others are returned.

The result marks the Pareto front of latency ratio against the metric (`pareto`) and of size
against the metric (`pareto_size`); with `out` those models are written there.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

import slimgraph.ir as sg_ir
from slimgraph._tables import (
    format_bytes,
    format_count,
    format_macs,
    format_metric,
    format_ratio,
    render_table,
)
from slimgraph.api._options import takes_options
from slimgraph.api._speed import speed_baseline
from slimgraph.api.sweep_grid import Candidate, grid_files, load_grid, parse_grid
from slimgraph.errors import BadOptionError, OutputPathError, SlimgraphError, first_line
from slimgraph.ir.summary import summarize
from slimgraph.passes.pipeline import run_pipeline
from slimgraph.runtime.bench import benchmark
from slimgraph.runtime.metrics import DEFAULT_LABELS, evaluate, load_data, split_labels
from slimgraph.runtime.session import model_bytes

__all__ = [
    "SWEEP_EXTRA",
    "Candidate",
    "CandidateResult",
    "SweepResult",
    "SweepOptions",
    "load_grid",
    "parse_grid",
    "pareto_flags",
    "sweep",
]

logger = logging.getLogger(__name__)

# The optional dependency group that carries dask.distributed (`pip install slimgraph[sweep]`).
SWEEP_EXTRA = "sweep"

@dataclass
class CandidateResult:
    """A candidate's figures. Ratios are to the input model; `metric` is accuracy or cosine.

    Attributes:
        status: "ok", or "failed" (`error` says why: the build raised, or its worker died twice).
        retried: its worker died once and the scheduler ran it again.
        size_bytes: serialized size in bytes; `parameters`, `macs` as `slimgraph inspect` counts.
        latency_ratio: median latency / the lossless-optimized input's (what `optimize`
            writes by default, `api._speed.speed_baseline`; the input itself when that preset
            changes nothing), measured side by side: the baseline the speed guard judges;
            `latency_interval`: its 90% bootstrap interval over the rounds.
        latency_to_input: median latency / the input model's as given.
        pareto: on the front of (latency ratio, metric); `pareto_size`: of (size, metric).
        path: where the model was written (Pareto members, with `out`).
    """

    candidate: Candidate
    status: str = "ok"
    error: str | None = None
    retried: bool = False
    size_bytes: int | None = None
    parameters: int | None = None
    macs: int | None = None
    metric: float | None = None
    accuracy: float | None = None
    cosine: float | None = None
    build_seconds: float | None = None
    latency_ratio: float | None = None
    latency_interval: tuple[float, float] | None = None
    latency_to_input: float | None = None
    pareto: bool = False
    pareto_size: bool = False
    path: str | None = None

    def __repr__(self) -> str:
        return (f"<CandidateResult {self.candidate.index} {self.candidate.name!r}: {self.status}"
                f", metric {self.metric}, latency {format_ratio(self.latency_ratio)}>")

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.candidate.index, "name": self.candidate.name,
            "settings": self.candidate.settings, "steps": list(self.candidate.steps),
            "status": self.status, "error": self.error, "retried": self.retried,
            "size_bytes": self.size_bytes, "parameters": self.parameters, "macs": self.macs,
            "metric": self.metric, "accuracy": self.accuracy, "cosine": self.cosine,
            "build_seconds": self.build_seconds, "latency_ratio": self.latency_ratio,
            "latency_interval": list(self.latency_interval) if self.latency_interval else None,
            "latency_to_input": self.latency_to_input,
            "pareto": self.pareto, "pareto_size": self.pareto_size, "path": self.path,
        }


@dataclass
class SweepResult:
    """Every candidate (grid order) with its figures, and the input model's own figures."""

    candidates: list[CandidateResult]
    metric_name: str
    baseline: dict[str, Any]
    cluster: str
    rounds: int

    @property
    def pareto(self) -> list[CandidateResult]:
        return [c for c in self.candidates if c.pareto]

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric_name, "baseline": self.baseline, "cluster": self.cluster,
                "latency_rounds": self.rounds,
                "candidates": [c.to_dict() for c in self.candidates]}

    def __str__(self) -> str:
        """One row per candidate (what `slimgraph sweep` prints), Pareto members marked, then
        the input model's figures and the cluster."""
        name, rows = self.metric_name, []
        for c in self.candidates:
            mark = ("*" if c.pareto else "") + ("s" if c.pareto_size else "")
            latency = format_ratio(c.latency_ratio)
            if c.latency_interval:
                latency += f" [{c.latency_interval[0]:.2f}-{c.latency_interval[1]:.2f}]"
            if c.status != "ok":
                rows.append([c.candidate.index, c.candidate.name, f"failed: {c.error}", "", "",
                             "", "", ""])
                continue
            rows.append([c.candidate.index, c.candidate.name,
                         "ok (retried)" if c.retried else "ok", format_bytes(c.size_bytes or 0),
                         format_count(c.macs or 0), format_metric(c.metric, name), latency, mark])
        base = self.baseline
        table = render_table(["#", "candidate", "status", "size", "MACs", name, "latency",
                              "pareto"], rows, align="rllrrrrl")
        return (
            f"{table}\n\ninput model: {format_bytes(base['size_bytes'])}, "
            f"{format_macs(base['macs'])}, {name} {format_metric(base['metric'], name)} on "
            f"{base['samples']} samples\n"
            f"latency = median / {_baseline_words(base)}, {self.rounds} interleaved rounds "
            f"after the builds [90% bootstrap interval]; pareto: * latency vs {name}, s size vs "
            f"{name}\n"
            f"built on {self.cluster}"
        )

    def __repr__(self) -> str:
        return (f"<SweepResult: {len(self.candidates)} candidates, {len(self.pareto)} on the "
                f"latency front, {self.metric_name}>")


# -- Pareto ---------------------------------------------------------------------------------------


def pareto_flags(points: Sequence[tuple[float, float] | None]) -> list[bool]:
    """Which points no other point dominates, minimizing the first figure and maximizing the
    second (None: a failed candidate, never on the front).

    A point dominates another when it is no worse in both figures and better in one.

    Example:
        >>> pareto_flags([(1.0, 0.9), (0.5, 0.8), (0.6, 0.7), None])
        [True, True, False, False]
    """
    flags = []
    for i, p in enumerate(points):
        if p is None:
            flags.append(False)
            continue
        dominated = any(
            q is not None and j != i and q[0] <= p[0] and q[1] >= p[1] and q != p
            for j, q in enumerate(points)
        )
        flags.append(not dominated)
    return flags


# -- the job one worker runs ----------------------------------------------------------------------


def _load_npz(source: bytes | str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(source) if isinstance(source, bytes) else source,
                 allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _load_model(source: bytes | str) -> ir.Model:
    if isinstance(source, str):
        return sg_ir.load(source)  # the safe loader (external data checked and read)
    return ir.from_proto(onnx.load_model_from_string(source))


def build_candidate(
    model: bytes | str,
    steps: Sequence[Mapping[str, Any]],
    data: bytes | str,
    calibration: bytes | str | None,
    labels: str = DEFAULT_LABELS,
) -> dict[str, Any]:
    """Build one candidate and evaluate it (runs on a dask worker; everything in and out is
    bytes, paths or plain values, never IR objects).

    Args:
        model: the input model as serialized ONNX bytes or a file path the worker can read.
        steps: the candidate's pipeline steps.
        data, calibration: the .npz files' bytes or paths.
        labels: the labels key of `data`.

    Returns:
        {"model": serialized candidate, "size_bytes", "parameters", "macs", "accuracy",
        "cosine", "metric", "seconds"} or {"error": one line} when the build or evaluation
        raised.
    """
    start = time.perf_counter()
    quiet = _CastNotes()  # the calling process has said them, once per file
    logging.getLogger(_FEEDS_LOGGER).addFilter(quiet)
    try:
        reference = _load_model(model)
        # jobs run in parallel: nothing in them times the model (the sweep times it serially)
        context: dict[str, Any] = {"speed_fallback": False}
        if calibration is not None:
            context["calibration"] = _load_npz(calibration)
        built = reference
        if steps:
            built = run_pipeline(reference, list(steps), verify=False, context=context).model
        values = split_labels(_load_npz(data), reference, labels=labels, source="data")
        evaluation = evaluate(built, values, reference=reference)
        blob = model_bytes(built)
        summary = summarize(built)
        return {"model": blob, "size_bytes": len(blob), "parameters": summary.parameters,
                "macs": summary.macs, "accuracy": evaluation.accuracy,
                "cosine": evaluation.cosine, "metric": evaluation.metric,
                "seconds": time.perf_counter() - start}
    except Exception as error:  # reported as a failed candidate, one line
        text = first_line(error, named=not isinstance(error, SlimgraphError))
        return {"error": text, "seconds": time.perf_counter() - start}
    finally:
        logging.getLogger(_FEEDS_LOGGER).removeFilter(quiet)


# The logger of `runtime.feeds.cast_floats`'s note (float64 data cast to the model's float32).
_FEEDS_LOGGER = "slimgraph.runtime.feeds"


class _CastNotes(logging.Filter):
    """Drops `cast_floats`' notes inside a job: the sweep said them once before the jobs ran."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.funcName != "cast_floats"


def _suspicious(keys: Sequence[str], dask_scheduler: Any = None) -> dict[str, int]:
    """On the scheduler: how many times each task's worker died under it."""
    tasks = dask_scheduler.tasks
    return {key: int(getattr(tasks.get(key), "suspicious", 0) or 0) for key in keys}


# -- the sweep ------------------------------------------------------------------------------------


def _client(scheduler: str | None, workers: int | None, timeout: float) -> tuple[Any, Any, str]:
    try:
        import dask
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise BadOptionError(
            "sweep runs its candidates on dask.distributed, which is not installed: "
            f"pip install 'slimgraph[{SWEEP_EXTRA}]'"
        ) from None
    if not logger.isEnabledFor(logging.DEBUG):  # dask's own INFO lines (cluster start/stop)
        logging.getLogger("distributed").setLevel(logging.ERROR)
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, TimeoutError) as error:
            raise BadOptionError(
                f"--scheduler {scheduler}: cannot connect ({type(error).__name__}: {error})"
            ) from None
        return client, None, scheduler
    count = workers or min(4, os.cpu_count() or 1)
    if count < 1:
        raise BadOptionError(f"--workers must be at least 1, got {count}")
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = LocalCluster(n_workers=count, threads_per_worker=1, processes=True,
                               dashboard_address="127.0.0.1:0", host="127.0.0.1",
                               silence_logs=logging.ERROR)
    return Client(cluster), cluster, f"local cluster of {count} worker process(es)"


def _file_bytes(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise BadOptionError(f"{what} {path}: cannot read ({error.strerror or error})") from None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=]+", "_", text).strip("_")[:80] or "model"


@dataclass(frozen=True, kw_only=True)
class SweepOptions:
    """The keywords of `sweep` (each is described there).

    Example:
        >>> SweepOptions(workers=2, rounds=20).rounds
        20
    """

    out: str | os.PathLike[str] | None = None
    scheduler: str | None = None
    workers: int | None = None
    labels: str = DEFAULT_LABELS
    rounds: int = 10
    batch: int = 32
    progress: bool | None = None
    timeout: float = 30.0


@takes_options(SweepOptions)
def sweep(
    model: str | os.PathLike[str],
    grid: str | os.PathLike[str] | Mapping[str, Any],
    data: str | os.PathLike[str],
    *,
    calibration: str | os.PathLike[str] | None = None,
    options: SweepOptions,
) -> SweepResult:
    """Build, evaluate and time every candidate of a grid; mark and keep the Pareto front.

    Takes its options as keywords or as `options=` a `SweepOptions`; keywords given with
    `options=` replace its fields. The result is the report (`print(result)` shows the
    `slimgraph sweep` table; `result.to_dict()`).

    Args:
        model: the input .onnx (never modified).
        grid: a grid file (YAML/JSON) or mapping: pipeline steps in the order they run, each
            with the values to try, e.g. `{"prune": {"ratio": [0.3, 0.5]}, "quantize":
            ["none", "int8"]}` (`none` skips the step; a scalar sets the step's main option).
        data: validation .npz: the model's inputs, plus `labels` (class indices) for accuracy;
            without labels the metric is the worst output cosine to the input model.
        calibration: .npz for steps that calibrate (static int8).
        out: folder for the Pareto-optimal models (both fronts) and `sweep.json`.
        scheduler: address of a running dask scheduler (`tcp://HOST:PORT`); else a local
            cluster of `workers` single-threaded processes (default min(4, cores)).
        labels: the labels key of `data`.
        rounds: latency rounds (interleaved, shuffled; medians) after the parallel phase.
        batch: rows of `data` per timed run.
        progress: a progress bar over candidates (None: when stderr is a terminal).
        timeout: seconds to wait for the scheduler when connecting.
        options: a `SweepOptions` instead of (or under) the keywords.

    Returns:
        `SweepResult`: every candidate in grid order with its figures and Pareto flags.

    Raises:
        BadOptionError: a bad grid (unknown step, bad value), both or neither of the cluster
            options wrong, dask.distributed missing (names the `sweep` extra), no scheduler.
        BadDataError: data that does not fit the model.
        OutputPathError: `out` exists and is not a folder.
        TypeError: an unknown keyword, or `options` that is not a `SweepOptions`.
    """
    out, scheduler, workers = options.out, options.scheduler, options.workers
    labels, rounds, batch = options.labels, options.rounds, options.batch
    progress, timeout = options.progress, options.timeout
    if scheduler is not None and workers is not None:
        raise BadOptionError("give --scheduler or --workers, not both")
    if rounds < 1 or batch < 1:
        raise BadOptionError(f"rounds and batch must be at least 1 (got {rounds}, {batch})")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"--out {out_dir}: exists and is not a folder")
    source = Path(model)
    input_model = sg_ir.load(source)
    # Every data file is read and checked here once, before any job (so a note about it, such
    # as float64 cast to float32, is said once, naming the file as given); jobs say nothing more.
    values = load_data(data, input_model, labels=labels)
    if calibration is not None:
        load_data(calibration, input_model, labels=labels)
    grid_map = load_grid(grid) if isinstance(grid, (str, os.PathLike)) else dict(grid)
    for path in grid_files(grid_map):
        load_data(path, input_model, labels=labels)
    candidates = parse_grid(grid_map, calibration=calibration is not None, model=input_model)
    # Inputs travel inside each task, so a retry never depends on a worker that died: paths for
    # a local cluster (same machine), bytes for a scheduler that may sit on other machines.
    inputs: tuple[bytes | str, bytes | str, bytes | str | None]
    if scheduler is None:
        inputs = (str(source.resolve()), str(Path(data).resolve()),
                  None if calibration is None else str(Path(calibration).resolve()))
    else:
        inputs = (model_bytes(input_model), _file_bytes(data, "data"),
                  None if calibration is None else _file_bytes(calibration, "calibration"))

    results = [CandidateResult(c) for c in candidates]
    client, cluster, where = _client(scheduler, workers, timeout)
    with tempfile.TemporaryDirectory(prefix="slimgraph-sweep-") as scratch:
        paths: dict[int, Path] = {}
        try:
            _run_jobs(client, candidates, results, paths, Path(scratch), inputs, labels,
                      progress)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        baseline = _baseline(input_model, source, values)
        baseline["optimized_latency_ratio"] = _time(input_model, values, results, paths, rounds,
                                                    batch)
        _mark_fronts(results)
        if out_dir is not None:
            _keep(out_dir, results, paths)
    result = SweepResult(results, baseline["metric_name"], baseline, where, rounds)
    if out_dir is not None:
        (out_dir / "sweep.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return result


def _run_jobs(
    client: Any,
    candidates: list[Candidate],
    results: list[CandidateResult],
    paths: dict[int, Path],
    scratch: Path,
    inputs: tuple[bytes | str, bytes | str, bytes | str | None],
    labels: str,
    progress: bool | None,
) -> None:
    import sys

    from dask.distributed import as_completed
    from tqdm.auto import tqdm

    futures = {}
    for candidate in candidates:
        future = client.submit(build_candidate, inputs[0], list(candidate.steps), inputs[1],
                               inputs[2], labels, pure=False,
                               key=f"slimgraph-candidate-{candidate.index}-{os.urandom(4).hex()}")
        futures[future.key] = (future, candidate.index)
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(futures), desc="candidates", unit="model", disable=not show) as bar:
        for future in as_completed([f for f, _ in futures.values()]):
            index = futures[future.key][1]
            record = results[index]
            try:
                outcome = future.result()
            except Exception as error:  # KilledWorker after the retry, a lost scheduler, ...
                record.status, record.error = "failed", _job_error(error)
            else:
                if "error" in outcome:
                    record.status, record.error = "failed", outcome["error"]
                else:
                    path = scratch / f"{index:03d}.onnx"
                    path.write_bytes(outcome.pop("model"))
                    paths[index] = path
                    record.size_bytes = outcome["size_bytes"]
                    record.parameters, record.macs = outcome["parameters"], outcome["macs"]
                    record.metric, record.accuracy = outcome["metric"], outcome["accuracy"]
                    record.cosine = outcome["cosine"]
                record.build_seconds = outcome.get("seconds")
            bar.update(1)
            bar.set_postfix_str(record.candidate.name[:40])
        try:
            deaths = client.run_on_scheduler(_suspicious, list(futures))
            deaths = deaths if isinstance(deaths, dict) else {}
        except Exception as error:  # an old or restricted scheduler: no retry figures
            logger.info("could not ask the scheduler about retries: %s", error)
            deaths = {}
    for key, (_, index) in futures.items():
        if deaths.get(key, 0) > 0:
            results[index].retried = True
    for _, (future, _) in futures.items():
        future.release()


def _job_error(error: BaseException) -> str:
    name = type(error).__name__
    if name == "KilledWorker":
        return "its worker died twice (retried once)"
    return first_line(error, named=True)


def _baseline(model: ir.Model, source: Path, values: Any) -> dict[str, Any]:
    evaluation = evaluate(model, values, reference=model if values.labels is None else None)
    summary = summarize(model, source)
    return {"path": str(source), "size_bytes": len(model_bytes(model)),
            "parameters": summary.parameters, "macs": summary.macs,
            "metric_name": evaluation.metric_name, "metric": evaluation.metric,
            "samples": evaluation.samples}


def _time(
    model: ir.Model,
    values: Any,
    results: list[CandidateResult],
    paths: dict[int, Path],
    rounds: int,
    batch: int,
) -> float | None:
    """Latency of every built candidate against the lossless-optimized input (and the input as
    given), serially, side by side; returns the optimized input's ratio to the input (None:
    the preset changed nothing, the input is the baseline, or nothing was built)."""
    built = [r for r in results if r.candidate.index in paths]
    if not built:
        return None
    feed = next(values.batches(batch, model))[0]
    optimized = speed_baseline(model)
    baselines: list[Any] = [model] if optimized is None else [model, optimized]
    labels = ["input", "lossless-optimized input"][:len(baselines)]
    timed = benchmark([*baselines, *(str(paths[r.candidate.index]) for r in built)], feed,
                      labels=[*labels, *(f"#{r.candidate.index}" for r in built)],
                      rounds=rounds, warmup=2)
    # `comparisons` hold a / b for a listed before b: each baseline before every candidate
    against = {c.b: (1 / c.ratio, 1 / c.high, 1 / c.low) for c in timed.comparisons
               if c.a == labels[-1]}
    for record, timing in zip(built, timed.timings[len(baselines):], strict=True):
        ratio, low, high = against[timing.label]
        record.latency_ratio, record.latency_interval = ratio, (low, high)
        record.latency_to_input = timing.ratio
    return None if optimized is None else timed.timings[1].ratio


def _baseline_words(base: dict[str, Any]) -> str:
    ratio = base.get("optimized_latency_ratio")
    if ratio is None:
        return "the input model's"
    return (f"the lossless-optimized input's (what `slimgraph optimize` writes by default; the "
            f"input as given runs {1 / ratio:.2f}x of it)")


def _mark_fronts(results: list[CandidateResult]) -> None:
    Point = tuple[float, float] | None

    def points(first: Callable[[CandidateResult], float | None]) -> list[Point]:
        out: list[Point] = []
        for r in results:
            x = first(r)
            out.append(None if r.status != "ok" or x is None or r.metric is None
                       else (float(x), float(r.metric)))
        return out

    for record, flag in zip(results, pareto_flags(points(lambda r: r.latency_ratio)), strict=True):
        record.pareto = flag
    for record, flag in zip(results, pareto_flags(points(lambda r: r.size_bytes)), strict=True):
        record.pareto_size = flag


def _keep(out_dir: Path, results: list[CandidateResult], paths: dict[int, Path]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for record in results:
        if (record.pareto or record.pareto_size) and record.candidate.index in paths:
            target = out_dir / f"{record.candidate.index:02d}-{_slug(record.candidate.name)}.onnx"
            temporary = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(paths[record.candidate.index], temporary)
            os.replace(temporary, target)
            record.path = str(target)
