"""Ranks per layer: `factorize --target-macs F --data V`, and a budget alone."""

from __future__ import annotations

import dataclasses

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


@pytest.fixture(scope="module")
def four_layers() -> ir.Model:
    """A 3x3 conv, a 1x1 conv, a Gemm with transB and alpha, and a MatMul whose weight is tied
    to a second MatMul: every way a factorization pass computes its weight."""
    rng = np.random.default_rng(3)
    weights = {
        "w3": _decaying(16, 8, 1), "w1": _decaying(16, 16, 2)[:, :, :1, :1].copy(),
        "wg": rng.standard_normal((24, 256)).astype(np.float32),
        "wm": rng.standard_normal((24, 24)).astype(np.float32),
        "shape": np.array([-1, 256], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w3"], ["c3"], name="conv3", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c3", "w1"], ["c1"], name="conv1", kernel_shape=[1, 1]),
        helper.make_node("Reshape", ["c1", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wg"], ["g"], name="gemm", transB=1, alpha=0.5),
        helper.make_node("MatMul", ["g", "wm"], ["m"], name="matmul"),
        helper.make_node("MatMul", ["m", "wm"], ["y"], name="matmul_tied"),
    ]
    return make_model(nodes, [("x", [None, 8, 4, 4])], ["y"], weights)


@pytest.mark.parametrize("method", ["tucker", "cp", "svd"])
def test_the_recorded_weight_computes_what_the_factors_do(
    four_layers: ir.Model, method: str
) -> None:
    """A rank curve measures a layer as the model with the weight its factors compute: that
    model equals the one with the layer factorized alone (onnxruntime, rtol 1e-4)."""
    from slimgraph.passes.lowrank import FactorizeOptions, factorize_layers
    from slimgraph.runtime import compare

    options = FactorizeOptions(rank_ratio=0.25, method=method, pointwise_convs=method != "cp")
    approximations: dict[str, np.ndarray] = {}
    _, report = factorize_layers(four_layers, options, approximations=approximations)
    measured = {layer.node for layer in report.layers if not layer.shared_with}
    expected = {"conv3", "gemm", "matmul"} | ({"conv1"} if method != "cp" else set())
    assert measured == expected and set(approximations) == measured
    x = {"x": np.random.default_rng(4).standard_normal((5, 8, 4, 4)).astype(np.float32)}
    for node in sorted(measured):
        alone, _ = factorize_layers(four_layers, dataclasses.replace(
            options, rank_ratio=None, layer_ratios={node: 0.25}))  # the others stay whole
        swapped = four_layers.clone()
        target = next(n for n in swapped.graph if n.name == node)
        own = ir.Value(name=f"{node}.approx", const_value=ir.tensor(approximations[node]))
        swapped.graph.register_initializer(own)
        target.replace_input_with(1, own)
        fidelity = compare(alone, swapped, x)
        for output in fidelity.outputs:
            assert output.max_abs_error <= 1e-4 * max(output.reference_max_abs, 1e-6) + 1e-5, (
                node, output.max_abs_error)


def test_rank_curves_measure_each_layer_as_if_factorized_alone(four_layers: ir.Model) -> None:
    """The curve's loss of a layer equals the loss of the model with that layer factorized
    alone (a tied weight's other reader stays whole), within float rounding."""
    from slimgraph.api.prune import _loss
    from slimgraph.passes.lowrank import FactorizeOptions, factorize_layers
    from slimgraph.passes.lowrank._allocate import rank_curves
    from slimgraph.runtime.budget import Evaluator

    x = np.random.default_rng(5).standard_normal((16, 8, 4, 4)).astype(np.float32)
    scorer = Evaluator(four_layers, LabelledData({"x": x}, None, "random"))
    options = FactorizeOptions()

    def loss(candidate: ir.Model) -> float:
        return _loss(scorer, scorer(candidate))

    nodes, losses, saved, total = rank_curves(four_layers, options, loss, (0.5, 0.125),
                                              progress=False)
    assert nodes == ["gemm", "matmul", "conv3"]  # linears first, the tied MatMul once
    assert set(losses) == {(n, r) for n in nodes for r in (0.125,)} | {("conv3", 0.5),
                                                                      ("gemm", 0.5)}
    for (node, ratio), value in losses.items():
        alone, report = factorize_layers(four_layers, FactorizeOptions(layer_ratios={node: ratio}))
        assert [layer.node for layer in report.layers] == [node]
        assert value == pytest.approx(loss(alone), rel=1e-3, abs=1e-6)
        assert saved[node, ratio] == total - report.macs_after
