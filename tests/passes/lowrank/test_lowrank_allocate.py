"""Ranks per layer: `factorize --target-macs F --data V`, and a budget alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

import slimgraph as sg
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.runtime.metrics import LabelledData
from tests.kit.graphs import make_model


def _decaying(c_out: int, c_in: int, seed: int) -> np.ndarray:
    """A 3x3 conv weight whose channel spectrum decays (as trained weights' do)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c_out, c_in, 3, 3))
    u, s, vt = np.linalg.svd(w.reshape(c_out, -1), full_matrices=False)
    s = s * np.exp(-np.arange(len(s)) / (2 + 4 * seed))  # layers differ in how fast
    return ((u * s) @ vt).reshape(w.shape).astype(np.float32)


@pytest.fixture(scope="module")
def three_convs() -> tuple[ir.Model, LabelledData]:
    nodes, weights, current = [], {}, "x"
    for index, (c_out, c_in) in enumerate([(8, 8), (16, 8), (16, 16)]):
        weights[f"w{index}"] = _decaying(c_out, c_in, index)
        out = f"y{index}" if index == 2 else f"h{index}"
        nodes.append(helper.make_node("Conv", [current, f"w{index}"], [f"c{index}"],
                                      name=f"conv{index}", kernel_shape=[3, 3],
                                      pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{index}"], [out], name=f"relu{index}"))
        current = out
    model = make_model(nodes, [("x", [None, 8, 8, 8])], ["y2"], weights)
    x = np.random.default_rng(9).standard_normal((32, 8, 8, 8)).astype(np.float32)
    return model, LabelledData({"x": x}, None, "random")


@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_target_macs_allocates_ranks_per_layer_and_meets_the_target(
    three_convs: tuple[ir.Model, LabelledData], method: str
) -> None:
    model, data = three_convs
    small, report = sg.factorize_with_report(model, method=method, target_macs=0.5, data=data)
    allocation = report.allocation
    assert allocation is not None and allocation.ratios
    assert report.macs_after is not None and report.macs_before is not None
    assert report.macs_after <= 0.5 * report.macs_before
    assert allocation.macs_ratio == pytest.approx(report.macs_after / report.macs_before)
    assert {layer.node for layer in report.layers} == set(allocation.ratios)
    assert all(layer.method == ("cp" if method == "cp" else "tucker2")
               for layer in report.layers)
    # every (layer, ratio) measured alone, and the curve's loss grows as the rank falls
    assert {node for node, _ in allocation.loss} == {"conv0", "conv1", "conv2"}
    curve = [allocation.loss[("conv2", r)] for r in (0.75, 0.25, 0.0625)
             if ("conv2", r) in allocation.loss]
    assert curve == sorted(curve)
    assert "ranks per layer" in str(report)


def test_a_budget_alone_allocates_the_most_macs_that_hold_it(
    three_convs: tuple[ir.Model, LabelledData],
) -> None:
    model, data = three_convs
    small, report = sg.factorize_with_report(model, min_cosine=0.9, data=data)
    assert report.evaluation is not None and report.evaluation.cosine >= 0.9
    assert report.allocation is not None and report.allocation.target is None
    assert report.macs_after < report.macs_before


def test_target_macs_bad_input_is_one_line(three_convs: tuple[ir.Model, LabelledData]) -> None:
    model, data = three_convs
    with pytest.raises(BadOptionError, match=r"^target_macs= needs data= \(per-layer"):
        sg.factorize(model, target_macs=0.5)
    with pytest.raises(BadOptionError, match=r"^give target_macs= or a rank rule"):
        sg.factorize(model, target_macs=0.5, rank_ratio=0.5, data=data)
    with pytest.raises(BadOptionError, match=r"^target_macs is a fraction of the model's MACs "
                       r"in \(0, 1\), got 1.5$"):
        sg.factorize(model, target_macs=1.5, data=data)
    with pytest.raises(UnsupportedModelError, match=r"^--target-macs 0.01 is out of reach: "
                       r"every layer at rank ratio 0.0625 leaves 0\.\d+x of the MACs$"):
        sg.factorize(model, target_macs=0.01, data=data, method="tucker")
