"""Zero-shot calibration: inputs synthesized from BatchNorm statistics calibrate int8 nearly as
well as real data on the bundled digits CNN (issue 14: at least halfway from Gaussian noise)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimgraph as sg
from slimgraph.runtime.metrics import evaluate, load_data
from tests.kit.data import DATA
from tests.kit.exports import exported_model

pytest.importorskip("torch")

from slimgraph.runtime.torch_backend import zero_shot_calibration  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return sg.load(DATA / "digits_cnn.onnx")


def _cosine(model, calibration) -> float:
    quantized = sg.quantize(model, calibration=calibration, progress=False)
    return evaluate(quantized, load_data(DATA / "digits_test.npz", model), reference=model).cosine


def test_digits_has_batchnorm_as_loaded(model):
    assert sum(n.op_type == "BatchNormalization" for n in model.graph) >= 5


def test_zero_shot_gets_at_least_halfway_from_noise_to_real_data(model):
    rng = np.random.default_rng(0)
    noise = _cosine(model, {"image": rng.standard_normal((64, 1, 8, 8)).astype(np.float32)})
    real = _cosine(model, DATA / "digits_calib.npz")
    synthesized = zero_shot_calibration(model, samples=64, steps=100, seed=0)
    assert synthesized["image"].shape == (64, 1, 8, 8)
    assert synthesized["image"].dtype == np.float32
    zero_shot = _cosine(model, synthesized)
    assert real > noise
    assert zero_shot >= noise + 0.5 * (real - noise), (noise, zero_shot, real)


def test_synthesized_inputs_take_the_statistics_of_real_images(model):
    """The digits images are in [0, 1] with mean 0.30, std 0.38: the BN statistics of the stem
    pull the synthesized inputs there from N(0, 1)."""
    x = zero_shot_calibration(model, samples=32, steps=60, seed=1)["image"]
    real = np.load(DATA / "digits_calib.npz")["image"]
    assert abs(x.mean() - real.mean()) < 0.05
    assert abs(x.std() - real.std()) < 0.05


def test_same_seed_same_inputs(model):
    a = zero_shot_calibration(model, samples=4, steps=3, seed=5)["image"]
    b = zero_shot_calibration(model, samples=4, steps=3, seed=5)["image"]
    np.testing.assert_array_equal(a, b)


def test_model_without_batchnorm_is_refused(model):
    folded = sg.optimize(model)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph)
    with pytest.raises(sg.UnsupportedModelError) as error:
        zero_shot_calibration(folded)
    assert str(error.value) == (
        "zero-shot calibration needs BatchNormalization layers (their running statistics); "
        "the model has none (calibrate with data instead)"
    )


def test_integer_inputs_are_refused():
    stats = [numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("g", "b", "m", "v")]
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("BatchNormalization", ["f", "g", "b", "m", "v"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        stats,
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    with pytest.raises(sg.UnsupportedModelError) as error:
        zero_shot_calibration(model)
    assert str(error.value) == (
        "zero-shot calibration synthesizes float inputs; input 'ids' is INT64"
    )


def test_bert_without_batchnorm_is_refused():
    with pytest.raises(sg.UnsupportedModelError, match="needs BatchNormalization layers"):
        zero_shot_calibration(exported_model("bert"))


def test_bad_sample_count(model):
    with pytest.raises(sg.BadOptionError, match="^zero-shot calibration needs at least 2 samples"):
        zero_shot_calibration(model, samples=1)


def test_a_synthesis_the_time_budget_stops_before_it_converges_is_refused(model):
    # a budget of 1 ms stops each batch after its first step: the loss has not moved
    from slimgraph.errors import VerificationError

    with pytest.raises(VerificationError, match=r"^zero-shot synthesis did not converge within "
                       r"0\.001 s: the BatchNorm-statistics loss fell only from .* in 1 steps; "
                       r"calibration ranges .* give --calib DATA\.npz or a larger "
                       r"--zero-shot-time$"):
        zero_shot_calibration(model, samples=8, time_budget=0.001, progress=False)
