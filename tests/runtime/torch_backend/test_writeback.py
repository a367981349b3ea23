"""write_back: trained values land in the same initializers; everything else is untouched."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from tests.kit.asserts import outputs_of
from tests.kit.data import DATA, digits_arrays
from tests.runtime.torch_backend.backend_helpers import torch_outputs

torch = pytest.importorskip("torch")

from slimgraph.runtime.torch_backend import lower, write_back  # noqa: E402


def _structure(model: ir.Model) -> list:
    nodes = [
        (n.name, n.domain, n.op_type, [v.name if v else None for v in n.inputs],
         [v.name for v in n.outputs], sorted((k, str(a.value)) for k, a in n.attributes.items()),
         dict(n.metadata_props))
        for n in model.graph
    ]
    return [
        nodes, dict(model.opset_imports), dict(model.metadata_props),
        [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs],
        model.ir_version, model.producer_name,
    ]


def _initializer_bytes(model: ir.Model) -> dict[str, tuple]:
    return {
        n: (v.const_value.dtype, tuple(v.const_value.shape), v.const_value.tobytes())
        for n, v in model.graph.initializers.items()
    }


@pytest.fixture(scope="module")
def model():
    return sg.load(DATA / "digits_cnn.onnx")


def test_round_trip_is_exact(model):
    before = ir.to_proto(model).SerializeToString()
    out = write_back(model, lower(model))
    assert out is not model
    assert _initializer_bytes(out) == _initializer_bytes(model)
    assert _structure(out) == _structure(model)
    assert ir.to_proto(out).SerializeToString() == before
    assert ir.to_proto(model).SerializeToString() == before  # input untouched


def test_trained_values_are_written_with_names_dtypes_shapes(model):
    lowered = lower(model)
    lowered.train()
    batch = digits_arrays("digits_train.npz", rows=64)
    optimizer = torch.optim.SGD(lowered.parameters(), lr=0.05)
    x = torch.from_numpy(batch["image"])
    y = torch.from_numpy(batch["labels"]).long()
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(lowered(x)[0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    lowered.eval()
    out = write_back(model, lowered)
    old, new = _initializer_bytes(model), _initializer_bytes(out)
    assert set(old) == set(new)
    changed = {n for n in old if old[n][2] != new[n][2]}
    assert set(lowered.weight_names().values()) <= changed  # every weight moved
    assert any("running_mean" in n for n in changed)  # BN statistics updated in train mode
    assert all(old[n][:2] == new[n][:2] for n in old)
    assert _structure(out) == _structure(model)
    feeds = {"image": digits_arrays(rows=50)["image"]}
    want = torch_outputs(lowered, feeds)
    got = outputs_of(out, feeds, "all")
    np.testing.assert_allclose(got["linear"], want["linear"], rtol=1e-4, atol=1e-5)
