"""Graph passes, one module per family, all built on `onnx_ir.passes`.

`run_pipeline` runs named passes (or presets) from data, instrumented and verified; `lossless`
is the preset of exact cleanup and fusion passes that quantization, pruning and low-rank run first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from slimgraph.passes.pipeline import (
    PASSES,
    PRESETS,
    PassRecord,
    PipelineResult,
    build_pipeline,
    load_recipe,
    register_pass,
    register_preset,
    run_pipeline,
)

__all__ = [
    "PASSES",
    "PRESETS",
    "PassRecord",
    "PipelineResult",
    "build_pipeline",
    "load_recipe",
    "register_pass",
    "register_preset",
    "run_pipeline",
    "lossless",
    "LOSSLESS_STEPS",
    "CLEANUP_STEPS",
]

# Cleanup only: folding, dead code, identities, dropout, reshape/transpose chains, CSE.
CLEANUP_STEPS: list[str | dict[str, object]] = ["cleanup"]

# Cleanup + the exact fusions that never slow onnxruntime down, then cleanup again for what the
# fusions left dead, then the activation units for quantization. `batchnorm-to-affine` is not
# here: a lone BatchNormalization is one onnxruntime kernel, Mul + Add are two (measured on
# DenseNet-121: 0.77x latency without it, 0.95x with it, ORT optimizations on); append it to a
# recipe when a later pass needs Mul/Add instead of BatchNormalization. `compact-constants` last:
# uniform weights materialized from ConstantOfShape go back to it, so the file never grows.
LOSSLESS_STEPS: list[str | dict[str, object]] = [
    "cleanup",
    "fuse-pad",
    "sum-to-add",
    "fuse-batchnorm",
    "fold-affine",
    "matmul-add-to-gemm",
    "cleanup",
    "mark-units",
    "compact-constants",
]

register_preset("cleanup-only", CLEANUP_STEPS)
register_preset("lossless", LOSSLESS_STEPS)


def lossless(
    model: ir.Model,
    *,
    verify: bool = True,
    feeds: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | None = None,
    compact: bool = True,
) -> PipelineResult:
    """Run the exact cleanup + fusion passes on a copy of `model` (BN folded into Conv, ...).

    Args:
        model: the input (not modified).
        verify: check each pass on onnxruntime (exact: rtol 1e-4, atol 1e-5 of output scale).
        feeds: sample inputs for verification (default: seeded random feeds).
        compact: end with `compact-constants` (False where a later pass needs the weights).

    Returns:
        `PipelineResult`; `.model` is the optimized model, `.records` what each pass did.

    Example:
        >>> folded = lossless(model).model  # doctest: +SKIP
    """
    steps = LOSSLESS_STEPS if compact else [s for s in LOSSLESS_STEPS if s != "compact-constants"]
    return run_pipeline(model, steps, verify=verify, feeds=feeds)
