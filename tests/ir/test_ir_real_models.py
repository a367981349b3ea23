"""Real third-party architectures (the ONNX zoo files shipped with onnx) and torch exports load,
save, pass the onnx checker and compute the same outputs as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from slimgraph.ir import load, save
from slimgraph.runtime import create_session, random_feeds, run
from tests import models as test_models
from tests.kit.exports import exported_model


def _close(got: np.ndarray, ref: np.ndarray, rtol: float) -> None:
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


def test_zoo_model_loads_saves_and_checks(zoo_path: Path, tmp_path: Path) -> None:
    model = load(zoo_path)
    original = onnx.load(zoo_path)
    assert len(model.graph) == len(original.graph.node)
    assert [v.name for v in model.graph.outputs] == [v.name for v in original.graph.output]
    out = save(model, tmp_path / zoo_path.name)
    onnx.checker.check_model(str(out), full_check=True)
    again = load(out)
    assert [n.op_type for n in again.graph] == [n.op_type for n in original.graph.node]


@pytest.mark.slow
def test_zoo_model_outputs_match_original(zoo_path: Path, tmp_path: Path) -> None:
    model = load(zoo_path)
    out = save(model, tmp_path / zoo_path.name)
    feeds = random_feeds(model, seed=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    reference = ort.InferenceSession(str(zoo_path), options, providers=["CPUExecutionProvider"])
    expected = reference.run(None, feeds)
    saved = run(create_session(out, threads=2), feeds)
    assert list(saved) == [o.name for o in reference.get_outputs()]
    for ref, got in zip(expected, saved.values(), strict=True):
        assert got.shape == ref.shape
        _close(got, ref, rtol=1e-5)


def test_torch_model_matches_eager_after_save_and_load(
    torch_model_name: str, tmp_path: Path
) -> None:
    module = test_models.build(torch_model_name)
    args = test_models.example_input(torch_model_name)
    with torch.no_grad():
        eager = module(*args)
    eager_outputs = [eager] if isinstance(eager, torch.Tensor) else list(eager)
    path = save(exported_model(torch_model_name), tmp_path / f"{torch_model_name}.onnx")
    onnx.checker.check_model(str(path))
    model = load(path)
    names = [v.name for v in model.graph.inputs]
    feeds = {name: arg.numpy() for name, arg in zip(names, args, strict=True)}
    outputs = list(run(create_session(model), feeds).values())
    assert len(outputs) == len(eager_outputs)
    for got, ref in zip(outputs, eager_outputs, strict=True):
        _close(got, ref.numpy(), rtol=1e-4)
