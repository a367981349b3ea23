"""Graph passes, one module per family, all built on `onnx_ir.passes`.

Passes register into `registry` (a leaf: importing a pass imports no onnxruntime) with their
traits declared. `run_pipeline` runs named passes (or presets) from data through onnx_ir's
`PassManager`, instrumented and verified; `lossless` is the preset of exact cleanup and fusion
passes that quantization, pruning and low-rank run first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from slimgraph.passes.pipeline import (
    PassRecord,
    PipelineResult,
    build_pipeline,
    load_recipe,
    run_pipeline,
)
from slimgraph.passes.registry import (
    PASSES,
    PRESETS,
    PassInfo,
    describe_passes,
    options_from,
    pass_options,
    register_pass,
    register_preset,
)

__all__ = [
    "PASSES",
    "PRESETS",
    "PassInfo",
    "describe_passes",
    "options_from",
    "pass_options",
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
    "TRANSFORMER_STEPS",
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

# `lossless`, then the transformer fusions into onnxruntime's contrib ops that make it faster
# (MultiHeadAttention, BiasGelu). A preset of its own, not part of `lossless`: its output runs
# only on onnxruntime (com.microsoft domain), while `lossless` keeps standard ONNX.
# `fuse-skip-layernorm` is not here: onnxruntime 1.32's CPU SkipLayerNormalization is slower
# than the Add + Add + LayerNormalization it replaces (a [8, 128, 384] tensor: 2.1 ms vs 0.35 ms
# CPU time on one thread, 11-14 ms vs 0.33 ms wall on two threads, machine loaded); BiasGelu is
# as fast on one thread and faster on two (4.6 ms vs 7.0 ms for [8, 128, 1536]). onnxruntime's
# own optimizer would fuse Add + LayerNormalization into SkipLayerNormalization at session
# creation anyway: `residual-sum` writes the residual Add as Sum, which it does not match.
_LOSSLESS_TAIL = ("mark-units", "compact-constants")  # these stay last
TRANSFORMER_STEPS: list[str | dict[str, object]] = [
    *(step for step in LOSSLESS_STEPS if step not in _LOSSLESS_TAIL),
    "fuse-attention",
    "fuse-bias-gelu",
    "fuse-rms-norm",
    "residual-sum",
    "cleanup",
    *(step for step in LOSSLESS_STEPS if step in _LOSSLESS_TAIL),
]

register_preset("cleanup-only", CLEANUP_STEPS)
register_preset("lossless", LOSSLESS_STEPS)
register_preset("transformer", TRANSFORMER_STEPS)


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
