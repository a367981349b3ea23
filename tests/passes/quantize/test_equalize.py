"""Cross-layer equalization (`passes/quantize/equalize.py`) and bias correction
(`passes/quantize/bias_correction.py`): exact in float, what they refuse, and what they fix."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

import slimgraph as sg
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.passes.quantize.bias_correction import layer_shifts
from slimgraph.passes.quantize.equalize import NO_PAIRS, CrossLayerEqualizationPass, equalized
from slimgraph.passes.quantize.equalize_bounds import clip_ceilings, drop_saturated_bounds
from slimgraph.passes.quantize.options import QuantizeOptions
from slimgraph.passes.quantize.qdq import activation_params
from slimgraph.passes.quantize.static import StaticSession
from slimgraph.runtime.calibrate import calibration_batches
from slimgraph.runtime.session import create_session, run
from slimgraph.tools.cli import main
from tests.kit.asserts import assert_same_outputs
from tests.kit.data import DIGITS, digits_arrays
from tests.kit.graphs import conv_model, make_model, ops


def _spread(rng: np.random.Generator, weight: np.ndarray, axis: int) -> np.ndarray:
    """`weight` with its channels on `axis` scaled over three decades (depthwise-like ranges)."""
    shape = [1] * weight.ndim
    shape[axis] = -1
    return (weight * 10.0 ** rng.uniform(-2, 1, weight.shape[axis]).reshape(shape)).astype(
        np.float32)


def _mobile_block() -> sg.ir.Model:
    """Conv 1x1 -> Relu -> depthwise 3x3 -> Clip(0, 6) -> Conv 1x1: MobileNetV2's triple."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": _spread(rng, rng.standard_normal((8, 4, 1, 1)).astype(np.float32), 0),
        "b1": rng.standard_normal(8).astype(np.float32),
        "w2": _spread(rng, rng.standard_normal((8, 1, 3, 3)).astype(np.float32), 0),
        "b2": rng.standard_normal(8).astype(np.float32),
        "w3": rng.standard_normal((6, 8, 1, 1)).astype(np.float32),
        "lo": np.array(0, np.float32), "hi": np.array(6, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="expand"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="depthwise", group=8,
                         pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"),
        helper.make_node("Conv", ["r2", "w3"], ["y"], name="project"),
    ]
    return make_model(nodes, [("x", [2, 4, 6, 6])], ["y"], weights)


def _mlp() -> sg.ir.Model:
    """Gemm (transB) -> Relu -> Gemm -> Gemm: two pairs, the second without an activation."""
    rng = np.random.default_rng(1)
    weights = {
        "w1": _spread(rng, rng.standard_normal((16, 5)).astype(np.float32), 0),
        "b1": rng.standard_normal(16).astype(np.float32),
        "w2": rng.standard_normal((16, 7)).astype(np.float32),
        "b2": rng.standard_normal((1, 7)).astype(np.float32),
        "w3": rng.standard_normal((3, 7)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["r1"], name="relu"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["g2"], name="fc2"),
        helper.make_node("Gemm", ["g2", "w3"], ["y"], name="fc3", transB=1),
    ]
    return make_model(nodes, [("x", [4, 5])], ["y"], weights)


def _single_conv() -> sg.ir.Model:
    weight = np.random.default_rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32)
    return conv_model(weight, [2, 3, 8, 8], bias=np.zeros(4, np.float32))


def _ranges(model: sg.ir.Model, name: str, axis: int) -> np.ndarray:
    node = next(n for n in model.graph if n.name == name)
    weight = node.inputs[1].const_value.numpy()
    return np.abs(np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)).max(axis=1)


@pytest.mark.parametrize(("build", "pairs", "x_scale"), [(_mobile_block, 2, 4.0), (_mlp, 2, 3.0)])
def test_equalization_is_exact_with_the_verifier_off(build, pairs, x_scale) -> None:  # noqa: ANN001
    reference = build()
    feeds = {"x": (np.random.default_rng(2).standard_normal(
        reference.graph.inputs[0].shape.numpy()) * x_scale).astype(np.float32)}
    result = CrossLayerEqualizationPass()(build())  # called directly: no pipeline verifier
    assert result.modified and len(result.pairs) == pairs and result.iterations > 1
    assert_same_outputs(reference, result.model, feeds)


def test_the_triple_is_equalized_and_relu6_gets_a_per_channel_bound() -> None:
    before = _mobile_block()
    assert np.ptp(np.log10(_ranges(before, "depthwise", 0))) > 1.5  # over a decade and a half
    model = CrossLayerEqualizationPass()(_mobile_block()).model
    assert ops(model)["Clip"] == 0 and ops(model)["Min"] == 1 and ops(model)["Relu"] == 2
    # converged: each channel's range is the same on both sides of both pairs
    np.testing.assert_allclose(_ranges(model, "expand", 0), _ranges(model, "depthwise", 0),
                               rtol=1e-3)
    np.testing.assert_allclose(_ranges(model, "depthwise", 0), _ranges(model, "project", 1),
                               rtol=1e-3)
    assert np.ptp(np.log10(_ranges(model, "depthwise", 0))) < np.ptp(
        np.log10(_ranges(before, "depthwise", 0)))
    bound = next(n for n in model.graph if n.op_type == "Min").inputs[1].const_value.numpy()
    assert bound.shape == (8, 1, 1) and not np.allclose(bound, 6.0)


def test_the_pipeline_step_verifies_it() -> None:
    result = sg.optimize_with_report(_mobile_block(), recipe=["equalize"])[1]
    assert result.verified and [(r.name, r.exact) for r in result.records] == [("equalize", True)]


def test_a_model_without_pairs_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="^no Conv/Gemm pairs to equalize"):
        CrossLayerEqualizationPass()(_single_conv())
    assert NO_PAIRS.startswith("no Conv/Gemm pairs")


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_rejects_what_the_options_cannot_do(tmp_path, capsys) -> None:
    single = tmp_path / "conv.onnx"
    sg.save(_single_conv(), single)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "q.onnx"
    code, err = _run(capsys, "quantize", single, "-o", out, "--calib", calib, "--equalize")
    assert code == 2 and err.count("\n") == 1 and "no Conv/Gemm pairs to equalize" in err, err
    code, err = _run(capsys, "quantize", DIGITS, "-o", out, "--bias-correction")
    assert code == 2 and err.count("\n") == 1, err
    assert "--bias-correction needs calibration data (--calib DATA.npz)" in err
    code, err = _run(capsys, "quantize", DIGITS, "-o", out, "--equalize")
    assert code == 2 and "--equalize applies to static quantization (with --calib)" in err, err
    assert not out.exists()


def test_python_rejects_bias_correction_without_calibration() -> None:
    with pytest.raises(BadOptionError, match=r"^bias_correction= needs calibration data "
                                             r"\(calibration=\)"):
        sg.quantize(sg.load(DIGITS), bias_correction=True)


@pytest.fixture(scope="module")
def digits_session() -> StaticSession:
    calib = digits_arrays("digits_calib.npz", rows=64)
    return StaticSession(sg.load(DIGITS), calib, QuantizeOptions(per_channel=False,
                                                                 progress=False))


def test_bias_correction_takes_back_the_measured_shift(digits_session) -> None:  # noqa: ANN001
    session = digits_session
    plain = session.build()
    before = layer_shifts(plain, session.prepared, session.batches)
    corrected = StaticSession.__new__(StaticSession)
    corrected.__dict__.update(session.__dict__)
    corrected.options = QuantizeOptions(per_channel=False, progress=False, bias_correction=True)
    fixed = corrected.build()
    after = layer_shifts(fixed, session.prepared, session.batches)
    assert before.keys() == after.keys() and len(before) >= 2
    worst_before = max(float(np.abs(s).max()) for s in before.values())
    worst_after = max(float(np.abs(s).max()) for s in after.values())
    assert worst_after < 0.5 * worst_before, (worst_before, worst_after)


def test_the_budget_search_ranks_layers_by_the_report_not_one_evaluation_each() -> None:
    model = sg.load(DIGITS)
    data = digits_arrays("digits_test.npz", rows=200)
    quantized, report = sg.quantize_with_report(
        model, calibration=digits_arrays("digits_calib.npz", rows=64), per_channel=False,
        data={k: v for k, v in data.items() if k != "labels"}, min_cosine=0.99992,
        progress=False)
    search = report.budget
    assert search is not None and search.evaluation is not None
    assert search.evaluation.cosine is not None and search.evaluation.cosine >= 0.99992
    assert search.tried[0][0] == 0 and search.tried[0][2] < 0.99992  # all int8 missed it
    assert search.kept and all(k.proxy is not None and 20 < k.proxy < 80 for k in search.kept)
    assert search.table is not None and all(np.isnan(r.metric) for r in search.table.rows)
    # every layer quantized, then a bisection over 6 candidates and the refinement at most
    assert len(search.tried) <= 1 + 3 + len(search.kept), search.tried
    assert "SQNR" in str(report) and "dB on the calibration data" in str(report)
    kept = {k.node for k in search.kept}
    floats = {n.name for n in quantized.graph if n.op_type in ("Conv", "Gemm")
              and n.inputs[1].producer() is None}
    assert kept <= floats


def test_the_recipe_form_equalizes_and_corrects_in_the_quantize_step() -> None:
    calibration = {"x": np.random.default_rng(4).standard_normal((16, 4, 6, 6)).astype(
        np.float32) * 4}
    step = {"name": "quantize", "per-channel": False, "equalize": True, "bias-correction": True}
    model = sg.optimize(_mobile_block(), recipe=[step], calibration=calibration)
    counts = ops(model)  # the ReLU6 bound is kept above the quantization range, then dropped
    assert counts["Min"] == 0 and counts["Clip"] == 0 and counts["QuantizeLinear"] >= 3
    plain = sg.optimize(_mobile_block(), recipe=[{"name": "quantize", "per-channel": False}],
                        calibration=calibration)
    assert ops(plain)["Clip"] == 1 and ops(plain)["Min"] == 0


# --- the ReLU6 bounds and the quantized model (issue 27's follow-up: a Min per equalized ReLU6
# ran in float between DequantizeLinear and QuantizeLinear, 1.5-1.7x plain per-tensor int8) ---


def _block_calibration() -> dict[str, np.ndarray]:
    return {"x": (np.random.default_rng(4).standard_normal((16, 4, 6, 6)) * 4).astype(
        np.float32)}


def _bounds(model: sg.ir.Model, ceilings: bool) -> tuple[StaticSession, object]:
    """The block equalized (scales limited by the measured ceilings or not), its per-tensor
    session and `drop_saturated_bounds`'s answer for its plan."""
    calib = _block_calibration()
    batch = {"x": calib["x"][:2]}
    limits = clip_ceilings(model, calibration_batches(model, calib)) if ceilings else None
    session = StaticSession(equalized(model, batch, limits), calib,
                            QuantizeOptions(per_channel=False, progress=False))
    plan = session.plan()
    params = activation_params(plan, session.statistics([a.value for a in plan.activations]),
                               "minmax")
    return session, drop_saturated_bounds(session.prepared, plan, params)


def test_limited_scales_stay_exact_in_float_and_keep_the_bound_above_the_range() -> None:
    calib = _block_calibration()
    limits = clip_ceilings(_mobile_block(), calibration_batches(_mobile_block(), calib))
    assert list(limits) == ["r2"] and limits["r2"].shape == (8,)
    step = CrossLayerEqualizationPass()
    step.ceilings = limits
    result = step(_mobile_block())  # called directly: no verifier
    assert_same_outputs(_mobile_block(), result.model, {"x": calib["x"][:2]})
    assert ops(result.model)["Min"] == 1
    # the paper's scales put a bound below the quantization range; the limited ones do not
    assert _bounds(_mobile_block(), ceilings=False)[1].kept
    session, found = _bounds(_mobile_block(), ceilings=True)
    assert found.dropped == ["relu6"] and not found.kept
    assert ops(found.model)["Min"] == 0


def test_a_dropped_bound_was_a_no_op_in_the_quantized_model() -> None:
    """Q(min(x, b)) == Q(x) bit for bit: the bound put back in front of the QuantizeLinear of
    the dropped Min's value changes no output."""
    session, found = _bounds(_mobile_block(), ceilings=True)
    quantized = session.build(model=found.model)
    bound = next(n for n in session.prepared.graph if n.op_type == "Min").inputs[1]
    check = ir.from_proto(ir.to_proto(quantized))
    quantize = next(n for n in check.graph if n.op_type == "QuantizeLinear"
                    and n.inputs[0].name == "r2")
    value = ir.val("bound", const_value=bound.const_value)
    check.graph.register_initializer(value)
    minimum = ir.node("Min", [quantize.inputs[0], value], name="bound_back")
    check.graph.insert_before(quantize, [minimum])
    minimum.outputs[0].type, minimum.outputs[0].shape = (quantize.inputs[0].type,
                                                         quantize.inputs[0].shape)
    quantize.replace_input_with(0, minimum.outputs[0])
    rng = np.random.default_rng(5)
    sessions = [create_session(m, optimization="disable") for m in (quantized, check)]
    for scale in (1, 4, 16):  # from inside the range to far beyond every bound
        feeds = {"x": (rng.standard_normal((2, 4, 6, 6)) * scale).astype(np.float32)}
        np.testing.assert_array_equal(run(sessions[0], feeds)["y"], run(sessions[1], feeds)["y"])
    assert ops(check)["Min"] == 1 and ops(quantized)["Min"] == 0
