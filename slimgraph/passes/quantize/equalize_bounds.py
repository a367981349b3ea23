"""The per-channel ReLU6 bounds cross-layer equalization leaves, kept out of the int8 model.

Equalizing a pair through Clip(x, 0, c) (ReLU6) keeps it exact in float by writing the Clip as
Relu followed by Min(., c / s_i), a per-channel bound (`equalize`). onnxruntime fuses a Relu into
the quantized convolution before it, but not a Min: left in the QDQ model, every Min runs in float
between a DequantizeLinear and a QuantizeLinear, and a per-tensor int8 MobileNetV2 equalized this
way ran 1.46-1.72x slower than the same quantization without equalization.

Such a Min can be a no-op once quantized. Its output is quantized (the next layer's input) with
a scale s and zero point z that saturate at (q_max - z) * s; when every channel's bound b_i is at
or above that, Q(min(x, b)) = Q(x) for every x (x <= b_i: the same value; x > b_i: both round
to q_max). `drop_saturated_bounds` removes such Mins after calibration: the Relu's output takes
the Min's place (and name, so its calibrated range is the Min output's) and the Relu is absorbed
into the convolution like a plain ReLU6. The result is bit for bit the model that quantizes the
Min's output with the Min in place, the activation quantized once, as plain per-tensor int8
quantizes a ReLU6 output (the Min form also quantized the Min's input). A Min whose bounds reach
below the saturation point stays.

With the paper's scales the bounds of outlier channels fall far below it (none of the 17 Mins of
the benchmark's MobileNetV2 qualified), so quantization measures, before equalizing, each
equalizable Clip output's per-channel maximum on the calibration data (`clip_ceilings`) and the
equalization pass limits the scales of those pairs so that every bound qualifies (its
`ceilings`; exact in float either way).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes._kit import constant_array
from slimgraph.passes.quantize.equalize import equalize_pairs
from slimgraph.passes.quantize.policy import QuantPlan
from slimgraph.passes.quantize.qdq import QParams
from slimgraph.runtime.calibrate import stream_values

__all__ = ["BoundsResult", "clip_ceilings", "drop_saturated_bounds"]

logger = logging.getLogger(__name__)

# A bound counts as saturated when it is at least this many steps below q_max from the zero
# point: Q rounds b / s + z to q_max from q_max - 0.5 up; the quarter step left covers float32
# rounding of b / s.
_ROUNDING_SLACK = 0.25


@dataclass
class BoundsResult:
    """What `drop_saturated_bounds` did.

    Attributes:
        model: the float model to quantize (a copy when a Min was dropped, else the input).
        dropped: names of the Min nodes removed.
        kept: (Min node name, lowest bound / saturation point) of those left in (ratio < 1).
    """

    model: ir.Model
    dropped: list[str] = field(default_factory=list)
    kept: list[tuple[str, float]] = field(default_factory=list)


def clip_ceilings(
    model: ir.Model, batches: Iterable[Mapping[str, np.ndarray]], *, progress: bool | None = None
) -> dict[str, np.ndarray]:
    """Per-channel maximum (axis 1, float64 [C]) of each Clip(x, 0, c) output that cross-layer
    equalization would rescale, over `batches`; by value name (one walk of the data)."""
    names = [p.activation.outputs[0].name or "" for p in equalize_pairs(model.graph)
             if p.bound is not None and p.activation is not None]
    if not names:
        return {}
    found: dict[str, np.ndarray] = {}
    for values in stream_values(model, names, batches, progress=progress,
                                description="measuring ReLU6 ranges"):
        for name in names:
            array = values[name]
            channels = np.moveaxis(array, 1, 0).reshape(array.shape[1], -1)
            high = channels.max(axis=1).astype(np.float64)
            found[name] = high if name not in found else np.maximum(found[name], high)
    return found


def drop_saturated_bounds(
    model: ir.Model, plan: QuantPlan, params: Mapping[str, QParams]
) -> BoundsResult:
    """Remove each Min(x, b) (b constant) whose output only quantized nodes read, quantized per
    tensor with a saturation point at or below every b_i (module docstring): exact for the
    quantized model.

    Args:
        model: the float model `plan` was made from (not modified).
        plan: its quantization plan (which nodes read quantized inputs).
        params: the calibrated scale and zero point of each planned activation, by value name.

    Returns:
        A `BoundsResult`; its model is planned and quantized with the same `params` in place of
        `model` (the Relu's output carries the Min output's name).
    """
    quantized_nodes = set(plan.nodes)
    chosen: list[str] = []
    kept: list[tuple[str, float]] = []
    for node in model.graph:
        if not is_onnx_op(node, "Min") or len(node.inputs) != 2:
            continue
        found = _saturation_ratio(node, quantized_nodes, params)
        if found is None:
            continue
        if found >= 1.0:
            chosen.append(node.name or "")
        else:
            kept.append((node.name or "", found))
    if not chosen:
        return BoundsResult(model, kept=kept)
    copy = ir.from_proto(ir.to_proto(model))
    copy.meta.update(model.meta)
    graph = copy.graph
    for node in [n for n in graph if n.name in set(chosen) and is_onnx_op(n, "Min")]:
        data = next(v for v in node.inputs if v is not None and constant_array(v) is None)
        out = node.outputs[0]
        name = out.name
        out.replace_all_uses_with(data)
        graph.remove(node, safe=True)
        data.name = name
    logger.info("dropped %d per-channel bounds saturated by quantization, kept %d",
                len(chosen), len(kept))
    return BoundsResult(copy, chosen, kept)


def _saturation_ratio(
    node: ir.Node, quantized_nodes: set[str], params: Mapping[str, QParams]
) -> float | None:
    """min(b) / the saturation point of the Min's output quantizer, or None when the Min is not
    one this applies to (no constant bound, a float reader, a per-channel quantizer)."""
    arrays = [constant_array(v) if v is not None else None for v in node.inputs]
    if sum(a is not None for a in arrays) != 1:
        return None
    bound = next(a for a in arrays if a is not None)
    data = next(v for v, a in zip(node.inputs, arrays, strict=True) if a is None)
    out = node.outputs[0]
    qp = params.get(out.name or "")
    if data is None or out.is_graph_output() or data.is_graph_input() or qp is None:
        return None
    if len(data.uses()) != 1 or not out.uses() or not _keeps_shape(data, bound):
        return None
    if any(use.node.name not in quantized_nodes for use in out.uses()):
        return None
    if np.size(qp.scale) != 1:
        return None
    qmax = qp.spec.qrange[1]
    steps = qmax - float(np.asarray(qp.zero_point).reshape(())) - _ROUNDING_SLACK
    saturation = steps * float(np.asarray(qp.scale).reshape(()))
    if saturation <= 0:
        return None
    return float(np.min(bound)) / saturation


def _keeps_shape(data: ir.Value, bound: np.ndarray) -> bool:
    """Min(data, bound) has data's shape (the bound broadcasts into it, not the other way)."""
    shape = data.shape
    if shape is None or bound.ndim > len(shape):
        return False
    dims = list(shape)[len(shape) - bound.ndim:]
    return all(b == 1 or (isinstance(d, int) and d == b) for b, d in zip(bound.shape, dims,
                                                                          strict=True))
