"""`slimgraph sweep`: grids checked up front, candidates built on dask.distributed (a cluster of
separate `dask scheduler` / `dask worker` processes, and a local cluster), Pareto fronts that
hold against the figures, and a worker that dies mid-sweep."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import slimgraph
from slimgraph import runtime
from slimgraph.api.sweep import pareto_flags, parse_grid
from slimgraph.errors import BadOptionError
from slimgraph.passes.pipeline import PASSES
from tests.kit.cli import installed_command
from tests.kit.data import DIGITS, DIGITS_CALIB
from tests.tools import sweep_kill_step
from tests.tools.chromium import remote_references, render

ROOT = Path(__file__).resolve().parents[2]
DIGITS_TEST = DIGITS.with_name("digits_test.npz")
GRID = "prune: {ratio: [0.0, 0.3, 0.5]}\nquantize: [none, int8]\n"
QUICK = ("--rounds", "3", "--batch", "16", "--no-progress")


@pytest.fixture(scope="module", autouse=True)
def _kill_step_registered() -> Iterator[None]:
    """The test-only step, known in this process while this module runs (workers preload it)."""
    PASSES[sweep_kill_step.STEP] = sweep_kill_step.KillWorkerOnce
    yield
    PASSES.pop(sweep_kill_step.STEP, None)


# -- the grid ----------------------------------------------------------------------------------


def test_grid_is_a_cartesian_product_in_step_order() -> None:
    candidates = parse_grid({"prune": {"ratio": [0.0, 0.3, 0.5]}, "quantize": ["none", "int8"]},
                            calibration=True)
    assert [c.name for c in candidates] == [
        "prune=0.0", "prune=0.0 quantize=int8", "prune=0.3", "prune=0.3 quantize=int8",
        "prune=0.5", "prune=0.5 quantize=int8",
    ]
    assert candidates[0].steps == ()  # ratio 0 and none: the input model itself
    assert candidates[3].steps == ({"name": "prune", "ratio": 0.3}, {"name": "quantize"})
    more = parse_grid({"lossless": [None, True], "factorize": {"rank_ratio": [0.5],
                       "energy": [None]}, "quantize": ["dynamic"]})
    finetune = parse_grid({"prune": [0.0, 0.3], "finetune": {"data": "train.npz",
                                                               "epochs": [0, 3]}})
    assert [c.name for c in finetune] == [
        "prune=0.0 finetune=0", "prune=0.0 finetune=3", "prune=0.3 finetune=0",
        "prune=0.3 finetune=3"]
    assert [c.steps for c in finetune][:2] == [(), ({"name": "finetune", "epochs": 3,
                                                    "data": str(Path("train.npz").resolve())},)]
    assert [c.steps for c in more][1] == (
        {"name": "lossless"},
        {"name": "lowrank-linear", "rank_ratio": 0.5, "energy": None},
        {"name": "tucker-conv", "rank_ratio": 0.5, "energy": None},
        {"name": "quantize-dynamic"},
    )


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("prnue: [0.3]\n", "slimgraph sweep: error: unknown step 'prnue' (known: "),
        ("prune: {ratio: [0.3, 1.5]}\n",
         "slimgraph sweep: error: candidate 'prune=1.5': step 'prune': ratio must be strictly "
         "between 0 and 1, got 1.5"),
        ("quantize: [int3]\n",
         "slimgraph sweep: error: step 'quantize': unknown mode 'int3' (known: none, int8, "
         "static, dynamic, weight-only, int4)"),
        ("prune: {ratio: [0.3], colour: [red]}\n",
         "slimgraph sweep: error: candidate 'prune.ratio=0.3 prune.colour=red': recipe step "
         "'prune': unknown option 'colour'; it takes: ratio, criterion, scope, round-to, pad, "
         "exclude, exclude-ops, unstructured, prune-output, seed"),
        ("fuse-batchnorm: [3]\n", "slimgraph sweep: error: step 'fuse-batchnorm': bad value 3"),
        ("- prune\n", "slimgraph sweep: error: grid GRID: expected a mapping of steps"),
        ("prune: [0.3\n", "slimgraph sweep: error: grid GRID: not valid YAML/JSON"),
    ],
)
def test_bad_grid_is_one_line_exit_2(cli, tmp_path: Path, grid: str, message: str) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(grid)
    out = tmp_path / "out"
    result = cli("sweep", DIGITS, "--grid", path, "--data", DIGITS_TEST, "--out", out,
                 "--workers", "1", *QUICK)
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1
    assert result.err.startswith(message.replace("GRID", str(path))), result.err
    assert not out.exists()


def test_static_int8_without_calibration_is_bad_input(cli, tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text("quantize: [none, int8]\n")
    result = cli("sweep", DIGITS, "--grid", path, "--data", DIGITS_TEST, "--workers", "1", *QUICK)
    assert result.code == 2
    assert result.err.strip() == ("slimgraph sweep: error: candidate 'quantize=int8': step "
                                  "'quantize' needs calibration data (--calib)")


def test_sweep_without_dask_names_the_extra(cli, tmp_path: Path, monkeypatch) -> None:
    for name in ("dask", "dask.distributed", "distributed"):
        monkeypatch.setitem(sys.modules, name, None)
    path = tmp_path / "grid.yaml"
    path.write_text("prune: [0.0, 0.5]\n")
    result = cli("sweep", DIGITS, "--grid", path, "--data", DIGITS_TEST, *QUICK)
    assert result.code == 2
    assert result.err.strip() == (
        "slimgraph sweep: error: sweep runs its candidates on dask.distributed, which is not "
        "installed: pip install 'slimgraph[sweep]'"
    )


# -- Pareto ------------------------------------------------------------------------------------


def _dominates(q: tuple[float, float], p: tuple[float, float]) -> bool:
    return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])


@given(st.lists(st.one_of(st.none(), st.tuples(st.floats(0, 2), st.floats(0, 1))), max_size=12))
def test_pareto_flags_are_exactly_the_undominated_points(points) -> None:
    flags = pareto_flags(points)
    for p, flag in zip(points, flags, strict=True):
        if p is None:
            assert not flag
        else:
            assert flag == (not any(q is not None and _dominates(q, p) for q in points))


# -- on dask -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dask() -> str:
    return installed_command("dask", "pip install 'slimgraph[sweep]'")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`dask scheduler` and two `dask worker` processes (1 thread each, the test-only step
    preloaded) on 127.0.0.1; the scheduler retries a task once after its worker dies. Always
    stopped at the end, the whole process group of each."""
    from dask.distributed import Client

    logs = tmp_path_factory.mktemp("dask-logs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
           os.environ.get("PYTHONPATH")])), "OMP_WAIT_POLICY": "PASSIVE",
           "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
    address = f"tcp://127.0.0.1:{_free_port()}"
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        log = (logs / f"{name}.log").open("w")
        processes.append(subprocess.Popen([_dask(), *args], env=env, cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port",
              address.rsplit(":", 1)[1], "--no-dashboard")
        for index in range(2):
            start(f"worker{index}", "worker", address, "--nworkers", "1", "--nthreads", "1",
                  "--host", "127.0.0.1", "--no-dashboard", "--name", f"w{index}",
                  "--preload", str(Path(sweep_kill_step.__file__).resolve()))
        client = Client(address, timeout=60)
        try:
            client.wait_for_workers(2, timeout=120)
        finally:
            client.close()
        yield address
    finally:
        for process in reversed(processes):
            _stop(process)


def _sweep(cli, tmp_path: Path, grid: str, *cluster: str) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "grid.yaml"
    path.write_text(grid)
    result = cli("sweep", DIGITS, "--grid", path, "--data", DIGITS_TEST, "--calib", DIGITS_CALIB,
                 "--out", tmp_path / "front", "--report", tmp_path / "report", "--json",
                 *cluster, *QUICK)
    assert result.code == 0, result.err
    return result.json()


def _check_fronts(candidates: list[dict]) -> None:
    ok = [c for c in candidates if c["status"] == "ok"]
    for flag, figure in (("pareto", "latency_ratio"), ("pareto_size", "size_bytes")):
        points = {c["index"]: (c[figure], c["metric"]) for c in ok}
        for c in ok:
            beaten = any(_dominates(q, points[c["index"]]) for i, q in points.items()
                         if i != c["index"])
            assert c[flag] == (not beaten), (flag, c["name"], points)


@pytest.mark.slow
def test_sweep_on_dask_scheduler_and_local_cluster(cli, tmp_path: Path, dask_cluster) -> None:
    remote = _sweep(cli, tmp_path / "remote", GRID, "--scheduler", dask_cluster)
    assert remote["cluster"] == dask_cluster
    candidates = remote["candidates"]
    assert len(candidates) == 6 and all(c["status"] == "ok" for c in candidates)
    _check_fronts(candidates)
    assert any(c["pareto"] for c in candidates)
    # figures: the untouched candidate is the input model; int8 keeps digits' accuracy
    base = remote["baseline"]
    assert remote["metric"] == "accuracy" and base["samples"] == 450
    assert candidates[0]["name"] == "prune=0.0" and candidates[0]["metric"] == base["metric"]
    assert abs(candidates[1]["metric"] - base["metric"]) <= 0.01
    assert candidates[1]["size_bytes"] < 0.3 * candidates[0]["size_bytes"]
    assert candidates[4]["macs"] < 0.3 * candidates[0]["macs"]
    # the Pareto models are written, and run
    test = np.load(DIGITS_TEST)
    written = [c for c in candidates if c["pareto"] or c["pareto_size"]]
    assert sorted(p.name for p in (tmp_path / "remote" / "front").glob("*.onnx")) == sorted(
        Path(c["path"]).name for c in written)
    for c in written:
        outputs = runtime.run(runtime.create_session(slimgraph.load(c["path"])),
                              {"image": test["image"]})
        accuracy = (next(iter(outputs.values())).argmax(1) == test["labels"]).mean()
        assert accuracy == pytest.approx(c["metric"], abs=1e-9)
    saved = json.loads((tmp_path / "remote" / "front" / "sweep.json").read_text())
    assert [c["name"] for c in saved["candidates"]] == [c["name"] for c in candidates]
    # the report page: the two fronts as inline SVG, nothing from the network
    page = tmp_path / "remote" / "report" / "report.html"
    rendered = render(page, tmp_path / "chromium")
    assert rendered.dom.count("<svg") == 2 and "Latency against accuracy" in rendered.dom
    assert rendered.page_requests == [] and remote_references(page.read_text()) == []

    local = _sweep(cli, tmp_path / "local", GRID, "--workers", "2")
    assert local["cluster"] == "local cluster of 2 worker process(es)"
    same = ("name", "steps", "status", "metric", "accuracy", "size_bytes", "parameters", "macs")
    assert [{k: c[k] for k in same} for c in local["candidates"]] == [
        {k: c[k] for k in same} for c in candidates]
    _check_fronts(local["candidates"])


@pytest.mark.slow
def test_worker_killed_mid_sweep(cli, tmp_path: Path, dask_cluster) -> None:
    marker = tmp_path / "killed-once"
    grid = (f"prune: [0.0, 0.5]\n{sweep_kill_step.STEP}: [none, {{marker: '{marker}'}}]\n")
    start = time.monotonic()
    result = _sweep(cli, tmp_path, grid, "--scheduler", dask_cluster)
    candidates = result["candidates"]
    assert len(marker.read_text().split()) == 1  # a worker process did exit under a candidate
    assert [c["name"] for c in candidates] == [
        "prune=0.0", f"prune=0.0 {sweep_kill_step.STEP}", "prune=0.5",
        f"prune=0.5 {sweep_kill_step.STEP}"]
    killers = [candidates[1], candidates[3]]
    assert any(c["retried"] or c["status"] == "failed" for c in killers)
    for c in killers:
        if c["status"] == "failed":
            assert c["error"] == "its worker died twice (retried once)"
    assert candidates[0]["status"] == candidates[2]["status"] == "ok"
    _check_fronts(candidates)
    assert time.monotonic() - start < 240
    print("killed-worker sweep:", [(c["name"][:30], c["status"], c["retried"])
                                   for c in candidates])


@pytest.mark.slow
def test_worker_killed_every_time_fails_only_that_candidate(
    cli, tmp_path: Path, dask_cluster
) -> None:
    marker = tmp_path / "killed"
    grid = f"prune: [0.5]\n{sweep_kill_step.STEP}: [none, {{marker: '{marker}', times: 9}}]\n"
    candidates = _sweep(cli, tmp_path, grid, "--scheduler", dask_cluster)["candidates"]
    # its worker died, it was retried once, its worker died again: reported failed (a death the
    # scheduler sees for a task that merely waited on that worker also counts)
    assert 1 <= len(marker.read_text().split()) <= 2
    assert [(c["status"], c["error"]) for c in candidates] == [
        ("ok", None), ("failed", "its worker died twice (retried once)")]
    assert candidates[1]["pareto"] is False and candidates[1]["path"] is None
    assert candidates[0]["pareto"] and Path(candidates[0]["path"]).exists()


def test_unreachable_scheduler_is_bad_input(tmp_path: Path) -> None:
    from slimgraph.api.sweep import sweep

    address = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(BadOptionError, match=rf"--scheduler {address}: cannot connect"):
        sweep(DIGITS, {"prune": [0.0, 0.5]}, DIGITS_TEST, scheduler=address, timeout=2,
              out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_latency_is_judged_against_the_lossless_optimized_input(tmp_path: Path) -> None:
    """A raw export is not the baseline a user would ship: candidates are timed against the
    input as `optimize` writes it by default (as the speed guard judges), the input as given
    beside it."""
    from slimgraph.api import sweep as sweep_module
    from slimgraph.api._speed import speed_baseline
    from slimgraph.api.sweep_grid import Candidate
    from slimgraph.runtime.metrics import load_data
    from tests.kit.exports import exported_model

    model = exported_model("resnet")
    optimized = speed_baseline(model)
    assert optimized is not None  # the raw export has foldable BatchNorms
    path = tmp_path / "candidate.onnx"
    slimgraph.save(optimized, path)
    data = tmp_path / "data.npz"
    shape = [d if isinstance(d, int) else 4 for d in model.graph.inputs[0].shape]
    np.savez(data, **{model.graph.inputs[0].name: np.random.default_rng(0).standard_normal(
        shape).astype(np.float32)})
    results = [sweep_module.CandidateResult(Candidate(0, "optimized", {}, ()))]
    ratio = sweep_module._time(model, load_data(str(data), model), results, {0: path}, 4, 4)
    record = results[0]
    assert ratio is not None and record.latency_to_input is not None
    assert record.latency_ratio == pytest.approx(record.latency_to_input / ratio, rel=1e-9)
    assert record.latency_interval is not None
    assert record.latency_interval[0] <= record.latency_ratio <= record.latency_interval[1]
    words = sweep_module._baseline_words({"optimized_latency_ratio": ratio})
    assert words == ("the lossless-optimized input's (what `slimgraph optimize` writes by "
                     f"default; the input as given runs {1 / ratio:.2f}x of it)")
