"""`sg.auto` through the Python API: its options checked before any work, the search space it
plans for a model, and a budget no candidate meets (`BudgetNotMetError`, exit code 1, the
search's figures on the error)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import slimgraph as sg
from slimgraph.api.auto import AutoOptions, BudgetNotMetError, auto, auto_with_report
from slimgraph.api.auto_plan import has_attention, matmul_rows, plan
from slimgraph.errors import BadOptionError
from tests.kit.data import DIGITS, DIGITS_TEST


def test_exported_from_slimgraph() -> None:
    assert sg.auto is auto and sg.auto_with_report is auto_with_report
    assert sg.AutoOptions is AutoOptions


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "give one budget: --max-drop D or --min-cosine C"),
        ({"max_drop": 0.01, "min_cosine": 0.99}, "give one budget: --max-drop D or --min-cosine C"),
        ({"min_cosine": 1.5}, "--min-cosine must be in [-1, 1], got 1.5"),
        ({"min_cosine": 0.99, "batch": 0},
         "--batch must be between 1 and the 450 rows of --data, got 0"),
        ({"min_cosine": 0.99, "epochs": 0}, "--epochs must be at least 1, got 0"),
        ({"min_cosine": 0.99, "time_budget": -1.0}, "--time-budget is minutes > 0, got -1.0"),
    ],
)
def test_options_are_checked_before_any_work(options: dict[str, object], message: str) -> None:
    with pytest.raises(BadOptionError) as caught:
        auto(DIGITS, DIGITS_TEST, **options)
    assert str(caught.value) == message


def test_plan_follows_the_model_and_the_training_data() -> None:
    model = sg.load(DIGITS)
    assert not has_attention(model)
    trained = plan(model, train="/t.npz", calibration=True, rows=16, epochs=3)
    assert [s.name for s in trained] == ["channel pruning + distillation", "precision alone",
                                         "low-rank + distillation"]
    assert trained[0].grid == {"prune": {"ratio": [0.5, 0.6, 0.7], "round_to": 8},
                               "finetune": {"epochs": [3], "data": "/t.npz"},
                               "quantize": ["none", "int8"]}
    untrained = plan(model, train=None, calibration=True, rows=16, epochs=3)
    assert [s.name for s in untrained] == ["precision alone", "channel pruning"]
    assert untrained[1].grid["prune"] == {"ratio": [0.3], "round_to": 8}


def test_rows_per_matmul() -> None:
    assert matmul_rows({"input_ids": np.zeros((8, 128), np.int64)}) == 1024
    assert matmul_rows({"image": np.zeros((16, 1, 8, 8), np.float32)}) == 16


def test_budget_not_met_raises_with_the_search(tmp_path: Path) -> None:
    with pytest.raises(BudgetNotMetError) as caught:
        auto(DIGITS, DIGITS_TEST, min_cosine=1.0, batch=16, time_budget=0.01, workers=1,
             progress=False, speed_check=False)
    error = caught.value
    assert error.exit_code == 1
    result = error.result
    assert result.winner is None and result.stages == ["precision alone"]
    assert {c.candidate.name for c in result.candidates} == {"quantize=dynamic",
                                                             "quantize=int8"}
    best = result.best
    assert best is not None and best.cosine is not None and best.cosine < 1.0
    assert best.cosine == max(c.cosine for c in result.candidates if c.cosine is not None)
    assert str(error).startswith(f"no candidate holds cosine >= 1; the best found: "
                                 f"'{best.candidate.name}': cosine ")
