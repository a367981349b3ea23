"""A sweep candidate is the model the same steps give by hand: factorize then finetune."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

import slimgraph as sg  # noqa: E402
from slimgraph.api.sweep import build_candidate, parse_grid  # noqa: E402
from slimgraph.runtime.session import model_bytes  # noqa: E402
from tests.kit.data import DIGITS, DIGITS_TEST  # noqa: E402

TRAIN = DIGITS.with_name("digits_train.npz")


def _shape_only_initializers(proto: onnx.ModelProto) -> list[str]:
    readers = collections.defaultdict(set)
    for node in proto.graph.node:
        for name in node.input:
            readers[name].add(node.op_type)
    return [init.name for init in proto.graph.initializer if readers[init.name] == {"Shape"}]


def test_factorize_then_finetune_candidate_is_no_larger_than_the_steps_by_hand(tmp_path) -> None:  # noqa: ANN001
    # The digits CNN's convolutions have no bias: the export computes a zero bias from
    # Shape(weight). A pipeline factorize once kept every replaced weight for that Shape alone.
    with np.load(TRAIN) as archive:
        np.savez(tmp_path / "train.npz", image=archive["image"][:128],
                 labels=archive["labels"][:128])  # fmt: skip
    train = str(tmp_path / "train.npz")
    grid = {"factorize": [0.5], "finetune": {"epochs": [1], "data": train, "lr": 1e-3}}
    (candidate,) = parse_grid(grid)
    outcome = build_candidate(str(DIGITS), candidate.steps, str(DIGITS_TEST), None)
    assert "error" not in outcome, outcome.get("error")
    built = onnx.load_model_from_string(outcome["model"])

    factorized = sg.factorize(sg.load(DIGITS), rank_ratio=0.5)
    by_hand = model_bytes(sg.finetune(factorized, train, epochs=1, lr=1e-3, progress=False))

    input_size = DIGITS.stat().st_size
    assert outcome["size_bytes"] <= len(by_hand) < input_size / 2
    assert _shape_only_initializers(built) == []
    assert len(built.graph.node) == len(onnx.load_model_from_string(by_hand).graph.node)


def test_a_grid_asks_for_calibration_only_where_a_step_needs_it() -> None:
    from slimgraph.errors import BadOptionError

    # round-to-nearest int4 needs no data (it once asked for --calib); GPTQ and static int8 do
    (int4,) = parse_grid({"quantize": ["int4"]})
    assert int4.steps == ({"name": "quantize-weight-only"},)
    for grid, step in [({"quantize": ["int8"]}, "quantize"),
                       ({"quantize": {"mode": ["weight-only"], "method": ["gptq"]}},
                        "quantize-weight-only")]:  # fmt: skip
        with pytest.raises(BadOptionError, match=f"step '{step}' needs calibration data"):
            parse_grid(grid)
