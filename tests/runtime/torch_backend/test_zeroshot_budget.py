"""Zero-shot synthesis within bounds: batches, the plateau stop, the time budget, the best
inputs kept, bad options in one line (on the bundled digits CNN, 8x8: milliseconds a step)."""

from __future__ import annotations

import pytest

import slimgraph as sg
from slimgraph.tools.cli import main
from tests.kit.data import DIGITS

pytest.importorskip("torch")

import torch  # noqa: E402

from slimgraph.runtime.torch_backend._zeroshot import synthesize  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return sg.load(DIGITS)


def test_rows_come_in_batches_and_a_last_row_alone_joins_the_batch_before(model):
    run = synthesize(model, samples=9, batch_size=4, steps=3, tolerance=0, progress=False)
    assert run.feeds["image"].shape == (9, 1, 8, 8)
    assert run.steps == [3, 3] and run.stopped == ["steps", "steps"]  # rows 0-3, then 4-8


def test_the_plateau_stops_a_batch_before_the_step_cap(model):
    run = synthesize(model, samples=8, batch_size=8, steps=2000, tolerance=0.01, patience=5,
                     progress=False)
    assert run.stopped == ["converged"]
    assert 10 <= run.steps[0] < 2000
    first, lowest = run.losses[0]
    assert lowest < 0.5 * first


def test_tolerance_zero_runs_every_step(model):
    run = synthesize(model, samples=4, batch_size=4, steps=25, tolerance=0, progress=False)
    assert run.steps == [25] and run.stopped == ["steps"]


def test_the_time_budget_is_respected(model):
    budget = 1.0
    run = synthesize(model, samples=32, batch_size=16, steps=100_000, tolerance=0,
                     time_budget=budget, progress=False)
    assert run.stopped == ["time", "time"]  # each batch got its share, neither was skipped
    assert run.seconds < budget + 1.0  # one step past the deadline, at most (ms here)
    assert run.feeds["image"].shape == (32, 1, 8, 8)


def test_a_timed_synthesis_gives_back_torchs_thread_count(model):
    """Under a time budget each batch runs on torch's threads or on 1, whichever a timed pass
    found faster; the setting is restored afterwards."""
    before = torch.get_num_threads()
    synthesize(model, samples=4, batch_size=4, steps=3, time_budget=30, progress=False)
    assert torch.get_num_threads() == before


def test_the_inputs_returned_are_those_of_the_lowest_loss(model):
    run = synthesize(model, samples=4, batch_size=4, steps=15, tolerance=0, progress=False)
    first, lowest = run.losses[0]
    assert lowest <= first
    again = synthesize(model, samples=4, batch_size=4, steps=15, tolerance=0, progress=False)
    assert (again.feeds["image"] == run.feeds["image"]).all()  # same seed, same result


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"time_budget": 0}, "time_budget must be positive seconds, got 0"),
        ({"batch_size": 1}, "batch_size must be at least 2, got 1"),
        ({"patience": 0}, "tolerance must be >= 0 and patience >= 1, got 0.01 and 0"),
    ],
)
def test_bad_options_are_one_line(model, options, message):
    with pytest.raises(sg.BadOptionError) as error:
        synthesize(model, **options)
    assert str(error.value) == message


def test_zero_shot_time_must_be_positive_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "zs.onnx"
    code = main(["quantize", str(DIGITS), "-o", str(out), "--zero-shot", "--zero-shot-time",
                 "0"])
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err.strip() == (
        "slimgraph quantize: error: --zero-shot-time must be positive, got 0"
    )
