"""Lowering the bundled digits CNN: eval outputs equal onnxruntime's, batch sizes, parameters."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from tests.kit.data import DATA, digits_arrays
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
