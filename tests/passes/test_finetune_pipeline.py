"""The `finetune` pipeline step: prune -> finetune (teacher: the input) -> quantize -> QAT."""

from __future__ import annotations

import collections

import numpy as np
import pytest

pytest.importorskip("torch")

import slimgraph as sg  # noqa: E402
from slimgraph.errors import BadOptionError  # noqa: E402
from slimgraph.passes.pipeline import build_pipeline, run_pipeline  # noqa: E402
from slimgraph.runtime.metrics import evaluate, load_data  # noqa: E402
from tests.kit.data import DIGITS  # noqa: E402

TRAIN = DIGITS.with_name("digits_train.npz")
TEST = DIGITS.with_name("digits_test.npz")
CALIB = DIGITS.with_name("digits_calib.npz")


def test_recipe_prune_distil_quantize_qat(tmp_path) -> None:  # noqa: ANN001
    with np.load(TRAIN) as archive:
        np.savez(tmp_path / "small.npz", image=archive["image"][:256],
                 labels=archive["labels"][:256])  # fmt: skip
    model = sg.load(DIGITS)
    steps = [
        {"name": "prune", "ratio": 0.5},
        {"name": "finetune", "data": str(TRAIN), "epochs": 2, "lr": 3e-3, "val": str(TEST)},
        {"name": "quantize", "calibration": str(CALIB)},
        {"name": "finetune", "data": str(tmp_path / "small.npz"), "epochs": 1, "lr": 1e-4},
    ]
    result = run_pipeline(model, steps, verify=True)
    names = [r.name for r in result.records]
    assert names == ["prune", "finetune", "quantize", "finetune"]
    distil = result.records[1]
    assert not distil.exact and distil.modified and distil.fidelity is not None
    assert distil.details["val_before"] < 0.5 and distil.details["val_after"] > 0.95
    assert distil.details["epochs"] == 2 and distil.details["metric"] == "accuracy"
    final = result.model
    ops = collections.Counter(n.op_type for n in final.graph)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert evaluate(final, load_data(TEST, final)).accuracy > 0.95


def test_step_options_are_checked_when_the_pipeline_is_built() -> None:
    with pytest.raises(BadOptionError, match="^finetune needs training data: data: TRAIN.npz$"):
        build_pipeline([{"name": "finetune"}])
    with pytest.raises(BadOptionError, match="^unknown knowledge kind 'x'"):
        build_pipeline([{"name": "finetune", "data": str(TRAIN), "kd": "x"}])
    with pytest.raises(BadOptionError, match="^unknown scheme 'peer'"):
        build_pipeline([{"name": "finetune", "data": str(TRAIN), "scheme": "peer"}])


def test_teacher_input_outside_a_pipeline_is_refused() -> None:
    from slimgraph.passes.finetune import FinetunePass

    with pytest.raises(BadOptionError, match="^finetune: teacher 'input' needs the pipeline's"):
        FinetunePass(data=str(TRAIN), epochs=0)(sg.load(DIGITS))
