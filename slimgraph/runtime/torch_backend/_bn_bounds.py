"""Activation ranges a model's BatchNorm layers allow: bounds for zero-shot calibration ranges.

A BatchNormalization output is gamma * (x - mean) / sigma + beta per channel: on the data the
running statistics came from, channel c has mean beta_c and deviation |gamma_c|. Rows synthesized
to match those statistics (`_zeroshot`) match the mean and deviation but not the tails: on a
MobileNetV3-small at 224x224 their min/max ranges were 2-8x real images' in the first blocks.
Narrowing each calibrated range of a BatchNorm output (and of the Relu, HardSwish or Sigmoid right
after it) to [min_c(beta_c - k |gamma_c|), max_c(beta_c + k |gamma_c|)] drops those
tails; `BOUND_DEVIATIONS` is k. `zero_shot_options` gives those bounds with the calibrator
zero-shot rows take (`ZERO_SHOT_METHOD`): the options `quantize --zero-shot` passes, for
`sg.quantize` in Python. No torch needed here.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["BOUND_DEVIATIONS", "ZERO_SHOT_METHOD", "batchnorm_bounds", "zero_shot_options"]

logger = logging.getLogger(__name__)

# k: on the MobileNetV3-small of benchmarks/zeroshot.py, two sets of synthesized rows gave output
# cosine 0.9916 and 0.9811 (percentile 99.99 ranges) unbounded, 0.9898/0.9899 at k = 5, 0.9946 and
# 0.9928 at k = 6, 0.9911 at k = 7 (real images, min/max: 0.9976); k = 3-4 clips real activity.
BOUND_DEVIATIONS = 6.0

# The calibrator for zero-shot rows. They match each BatchNorm's per-channel mean and deviation,
# not the tails of real activations: on the MobileNetV3-small of benchmarks/zeroshot.py (224x224)
# min/max ranges from them were 2-8x real data's in the first blocks (stem convolution 6.3x, its
# hardswish 7.9x; each alone cost 0.013-0.016 cosine) and near 1x in the last ones. The 99.99th
# percentile drops those tails: cosine 0.962 -> 0.992 on the same synthesized rows (real data,
# minmax: 0.998); the digits CNN and a MobileNetV2-style net on the digits stay within 0.00005
# of minmax. The BatchNorm bounds then take 0.992 -> 0.995 on those rows, 0.981 -> 0.993 on rows
# from a longer synthesis.
ZERO_SHOT_METHOD = "percentile"


def _hardswish(x: float) -> float:
    return x * min(max(x + 3.0, 0.0), 6.0) / 6.0


def _after(op_type: str, low: float, high: float) -> tuple[float, float] | None:
    """The range of an elementwise activation of values in [low, high] (None: not one)."""
    if op_type == "Relu":
        return max(low, 0.0), max(high, 0.0)
    if op_type == "HardSwish":  # falls to its minimum -0.375 at -1.5, rises after
        return (-0.375 if low < -1.5 else _hardswish(low)), _hardswish(high)
    if op_type == "Sigmoid":
        return 1.0 / (1.0 + math.exp(-low)), 1.0 / (1.0 + math.exp(-high))
    return None


def batchnorm_bounds(
    model: ir.Model, deviations: float = BOUND_DEVIATIONS
) -> dict[str, tuple[float, float]]:
    """Value name -> (low, high): the range `deviations` running deviations around each
    BatchNormalization output's running mean allow, per tensor (over channels), and the same
    range through a Relu, HardSwish or Sigmoid consuming that output alone.

    For `range_bounds` of static quantization (`passes.quantize.options.StaticOptions`): the names
    are the float model's, which BatchNorm folding keeps (the folded Conv writes the BatchNorm's
    output). BatchNorms whose scale or bias is not constant are left out; an empty dict: none.
    """
    bounds: dict[str, tuple[float, float]] = {}
    for node in model.graph:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.inputs) < 3 or any(v is None or v.const_value is None
                                       for v in node.inputs[1:3]):
            continue
        scale_value, bias_value = node.inputs[1], node.inputs[2]
        assert scale_value is not None and bias_value is not None
        assert scale_value.const_value is not None and bias_value.const_value is not None
        gamma = np.abs(scale_value.const_value.numpy().astype(np.float64))
        beta = bias_value.const_value.numpy().astype(np.float64)
        output = node.outputs[0]
        low = float((beta - deviations * gamma).min())
        high = float((beta + deviations * gamma).max())
        bounds[output.name or ""] = (low, high)
        for user, _ in output.uses():
            after = _after(user.op_type, low, high)
            if after is not None and user.domain in ("", "ai.onnx"):
                bounds[user.outputs[0].name or ""] = after
    logger.debug("BatchNorm bounds (k = %g) for %d values", deviations, len(bounds))
    return bounds


def zero_shot_options(model: ir.Model) -> dict[str, Any]:
    """The static quantization options for calibration on zero-shot rows of `model`: the
    calibrator `ZERO_SHOT_METHOD` and `range_bounds` from its BatchNorms (`batchnorm_bounds`),
    as `quantize --zero-shot` takes them.

    Args:
        model: the float model the rows were synthesized for, as loaded (its BatchNormalization
            nodes still there); not modified.

    Returns:
        {"method": ..., "range_bounds": ...}: keywords for `sg.quantize`.

    Example:
        >>> feeds = zero_shot_calibration(model, time_budget=120)  # doctest: +SKIP
        >>> q = sg.quantize(model, calibration=feeds, **zero_shot_options(model))  # doctest: +SKIP
    """
    return {"method": ZERO_SHOT_METHOD, "range_bounds": batchnorm_bounds(model)}
