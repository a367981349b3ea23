"""Torch-backend checks: a lowered model's outputs against onnxruntime's (built on `tests.kit`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from tests.kit.asserts import assert_close, outputs_of

__all__ = [
    "RTOL", "ATOL_OF_SCALE", "torch_outputs", "assert_matches_ort", "with_measured_codes",
    "assert_lowers_exactly",
]

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


_DQL_TYPES = (ir.DataType.UINT8, ir.DataType.FLOAT, ir.DataType.UINT8)


def with_measured_codes(
    model: ir.Model, feeds: Mapping[str, np.ndarray]
) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """`model` with every DynamicQuantizeLinear replaced by graph inputs fed what onnxruntime's
    DynamicQuantizeLinear computed on `feeds` (codes, scale, zero point).

    Dynamic int8 graphs are discontinuous: a 1-ulp difference in a float value upstream (torch's
    and onnxruntime's LayerNorm or GEMM summation orders differ) flips a code where the value
    sits at a rounding tie, and onnxruntime's own optimization levels differ from each other the
    same way. Given the same codes, the rest of the graph must agree at the exact tolerance.
    """
    from slimgraph.runtime.calibrate import with_outputs

    dqls = [n for n in model.graph if n.op_type == "DynamicQuantizeLinear"]
    names = [v.name for n in dqls for v in n.outputs if v.name]
    measured = outputs_of(with_outputs(model, names), feeds, optimization="disable", threads=None)
    cut = ir.from_proto(ir.to_proto(model))
    for node in [n for n in cut.graph if n.op_type == "DynamicQuantizeLinear"]:
        for value, dtype in zip(node.outputs, _DQL_TYPES, strict=True):
            replacement = ir.Value(name=value.name, type=ir.TensorType(dtype), shape=value.shape)
            value.name = f"{value.name}__computed"
            value.replace_all_uses_with(replacement)
            cut.graph.inputs.append(replacement)
        cut.graph.remove(node, safe=False)
    return cut, {**feeds, **{n: measured[n] for n in names}}


def assert_lowers_exactly(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> None:
    """`assert_matches_ort`, a dynamic int8 graph given onnxruntime's DynamicQuantizeLinear codes
    (see `with_measured_codes`)."""
    if any(n.op_type == "DynamicQuantizeLinear" for n in model.graph):
        model, feeds = with_measured_codes(model, feeds)
    assert_matches_ort(model, feeds)
