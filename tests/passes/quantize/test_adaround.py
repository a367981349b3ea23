"""AdaRound and AdaQuant on static quantization's QDQ graph, and 4-bit weights (W4A8).

On the bundled digits CNN (trained, real data): learned rounding against nearest rounding on
onnxruntime, the written graph's codes and scales, the options' refusals on the command line and
in Python, and the recipe form.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.errors import BadOptionError
from slimgraph.passes.quantize import adaround
from slimgraph.runtime.session import create_session
from slimgraph.tools.cli import main
from tests.kit.data import DIGITS, DIGITS_CALIB, digits, digits_arrays, digits_test

pytest.importorskip("torch")

STEPS = 150  # per layer: enough to beat nearest rounding on this model, a few seconds in all


def _calibration(model: ir.Model) -> dict[str, np.ndarray]:
    return {model.graph.inputs[0].name or "": digits_arrays("digits_calib.npz")["image"]}


def _logits(model: ir.Model, images: np.ndarray) -> np.ndarray:
    session = create_session(model)
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def _weight_codes(model: ir.Model) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Codes, scale and axis of every weight read by a DequantizeLinear into a Conv/Gemm."""
    found = {}
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        dq = node.inputs[1].producer()
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        codes, scale = dq.inputs[0].const_value, dq.inputs[1].const_value
        found[node.name] = (codes.numpy(), scale.numpy(), dq.attributes.get_int("axis", 1))
    return found


@pytest.fixture(scope="module")
def models(request: pytest.FixtureRequest) -> dict[str, ir.Model]:
    """The float digits CNN and its W4A8 quantizations, nearest, AdaRound and AdaQuant."""
    patch = pytest.MonkeyPatch()
    request.addfinalizer(patch.undo)
    patch.setattr(adaround, "STEPS", STEPS)
    model = digits()
    calibration = _calibration(model)
    found = {"float": model}
    for rounding in ("nearest", "adaround", "adaquant"):
        found[rounding] = sg.quantize(model, calibration=calibration, weight_bits=4,
                                      round=rounding)
    return found


def _mse(models: dict[str, ir.Model], name: str) -> float:
    images, _ = digits_test()
    reference = _logits(models["float"], images)
    return float(np.mean((_logits(models[name], images) - reference) ** 2))


def test_adaround_reconstructs_the_float_outputs_better_than_nearest(models) -> None:
    nearest, learned = _mse(models, "nearest"), _mse(models, "adaround")
    assert learned < 0.9 * nearest, (learned, nearest)


def test_adaquant_reconstructs_the_float_outputs_better_than_nearest(models) -> None:
    nearest, learned = _mse(models, "nearest"), _mse(models, "adaquant")
    assert learned < 0.9 * nearest, (learned, nearest)


def test_w4a8_weights_lie_on_the_4bit_grid_and_adaround_only_rounds_up_or_down(models) -> None:
    nearest, learned = _weight_codes(models["nearest"]), _weight_codes(models["adaround"])
    assert nearest.keys() == learned.keys() and len(learned) == 7
    changed = 0
    for name, (codes, scale, _) in learned.items():
        assert codes.dtype == np.int8 and codes.min() >= -7 and codes.max() <= 7, name
        np.testing.assert_array_equal(scale, nearest[name][1])  # AdaRound keeps the scales
        # the other neighbour of the weight on the grid at most: floor or ceil, never further
        step = np.abs(codes.astype(np.int64) - nearest[name][0])
        assert step.max() <= 1, name
        changed += int(step.sum())
    assert changed > 0


def test_adaquant_writes_consistent_scales_and_int32_biases(models) -> None:
    quantized = models["adaquant"]
    images, labels = digits_test()
    accuracy = float((_logits(quantized, images).argmax(1) == labels).mean())
    reference = float((_logits(models["float"], images).argmax(1) == labels).mean())
    assert accuracy >= reference - 0.01
    for node in quantized.graph:
        if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2:
            bias_dq = node.inputs[2].producer()
            assert bias_dq.inputs[0].const_value.dtype == ir.DataType.INT32
            assert _weight_codes(quantized)[node.name][0].max() <= 7


def test_round_without_calibration_data_exits_2_with_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(DIGITS), "-o", str(out), "--round", "adaround"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("slimgraph quantize: error: --round adaround needs calibration data "
                   "(--calib DATA.npz)\n")
    assert not out.exists()


def test_weight_bits_outside_static_mode_exits_2(tmp_path, capsys) -> None:
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(DIGITS), "-o", str(out), "--weight-bits", "4"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("slimgraph quantize: error: --weight-bits applies to static quantization, "
                   "not to dynamic mode\n")
    assert not out.exists()


def test_python_refusals_name_the_keywords() -> None:
    model = digits()
    with pytest.raises(BadOptionError, match=r"^round='adaquant' needs calibration data "
                                             r"\(calibration=\)$"):
        sg.quantize(model, round="adaquant")
    with pytest.raises(BadOptionError, match=r"^unknown round 'up' \(choose nearest, adaround, "
                                             r"adaquant\)$"):
        sg.quantize(model, calibration=_calibration(model), round="up")  # type: ignore[arg-type]
    with pytest.raises(BadOptionError, match=r"^weight_bits must be 4 or 8 \(got 2\)$"):
        sg.quantize(model, calibration=_calibration(model), weight_bits=2)


def test_cli_w4a8_nearest_and_the_recipe_form(tmp_path, capsys) -> None:
    out = tmp_path / "w4.onnx"
    code = main(["quantize", str(DIGITS), "-o", str(out), "--calib", str(DIGITS_CALIB),
                 "--weight-bits", "4"])
    assert code == 0, capsys.readouterr().err
    from_cli = _weight_codes(sg.load(out))
    assert all(codes.max() <= 7 and codes.min() >= -7 for codes, _, _ in from_cli.values())
    model = digits()
    recipe = sg.optimize(model, recipe=[{"name": "quantize", "weight-bits": 4}],
                         calibration=_calibration(model))
    for name, (codes, scale, _) in _weight_codes(recipe).items():
        np.testing.assert_array_equal(codes, from_cli[name][0])
        np.testing.assert_array_equal(scale, from_cli[name][1])


def test_learned_rounding_and_bias_correction_are_refused_together(tmp_path, capsys) -> None:
    with pytest.raises(BadOptionError, match=r"^bias_correction=True and round='adaround' do not "
                       r"combine: learned rounding fits each layer's output to the float model's "
                       r"itself \(AdaQuant its bias too\); choose one$"):
        sg.quantize(DIGITS, calibration=DIGITS_CALIB, round="adaround", bias_correction=True)
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(DIGITS), "-o", str(out), "--calib", str(DIGITS_CALIB),
                 "--round", "adaquant", "--bias-correction"])
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err.strip() == (
        "slimgraph quantize: error: --bias-correction and --round adaquant do not combine: "
        "learned rounding fits each layer's output to the float model's itself (AdaQuant its "
        "bias too); choose one")
