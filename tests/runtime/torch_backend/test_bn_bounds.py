"""BatchNorm bounds: calibrated ranges narrowed to what each BatchNorm's running statistics allow
(the ranges `quantize --zero-shot` takes; synthesized rows match the statistics, not the tails)."""

from __future__ import annotations

import numpy as np
import pytest

import slimgraph as sg
from slimgraph.errors import BadOptionError
from slimgraph.runtime.metrics import evaluate, load_data
from slimgraph.runtime.torch_backend import batchnorm_bounds
from tests.kit.data import DATA


@pytest.fixture(scope="module")
def model():
    return sg.load(DATA / "digits_cnn.onnx")


def test_bounds_are_the_running_statistics_k_deviations_out_and_through_relu(model):
    bn = next(n for n in model.graph if n.op_type == "BatchNormalization")
    gamma, beta = (bn.inputs[i].const_value.numpy() for i in (1, 2))
    bounds = batchnorm_bounds(model, 4.0)
    low, high = bounds[bn.outputs[0].name]
    assert low == pytest.approx(float((beta - 4 * np.abs(gamma)).min()), rel=1e-6)
    assert high == pytest.approx(float((beta + 4 * np.abs(gamma)).max()), rel=1e-6)
    relu = next(user for user, _ in bn.outputs[0].uses())
    assert relu.op_type == "Relu"
    assert bounds[relu.outputs[0].name] == (0.0, high)


def test_bounds_drop_the_tails_of_an_outlier_row(model):
    """One calibration row 30x the others (a synthesized row's tail) widens every range after
    it; the BatchNorm bounds take most of the cosine it costs back."""
    rows = np.load(DATA / "digits_calib.npz")["image"][:32].copy()
    rows[0] *= 30
    test = load_data(DATA / "digits_test.npz", model)

    def cosine(**options) -> float:
        quantized = sg.quantize(model, calibration={"image": rows}, progress=False, **options)
        return evaluate(quantized, test, reference=model).cosine

    wide, bounded = cosine(), cosine(range_bounds=batchnorm_bounds(model))
    assert bounded > wide + 0.003, (wide, bounded)


@pytest.mark.parametrize("mode", ["dynamic", "weight-only"])
def test_bounds_outside_static_quantization_are_refused(model, mode):
    with pytest.raises(BadOptionError) as caught:
        sg.quantize(model, mode=mode, range_bounds=batchnorm_bounds(model))
    assert str(caught.value) == (
        f"range_bounds= applies to static quantization, not to {mode} mode")
