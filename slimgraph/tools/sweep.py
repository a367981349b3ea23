"""Sweeps: build and evaluate every combination of step settings, keep the Pareto front.

A grid (YAML or JSON mapping, or a dict) names pipeline steps in the order they run and the
values to try for each; the candidates are the cartesian product::

    prune: {ratio: [0.0, 0.3, 0.5]}     # options of the step: every combination
    quantize: [none, int8]              # values: `none` skips the step

Step names are the pipeline's registered passes and presets (`slimgraph.passes.pipeline`) plus
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
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from slimgraph import ir as sg_ir
from slimgraph.errors import BadOptionError, OutputPathError, SlimgraphError
from slimgraph.passes.pipeline import PASSES, PRESETS, build_pipeline, run_pipeline
from slimgraph.passes.recipe import read_document
from slimgraph.runtime.bench import benchmark
from slimgraph.runtime.metrics import DEFAULT_LABELS, evaluate, load_data, split_labels
from slimgraph.runtime.session import model_bytes
from slimgraph.tools.summary import summarize

__all__ = [
    "SWEEP_EXTRA",
    "Candidate",
    "CandidateResult",
    "SweepResult",
    "load_grid",
    "parse_grid",
    "pareto_flags",
    "sweep",
]

logger = logging.getLogger(__name__)

# The optional dependency group that carries dask.distributed (`pip install slimgraph[sweep]`).
SWEEP_EXTRA = "sweep"

_SKIP = ("none", "skip")


def _is_skip(value: Any) -> bool:
    """`none`/`skip`/null/false: the step does not run in this candidate."""
    return value is None or value is False or (isinstance(value, str) and value.lower() in _SKIP)


@dataclass(frozen=True)
class _Command:
    """A command name usable as a grid step: the passes it runs and its main option."""

    passes: tuple[str, ...]
    main: str
    skip: Callable[[Mapping[str, Any]], bool] = lambda options: False
    # `mode` values of `quantize`: the pass each one runs
    modes: Mapping[str, str] = field(default_factory=dict)
    # options naming files: made absolute here, so workers started elsewhere find them
    paths: tuple[str, ...] = ()


_QUANTIZE_MODES = {"int8": "quantize", "static": "quantize", "dynamic": "quantize-dynamic",
                   "weight-only": "quantize-weight-only", "int4": "quantize-weight-only"}

_COMMANDS: dict[str, _Command] = {
    "prune": _Command(("prune",), "ratio", skip=lambda options: options.get("ratio") == 0),
    "factorize": _Command(("lowrank-linear", "tucker-conv"), "rank_ratio"),
    "quantize": _Command(("quantize",), "mode", modes=_QUANTIZE_MODES),
    # the `finetune` pass (registered by slimgraph.passes.finetune where it is installed)
    "finetune": _Command(("finetune",), "epochs", skip=lambda options: options.get("epochs") == 0,
                         paths=("data", "val", "teacher")),
}


@dataclass(frozen=True)
class Candidate:
    """One combination of the grid: its settings and the pipeline steps that build it.

    Attributes:
        index: position in the grid's cartesian product (0-based).
        name: the settings as text, e.g. "prune.ratio=0.3 quantize=int8" ("input model" when
            every step is skipped).
        settings: grid step -> the value chosen (None when skipped), JSON-safe.
        steps: pipeline steps (`{"name": pass, **options}`), in the grid's order.
    """

    index: int
    name: str
    settings: dict[str, Any]
    steps: tuple[dict[str, Any], ...]


@dataclass
class CandidateResult:
    """A candidate's figures. Ratios are to the input model; `metric` is accuracy or cosine.

    Attributes:
        status: "ok", or "failed" (`error` says why: the build raised, or its worker died twice).
        retried: its worker died once and the scheduler ran it again.
        size_bytes: serialized size in bytes; `parameters`, `macs` as `slimgraph inspect` counts.
        latency_ratio: median latency / the input model's, measured side by side;
            `latency_interval`: its 90% bootstrap interval over the rounds.
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
    pareto: bool = False
    pareto_size: bool = False
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.candidate.index, "name": self.candidate.name,
            "settings": self.candidate.settings, "steps": list(self.candidate.steps),
            "status": self.status, "error": self.error, "retried": self.retried,
            "size_bytes": self.size_bytes, "parameters": self.parameters, "macs": self.macs,
            "metric": self.metric, "accuracy": self.accuracy, "cosine": self.cosine,
            "build_seconds": self.build_seconds, "latency_ratio": self.latency_ratio,
            "latency_interval": list(self.latency_interval) if self.latency_interval else None,
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


# -- the grid -------------------------------------------------------------------------------------


def load_grid(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a grid file (YAML or JSON): a mapping of step name to values.

    Raises:
        BadOptionError: missing or unreadable file, not YAML/JSON, or not a mapping.
    """
    file = Path(path)
    data = read_document(file, "grid")
    if not isinstance(data, Mapping) or not data:
        raise BadOptionError(
            f"grid {file}: expected a mapping of steps to values, e.g. "
            "'prune: {ratio: [0.3, 0.5]}' and 'quantize: [none, int8]'"
        )
    return dict(data)


def _known_steps() -> str:
    build_pipeline(["cleanup"])  # registers every pass family
    names = sorted({*PASSES, *PRESETS, *_COMMANDS})
    return ", ".join(names)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _step_values(step: str, spec: Any) -> list[dict[str, Any] | None]:
    """The option dicts to try for one grid step (None: the step is skipped)."""
    command = _COMMANDS.get(step)
    values: list[Any]
    if isinstance(spec, Mapping):
        keys = list(spec)
        for key in keys:
            if not isinstance(key, str):
                raise BadOptionError(f"step '{step}': option names must be text, got {key!r}")
        combos = itertools.product(*(_as_list(spec[key]) for key in keys))
        values = [dict(zip(keys, combo, strict=True)) for combo in combos]
    else:
        values = _as_list(spec)
    if not values:
        raise BadOptionError(f"step '{step}': no values to try")
    out: list[dict[str, Any] | None] = []
    for value in values:
        if _is_skip(value):
            out.append(None)
        elif value is True or value == step:
            out.append({})
        elif isinstance(value, Mapping):
            out.append(dict(value))
        elif command is not None and isinstance(value, (str, int, float)):
            out.append({command.main: value})
        else:
            raise BadOptionError(
                f"step '{step}': bad value {value!r} (use none, true, a mapping of options"
                + (f", or a value of its '{command.main}'" if command else "") + ")"
            )
    return out


def _pipeline_steps(step: str, options: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Pipeline steps for one grid step's chosen options ([] when skipped)."""
    if options is None:
        return []
    command = _COMMANDS.get(step)
    if command is None:
        if step in PRESETS and step not in PASSES:
            if options:
                raise BadOptionError(f"step '{step}' is a preset and takes no options")
            return [{"name": step}]
        return [{"name": step, **options}]
    options = dict(options)
    if command.skip(options):
        return []
    for key in command.paths:
        value = options.get(key)
        if isinstance(value, str) and value != "input":
            options[key] = str(Path(value).resolve())
    passes = command.passes
    if command.modes:
        mode = str(options.pop(command.main, "int8"))
        if _is_skip(mode):
            return []
        if mode not in command.modes:
            raise BadOptionError(
                f"step '{step}': unknown {command.main} '{mode}' "
                f"(known: none, {', '.join(command.modes)})"
            )
        passes = (command.modes[mode],)
    return [{"name": name, **options} for name in passes]


def _varying(values: Sequence[Mapping[str, Any] | None]) -> set[str]:
    """Option names whose value differs between a step's values (the ones a name must show)."""
    given = [v for v in values if v is not None]
    keys = {key for v in given for key in v}
    return {key for key in keys
            if len({json.dumps(v.get(key, "<unset>"), default=str) for v in given}) > 1}


def _show(value: Any) -> str:
    return Path(value).name if isinstance(value, str) and os.sep in value else str(value)


def _setting_text(
    step: str, options: Mapping[str, Any] | None, shown: set[str] | None = None
) -> str:
    """`prune=0.3`, `finetune.epochs=3`, `quantize=int8`; only the options in `shown` (the ones
    that vary in the grid; all when None)."""
    if options is None:
        return f"{step}=none"
    keys = [key for key in options if shown is None or key in shown]
    command = _COMMANDS.get(step)
    if not keys:
        return step
    if command is not None and keys == [command.main]:
        return f"{step}={_show(options[command.main])}"
    return " ".join(f"{step}.{key}={_show(options[key])}" for key in keys)


def parse_grid(
    grid: Mapping[str, Any], *, calibration: bool = False, model: ir.Model | None = None
) -> list[Candidate]:
    """Expand a grid into candidates (cartesian product, steps in the grid's order) and check
    every candidate's steps against the pipeline registry and the passes' options.

    Args:
        grid: step name -> values (see the module docstring).
        calibration: whether calibration data will be given (static int8 needs it).
        model: when given, each pass's option checks (`requires`) run against it too.

    Raises:
        BadOptionError: an unknown step (the message lists the known ones), a bad value, options
            a pass does not take, or a step that needs calibration data without it.
    """
    known = None
    per_step: list[list[tuple[str, dict[str, Any] | None]]] = []
    for step, spec in grid.items():
        if not isinstance(step, str):
            raise BadOptionError(f"grid step names must be text, got {step!r}")
        if step not in _COMMANDS:
            known = known or _known_steps()
            if step not in PASSES and step not in PRESETS:
                raise BadOptionError(f"unknown step '{step}' (known: {known})")
        per_step.append([(step, options) for options in _step_values(step, spec)])
    shown = []
    for values in per_step:  # the options that vary, and a command's main option always
        keys = _varying([options for _, options in values])
        command = _COMMANDS.get(values[0][0])
        shown.append(keys | ({command.main} if command else set()))
    candidates = []
    for index, combo in enumerate(itertools.product(*per_step)):
        steps = [s for step, options in combo for s in _pipeline_steps(step, options)]
        settings = {step: options for step, options in combo}
        name = " ".join(_setting_text(step, options, keys) for (step, options), keys
                        in zip(combo, shown, strict=True) if options is not None) or "input model"
        if steps:
            full = " ".join(_setting_text(step, options) for step, options in combo
                            if options is not None)
            _check_steps(steps, full, calibration, model)
        candidates.append(Candidate(index, name, _json_safe(settings), tuple(steps)))
    return candidates


def _check_steps(
    steps: list[dict[str, Any]], name: str, calibration: bool, model: ir.Model | None
) -> None:
    try:
        built = build_pipeline(steps, context={"calibration": {}} if calibration else None)
    except BadOptionError as error:
        raise BadOptionError(f"candidate '{name}': {error}") from None
    for step in built:
        if not calibration and getattr(step.pass_, "calibration", "unused") is None:
            raise BadOptionError(
                f"candidate '{name}': step '{step.name}' needs calibration data (--calib)"
            )
        if model is not None and step.name != "quantize":
            try:
                step.pass_.requires(model)
            except BadOptionError as error:
                raise BadOptionError(f"candidate '{name}': step '{step.name}': {error}") from None
            except SlimgraphError:
                pass  # about the model, not the options: the build reports it per candidate


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


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
    try:
        reference = _load_model(model)
        context = {"calibration": _load_npz(calibration)} if calibration is not None else None
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
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        kind = "" if isinstance(error, SlimgraphError) else f"{type(error).__name__}: "
        return {"error": f"{kind}{first}", "seconds": time.perf_counter() - start}


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


def sweep(
    model: str | os.PathLike[str],
    grid: str | os.PathLike[str] | Mapping[str, Any],
    data: str | os.PathLike[str],
    *,
    calibration: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    labels: str = DEFAULT_LABELS,
    rounds: int = 10,
    batch: int = 32,
    progress: bool | None = None,
    timeout: float = 30.0,
) -> SweepResult:
    """Build, evaluate and time every candidate of a grid; mark and keep the Pareto front.

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

    Returns:
        `SweepResult`: every candidate in grid order with its figures and Pareto flags.

    Raises:
        BadOptionError: a bad grid (unknown step, bad value), both or neither of the cluster
            options wrong, dask.distributed missing (names the `sweep` extra), no scheduler.
        BadDataError: data that does not fit the model.
        OutputPathError: `out` exists and is not a folder.
    """
    if scheduler is not None and workers is not None:
        raise BadOptionError("give --scheduler or --workers, not both")
    if rounds < 1 or batch < 1:
        raise BadOptionError(f"rounds and batch must be at least 1 (got {rounds}, {batch})")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"--out {out_dir}: exists and is not a folder")
    source = Path(model)
    input_model = sg_ir.load(source)
    values = load_data(data, input_model, labels=labels)  # checks the data before any job
    if calibration is not None:
        load_data(calibration, input_model, labels=labels)
    grid_map = load_grid(grid) if isinstance(grid, (str, os.PathLike)) else dict(grid)
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
        _time(input_model, values, results, paths, rounds, batch)
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
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{name}: {first}"


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
) -> None:
    """Latency of every built candidate against the input model, serially, side by side."""
    built = [r for r in results if r.candidate.index in paths]
    if not built:
        return
    feed = next(values.batches(batch, model))[0]
    timed = benchmark([model, *(str(paths[r.candidate.index]) for r in built)], feed,
                      labels=["input", *(r.candidate.name for r in built)], rounds=rounds,
                      warmup=2)
    for record, timing in zip(built, timed.timings[1:], strict=True):
        record.latency_ratio = timing.ratio
        interval = getattr(timing, "ratio_interval", None)
        record.latency_interval = tuple(interval) if interval else None  # type: ignore[assignment]


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
