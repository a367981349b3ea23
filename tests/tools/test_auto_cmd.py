"""`slimgraph auto` on the digits CNN: a budget met (the winner written, its figures hold on
onnxruntime, the report's front), a budget no candidate meets (exit 1, the best figures, nothing
written) and bad input (one line, exit 2, nothing written).

The runs are kept small: `--time-budget 0.01`, so only the first grid (precision alone: dynamic
and static int8, on one dask worker) runs, at batch 256: the winner must beat the input as
`optimize` writes it, and at batch 16 static int8 of this tiny CNN is within noise of that on a
loaded machine (0.45x, 90% interval 0.18-0.58; one race read 1.22x), at 256 clearly faster."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

import slimgraph as sg
from slimgraph.api.sweep import pareto_flags
from slimgraph.runtime.metrics import evaluate, load_data
from slimgraph.tools.cli import main
from tests.kit.cli import Result
from tests.kit.data import DIGITS, DIGITS_CALIB, DIGITS_TEST

QUICK = ("--batch", "256", "--time-budget", "0.01", "--workers", "1", "--no-progress")


def _main(*args: object) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as usage:  # argparse's own errors
            code = int(usage.code or 0)
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def met(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    folder = tmp_path_factory.mktemp("auto")
    result = _main("auto", DIGITS, "-o", folder / "fast.onnx", "--data", DIGITS_TEST,
                   "--max-drop", "0.01", "--json", *QUICK)
    return result, folder


def test_budget_met_writes_the_fastest_candidate_that_holds_it(met: tuple[Result, Path]) -> None:
    result, folder = met
    assert result.code == 0, result.err
    data = result.json()
    assert data["written"] == str(folder / "fast.onnx")
    assert data["skipped"] == ["channel pruning"]  # the time budget stopped the search
    winner = data["candidates"][data["winner"]]
    holding = [c for c in data["candidates"]
               if c["status"] == "ok" and c["accuracy"] >= data["threshold"]]
    assert winner in holding
    assert winner["latency_ratio"] < 1.0
    # judged against the input as `optimize` writes it (2x faster than the digits export),
    # timed in the same race
    assert data["confirmed_against"] == "lossless-optimized input"
    assert data["confirmed"][0] < 1.0 and data["confirmed"][0] > winner["latency_ratio"]
    # the model written is the winner: its accuracy measured here again on onnxruntime
    model = sg.load(folder / "fast.onnx")
    values = load_data(DIGITS_TEST, sg.load(DIGITS))
    accuracy = evaluate(model, values).accuracy
    assert accuracy == pytest.approx(winner["accuracy"], abs=1e-9)
    assert accuracy >= data["baseline"]["metric"] - 0.01
    assert any(node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear")
               for node in model.graph)


def test_report_shows_the_front(met: tuple[Result, Path]) -> None:
    result, folder = met
    report = folder / "fast-report"
    page = (report / "report.html").read_text()
    saved = json.loads((report / "report.json").read_text())
    assert "Latency against accuracy" in page and "Size against accuracy" in page
    candidates = saved["result"]["candidates"]
    for c in candidates:
        assert c["name"] in page
    points = [(c["latency_ratio"], c["metric"]) if c["status"] == "ok" else None
              for c in candidates]
    assert [c["pareto"] for c in candidates] == pareto_flags(points)
    assert saved["summary"]["winner"] == f"#{saved['result']['winner']}"


def test_budget_not_met_exits_1_with_the_best_figures(tmp_path: Path) -> None:
    out = tmp_path / "never.onnx"
    result = _main("auto", DIGITS, "-o", out, "--data", DIGITS_TEST, "--min-cosine", "1",
                   *QUICK)
    assert result.code == 1
    error = [line for line in result.err.splitlines() if "error" in line]
    assert len(error) == 1
    assert error[0].startswith("slimgraph auto: error: no candidate holds cosine >= 1; the best "
                               "found: 'quantize=")
    assert error[0].endswith("nothing written")
    assert "latency" in error[0] and "cosine 0.99" in error[0]
    assert "quantize=int8" in result.out  # the table of what was tried
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--data", DIGITS_CALIB, "--max-drop", "0.01"),
         "slimgraph auto: error: --max-drop needs labels in --data (key 'labels'); without "
         "labels give --min-cosine"),
        (("--data", DIGITS_TEST, "--max-drop", "1.5"),
         "slimgraph auto: error: --max-drop is an absolute accuracy drop in [0, 1) (0.01 is one "
         "point), got 1.5"),
        (("--data", DIGITS_TEST, "--min-cosine", "0.99", "--batch", "451"),
         "slimgraph auto: error: --batch must be between 1 and the 450 rows of --data, got 451"),
        (("--data", DIGITS_TEST, "--max-drop", "0.01", "--min-cosine", "0.99"),
         "slimgraph auto: error: argument --min-cosine: not allowed with argument --max-drop "
         "(see slimgraph auto --help)"),
        (("--data", DIGITS_TEST, "--max-drop", "0.01", "--time-budget", "0"),
         "slimgraph auto: error: argument --time-budget: expected a number > 0, got 0 "
         "(see slimgraph auto --help)"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    tmp_path: Path, extra: tuple[object, ...], message: str
) -> None:
    result = _main("auto", DIGITS, "-o", tmp_path / "out.onnx", *extra)
    assert (result.code, result.err.strip()) == (2, message)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_write_over_its_input(tmp_path: Path) -> None:
    data = tmp_path / "val.npz"
    data.write_bytes(DIGITS_TEST.read_bytes())
    result = _main("auto", DIGITS, "-o", data, "--data", data, "--max-drop", "0.01")
    assert result.code == 2
    assert result.err.strip() == f"slimgraph auto: error: {data}: refusing to write over --data"
