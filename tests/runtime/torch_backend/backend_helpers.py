"""Torch-backend checks: a lowered model's outputs against onnxruntime's (built on `tests.kit`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from tests.kit.asserts import assert_close, outputs_of

__all__ = ["RTOL", "ATOL_OF_SCALE", "torch_outputs", "assert_matches_ort"]

RTOL = 1e-4
ATOL_OF_SCALE = 1e-5  # absolute tolerance, as a fraction of the output's largest magnitude


def torch_outputs(lowered, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Outputs by name of a lowered module run without gradients."""
    import torch

    with torch.no_grad():
        return {k: v.detach().numpy() for k, v in lowered.run(feeds).items()}


def assert_matches_ort(
    model: ir.Model, feeds: Mapping[str, np.ndarray], *, optimization: str = "all",
    rtol: float = RTOL, atol_of_scale: float = ATOL_OF_SCALE, lowered=None,  # noqa: ANN001
) -> None:
    """Eval-mode outputs equal onnxruntime's: |t - o| <= atol + rtol * |o| with
    atol = atol_of_scale * max|o| (the output's own scale, no floor); integers exactly."""
    from slimgraph.runtime.torch_backend import lower

    lowered = lowered if lowered is not None else lower(model)
    lowered.eval()
    expected = outputs_of(model, feeds, optimization=optimization, threads=None)
    got = torch_outputs(lowered, feeds)
    assert list(got)[: len(expected)] == list(expected)
    for name, want in expected.items():
        assert_close(want, got[name], rtol=rtol, atol=atol_of_scale, scale_floor=0.0, name=name)
