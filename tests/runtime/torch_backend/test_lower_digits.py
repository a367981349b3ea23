"""Lowering the bundled digits CNN: eval outputs equal onnxruntime's, batch sizes, parameters."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

import slimgraph as sg
from tests.kit.data import DATA, digits_arrays
from tests.kit.graphs import make_model
from tests.runtime.torch_backend.backend_helpers import assert_matches_ort

torch = pytest.importorskip("torch")

from slimgraph.runtime.torch_backend import lower  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return sg.load(DATA / "digits_cnn.onnx")


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_digits_matches_onnxruntime_at_any_batch(model, batch):
    assert_matches_ort(model, {"image": digits_arrays(rows=batch)["image"]})


def test_digits_parameters_are_the_float_weights(model):
    lowered = lower(model)
    names = lowered.weight_names()
    assert set(names) == {n for n, _ in lowered.named_parameters()}
    float_inits = {
        n for n, v in model.graph.initializers.items() if v.const_value.dtype == ir.DataType.FLOAT
    }
    stats = {n for n in float_inits if n.endswith(("running_mean", "running_var"))}
    assert stats and not stats & set(names.values())
    assert set(names.values()) == float_inits - stats
    for path, init in names.items():
        param = lowered.get_parameter(path)
        np.testing.assert_array_equal(
            param.detach().numpy(), model.graph.initializers[init].const_value.numpy()
        )
    assert lowered.input_names == ["image"]
    assert not lowered.training


def test_forward_is_positional_and_returns_a_tuple(model):
    lowered = lower(model, extra_outputs=["relu"])
    x = torch.from_numpy(digits_arrays(rows=3)["image"])
    out = lowered(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert lowered.output_names[1] == "relu"
    assert out[1].shape[0] == 3 and out[1].shape[1] > 1


def test_parameters_follow_the_slot_table():
    """`ir.layout.SLOTS`: a learned slot trains even a single value (PRelu's slope), a frozen one
    never (Clip's bounds); a constant in no slot trains when it holds more than one value."""
    model = make_model(
        [helper.make_node("PRelu", ["x", "slope"], ["p"]),
         helper.make_node("Clip", ["p", "low", "high"], ["c"]),
         helper.make_node("Mul", ["c", "gain"], ["m"]),
         helper.make_node("Add", ["m", "shift"], ["y"])],
        [("x", [2, 3])], ["y"],
        {"slope": np.array([0.25], np.float32), "low": np.array(-1.0, np.float32),
         "high": np.array(4.0, np.float32), "gain": np.array([2.0], np.float32),
         "shift": np.array([0.5, 1.0, 1.5], np.float32)},
    )
    assert set(lower(model).weight_names().values()) == {"slope", "shift"}


def test_the_standard_attention_is_not_read_with_the_contrib_ops_slots():
    """Opset 23's Attention shares its name with onnxruntime's contrib Attention, whose input 5
    is a frozen attention bias; in the standard op input 5 is the past value, and a learned
    prefix (prefix tuning) trains its keys and values alike."""
    rng = np.random.default_rng(0)
    prefix = {name: rng.standard_normal((1, 2, 2, 4)).astype(np.float32) for name in ("pk", "pv")}
    model = make_model(
        [helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "pk_out", "pv_out"])],
        [("q", [1, 2, 3, 4]), ("k", [1, 2, 3, 4]), ("v", [1, 2, 3, 4])], ["y"], prefix, opset=23,
    )
    assert set(lower(model).weight_names().values()) == {"pk", "pv"}
