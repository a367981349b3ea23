"""Shared checks for the torch backend tests: lowered outputs against onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from slimgraph.runtime import create_session, run

DATA = Path(__file__).resolve().parents[3] / "slimgraph" / "data"
RTOL = 1e-4
ATOL_OF_SCALE = 1e-5  # absolute tolerance, as a fraction of the output's largest magnitude


def ort_outputs(
    model: ir.Model, feeds: Mapping[str, np.ndarray], optimization: str = "all"
) -> dict[str, np.ndarray]:
    return run(create_session(model, optimization=optimization), dict(feeds))


def torch_outputs(lowered, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        return {k: v.detach().numpy() for k, v in lowered.run(feeds).items()}


def assert_matches_ort(
    model: ir.Model, feeds: Mapping[str, np.ndarray], *, optimization: str = "all",
    rtol: float = RTOL, atol_of_scale: float = ATOL_OF_SCALE, lowered=None,
) -> None:
    """Eval-mode outputs equal onnxruntime's: |t - o| <= atol + rtol * |o| with
    atol = atol_of_scale * max|o| (the output's own scale)."""
    from slimgraph.runtime.torch_backend import lower

    lowered = lowered if lowered is not None else lower(model)
    lowered.eval()
    expected = ort_outputs(model, feeds, optimization)
    got = torch_outputs(lowered, feeds)
    assert list(got)[: len(expected)] == list(expected)
    for name, want in expected.items():
        have = got[name]
        assert have.shape == want.shape, name
        if want.dtype.kind in "biu":
            np.testing.assert_array_equal(have, want, err_msg=name)
            continue
        atol = atol_of_scale * float(np.abs(want).max()) if want.size else 0.0
        np.testing.assert_allclose(have, want, rtol=rtol, atol=atol, err_msg=name)


def digits(name: str = "digits_test.npz", rows: int | None = None) -> dict[str, np.ndarray]:
    data = np.load(DATA / name)
    return {k: data[k][:rows] for k in data.files}
