"""Cross-layer equalization: per-channel weight ranges evened out between consecutive layers.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction"
(section 4.1). Two layers y = f(W1 x + b1), z = W2 y + b2 with f positively homogeneous
(identity or ReLU: f(x / s) = f(x) / s for s > 0) compute the same z after

    W1[i] /= s_i,  b1[i] /= s_i,  W2[:, i] *= s_i          (i: the channel between them)

and s_i = sqrt(r1_i * r2_i) / r2_i (r1_i: max |W1[i]|, r2_i: max |W2[:, i]|) gives both layers
the range sqrt(r1_i * r2_i) on channel i, so one per-tensor int8 scale no longer spends its levels
on a few wide channels (depthwise convolutions in MobileNets differ by orders of magnitude).
Chains of pairs (MobileNetV2's expand 1x1 -> depthwise 3x3 -> project 1x1: the depthwise layer
is the middle of the triple) are equalized pair by pair, repeatedly, until no scale moves by more
than `tolerance` (relative).

Pairs are Conv -> Conv and Gemm -> Gemm with constant weights, where the first layer's output is
read only by the second, directly, through Relu, or through Clip(x, 0, c) (ReLU6 for c = 6).
Clip's bound does not scale with the channel (clip(x / s, 0, c) != clip(x, 0, c) / s), so an
equalized Clip is written as Relu followed by Min with a per-channel bound c / s_i: exact, at the
cost of one Min node. onnxruntime does not fuse that Min into a quantized convolution (it runs in
float between DequantizeLinear and QuantizeLinear: 1.5-2x the latency of the same per-tensor int8
model without equalization), so static quantization passes `ceilings`, each Clip output's
per-channel maximum on the calibration data (`equalize_bounds.clip_ceilings`): the scales of a
pair through Clip are then limited so that every channel's bound stays at or above the range the
Clip output is quantized to (`_best_top`), and the Min, a no-op after quantization, is
left out of the int8 model (`equalize_bounds.drop_saturated_bounds`). The float model is exact
either way. Grouped and depthwise convolutions are handled on either side. The pass is
exact in float (`exact=True`: verified by the pipeline; tested at rtol 1e-4 with the verifier
off). BatchNormalization between the layers must be folded first (the `lossless` preset or
quantization's `prepare` does that).

Bias absorption (the paper's section 4.1.2) is not done here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from slimgraph.errors import UnsupportedModelError, VerificationError
from slimgraph.passes._graph_utils import is_onnx_op, single_consumer
from slimgraph.passes._kit import Names, constant_array, layout, set_constant
from slimgraph.passes.base import SlimgraphPass, SlimgraphPassResult
from slimgraph.passes.registry import register_pass
from slimgraph.runtime.exact import exact_difference
from slimgraph.runtime.session import create_session, run

__all__ = ["EqualizePair", "EqualizeResult", "CrossLayerEqualizationPass", "equalize_pairs",
           "equalized", "NO_PAIRS"]

logger = logging.getLogger(__name__)

NO_PAIRS = ("no Conv/Gemm pairs to equalize: cross-layer equalization needs a Conv or Gemm whose "
            "output only another Conv or Gemm reads (directly, through Relu or Clip(x, 0, c))")


@dataclass
class EqualizePair:
    """Two layers equalized together through the channels between them.

    Attributes:
        first, second: the layers (Conv or Gemm nodes).
        activation: the node between them (Relu or Clip), or None.
        bound: the activation's upper bound per channel (Clip), else None.
    """

    first: ir.Node
    second: ir.Node
    activation: ir.Node | None
    bound: np.ndarray | None = None


@dataclass
class EqualizeResult(SlimgraphPassResult):
    """The pairs equalized and how many sweeps it took (`iterations`)."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    iterations: int = 0


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """A Clip's (min, max) when both are known constants (max inf when absent), else None."""
    if node.inputs[1:]:
        values = []
        for index, default in ((1, -np.inf), (2, np.inf)):
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is None:
                values.append(default)
                continue
            array = constant_array(value)
            if array is None or array.size != 1:
                return None
            values.append(float(array.reshape(())))
        return values[0], values[1]
    low = node.attributes.get_float("min", float(np.finfo(np.float32).min))
    high = node.attributes.get_float("max", float(np.finfo(np.float32).max))
    return low, high


def _layer(node: ir.Node) -> bool:
    """A Conv or Gemm with a constant float32 weight (and a constant bias if any)."""
    if not is_onnx_op(node, "Conv", "Gemm") or len(node.inputs) < 2:
        return False
    weight = constant_array(node.inputs[1])
    if weight is None or weight.dtype != np.float32:
        return False
    trans_a = node.attributes.get_int("transA", 0) if node.op_type == "Gemm" else 0
    if node.op_type == "Gemm" and (weight.ndim != 2 or trans_a != 0):
        return False
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        array = constant_array(bias)
        if array is None:
            return False
        channels = weight.shape[0] if node.op_type == "Conv" else (
            weight.shape[0] if node.attributes.get_int("transB", 0) else weight.shape[1])
        if array.shape not in ((channels,), (1, channels)):
            return False
    return True


def equalize_pairs(graph: ir.Graph) -> list[EqualizePair]:
    """The pairs of `graph` that cross-layer equalization can rescale (module docstring)."""
    pairs = []
    for node in graph:
        if not _layer(node) or node.outputs[0].is_graph_output():
            continue
        reader = single_consumer(node.outputs[0])
        activation, bound = None, None
        if reader is not None and is_onnx_op(reader, "Relu", "Clip"):
            if reader.op_type == "Clip":
                bounds = _clip_bounds(reader)
                if bounds is None or bounds[0] != 0.0 or not bounds[1] > 0:
                    continue
                bound = None if np.isinf(bounds[1]) else np.float32(bounds[1])
            if reader.outputs[0].is_graph_output():
                continue
            activation, reader = reader, single_consumer(reader.outputs[0])
        if reader is None or not _layer(reader) or reader.op_type != node.op_type:
            continue
        source = node.outputs[0] if activation is None else activation.outputs[0]
        if reader.inputs[0] is not source or any(v is source for v in reader.inputs[1:]):
            continue
        channels = _out_channels(node)
        if _in_channels(reader) != channels:
            continue
        full = None if bound is None else np.full(channels, bound, np.float32)
        pairs.append(EqualizePair(node, reader, activation, full))
    return pairs


def _out_channels(node: ir.Node) -> int:
    weight = constant_array(node.inputs[1])
    assert weight is not None
    found = layout(node)
    assert found is not None and found.out_axis is not None
    return int(weight.shape[found.out_axis])


def _in_channels(node: ir.Node) -> int | None:
    weight = constant_array(node.inputs[1])
    found = layout(node)
    if weight is None or found is None:
        return None
    return found.in_channels(weight.shape)


def _out_view(weight: np.ndarray, node: ir.Node) -> np.ndarray:
    """The weight as [out channels, everything else] (a copy)."""
    found = layout(node)
    assert found is not None and found.out_axis is not None
    return np.moveaxis(weight, found.out_axis, 0).reshape(weight.shape[found.out_axis], -1)


def _in_ranges(weight: np.ndarray, node: ir.Node) -> np.ndarray:
    """max |W| per input channel of `node` (grouped convolutions: channel i is input i % k of
    group i // k, k the input channels per group)."""
    found = layout(node)
    assert found is not None and found.in_axis is not None
    if node.op_type == "Gemm":
        return np.abs(np.moveaxis(weight, found.in_axis, 0)).reshape(weight.shape[found.in_axis],
                                                                     -1).max(axis=1)
    group, per_group = found.group, weight.shape[1]
    out_per_group = weight.shape[0] // group
    grouped = np.abs(weight).reshape(group, out_per_group, per_group, -1)
    return grouped.max(axis=(1, 3)).reshape(group * per_group)


def _scale_in(weight: np.ndarray, node: ir.Node, scales: np.ndarray) -> np.ndarray:
    """`weight` with input channel i multiplied by scales[i]."""
    found = layout(node)
    assert found is not None and found.in_axis is not None
    if node.op_type == "Gemm":
        shape = [1, 1]
        shape[found.in_axis] = -1
        return weight * scales.reshape(shape)
    group, per_group = found.group, weight.shape[1]
    out_per_group = weight.shape[0] // group
    grouped = weight.reshape(group, out_per_group, per_group, -1)
    scaled = grouped * scales.reshape(group, 1, per_group, 1)
    return scaled.reshape(weight.shape)


def _scale_out(weight: np.ndarray, node: ir.Node, scales: np.ndarray) -> np.ndarray:
    found = layout(node)
    assert found is not None and found.out_axis is not None
    shape = [1] * weight.ndim
    shape[found.out_axis] = -1
    return weight / scales.reshape(shape)


@register_pass("equalize", exact=True)
class CrossLayerEqualizationPass(SlimgraphPass):
    """Even out per-channel weight ranges of Conv/Gemm pairs through Relu, Clip(0, c) or nothing
    (cross-layer equalization, run after BatchNorm folding); exact.

    Args:
        max_iterations: sweeps over all pairs at most.
        tolerance: stop when no scale of a sweep differs from 1 by more than this.

    Attributes:
        ceilings: per-channel maximum (float [C]) of Clip outputs on calibration data, by value
            name (set by `equalized`; measured data, so not a recipe option): the scales of
            those pairs are limited so that the bounds stay at or above the output's per-tensor
            quantization range (`_best_top`). Still exact.

    Raises:
        UnsupportedModelError: the model has no pair to equalize (`NO_PAIRS`).
    """

    def __init__(self, *, max_iterations: int = 100, tolerance: float = 1e-4) -> None:
        super().__init__()
        self.max_iterations = max_iterations
        self.tolerance = tolerance
        self.ceilings: dict[str, np.ndarray] = {}

    def call(self, model: ir.Model) -> EqualizeResult:
        graph = model.graph
        pairs = equalize_pairs(graph)
        if not pairs:
            raise UnsupportedModelError(NO_PAIRS)
        weights: dict[int, np.ndarray] = {}
        biases: dict[int, np.ndarray | None] = {}
        for pair in pairs:
            for node in (pair.first, pair.second):
                if id(node) not in weights:
                    weight = constant_array(node.inputs[1])
                    assert weight is not None
                    weights[id(node)] = weight.astype(np.float64)
                    bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
                    biases[id(node)] = None if bias is None else bias.astype(np.float64)
        bounds = {id(p.activation): p.bound.astype(np.float64)
                  for p in pairs if p.bound is not None}
        ceilings = {id(p.activation): (p.bound.astype(np.float64),
                                       self.ceilings[p.activation.outputs[0].name or ""])
                    for p in pairs if p.bound is not None and p.activation is not None
                    and (p.activation.outputs[0].name or "") in self.ceilings}
        tops: dict[int, float] = {}  # box top T per limited Clip, fixed once sweeps converge

        def step(pair: EqualizePair, scales: np.ndarray | None) -> float:
            """Rescale `pair` by `scales` (default: the balancing ones), kept in the pair's box
            when it has one; the largest relative change."""
            first, second = weights[id(pair.first)], weights[id(pair.second)]
            if scales is None:
                r1 = np.abs(_out_view(first, pair.first)).max(axis=1)
                r2 = _in_ranges(second, pair.second)
                scales = np.ones_like(r1)
                live = (r1 > 0) & (r2 > 0)
                scales[live] = np.sqrt(r1[live] * r2[live]) / r2[live]
            key = id(pair.activation)
            if key in tops:
                scales = _boxed(scales, bounds[key], *ceilings[key], tops[key])
            weights[id(pair.first)] = _scale_out(first, pair.first, scales)
            bias = biases[id(pair.first)]
            if bias is not None:
                biases[id(pair.first)] = (bias.reshape(-1) / scales).reshape(bias.shape)
            weights[id(pair.second)] = _scale_in(second, pair.second, scales)
            if key in bounds:
                bounds[key] = bounds[key] / scales
            return float(np.max(np.abs(scales - 1.0)))

        def box(pair: EqualizePair) -> None:
            key = id(pair.activation)
            r1 = np.abs(_out_view(weights[id(pair.first)], pair.first)).max(axis=1)
            r2 = _in_ranges(weights[id(pair.second)], pair.second)
            tops[key] = _best_top(bounds[key], *ceilings[key], r1, r2)

        limited = [p for p in pairs if id(p.activation) in ceilings]
        iterations = 0
        for iterations in range(1, self.max_iterations + 1):  # noqa: B007 - reported
            moved = max(step(pair, None) for pair in pairs)
            if moved <= self.tolerance:
                if not limited or tops:
                    break
                for pair in limited:  # converged freely: now within the boxes
                    box(pair)
        for pair in limited:  # the bounds hold however the sweeps ended
            if id(pair.activation) not in tops:
                box(pair)
            step(pair, np.ones(len(bounds[id(pair.activation)])))
        names = Names(graph)
        for pair in pairs:
            for node in (pair.first, pair.second):
                array = weights.pop(id(node), None)
                if array is not None:
                    set_constant(node, 1, array.astype(np.float32), names=names)
                    bias = biases.pop(id(node))
                    if bias is not None:
                        set_constant(node, 2, bias.astype(np.float32), names=names)
            if pair.activation is not None and id(pair.activation) in bounds:
                _relu_min(graph, pair, bounds.pop(id(pair.activation)), names)
        logger.info("equalized %d pairs in %d sweeps", len(pairs), iterations)
        return EqualizeResult(model, modified=True, iterations=iterations,
                              pairs=[(p.first.name or "", p.second.name or "") for p in pairs])


def _best_top(
    bound: np.ndarray, clip: np.ndarray, ceiling: np.ndarray, r1: np.ndarray, r2: np.ndarray
) -> float:
    """The box top T for a pair through Clip(x, 0, c): its cumulative scales are kept in
    [T m_i / c, T] so that every channel's bound stays at or above the Clip output's per-tensor
    quantization range.

    Channel i of the Clip output reaches at most m_i (`ceiling`, measured in float before
    equalization); after equalization it reaches m_i / S_i and is bounded by c / S_i, S_i the
    product of the pair's scales (c / `bound`). Quantized per tensor, the output saturates at
    H = max_j m_j / S_j (minmax; lower with the histogram methods), and the Min holding the
    bounds is a no-op in the quantized model (`equalize_bounds`) when every c / S_i >= H, that is
    S_i / S_j <= c / m_j for all i, j: scales in [T m_i / c, T] meet it for any T. T is chosen
    among the breakpoints (at most 128) to maximize the paper's precision objective
    sum_i (r1_i / max r1) (r2_i / max r2) of the weight ranges after the clip (`r1`: the first
    layer's per output channel now, `r2`: the second's per input channel)."""
    now = clip / bound
    live = ceiling > 0
    floor = np.where(live, ceiling / clip, 0.0)
    candidates = np.unique(np.concatenate([now, now[live] / floor[live]]))
    if candidates.size > 128:
        candidates = np.quantile(candidates, np.linspace(0, 1, 128))
    steps = np.clip(now, candidates[:, None] * floor, candidates[:, None]) / now  # [K, C]
    first, second = r1 / steps, r2 * steps
    score = np.sum(first / first.max(axis=1, keepdims=True)
                   * second / second.max(axis=1, keepdims=True), axis=1)
    return float(candidates[int(np.argmax(score))])


def _boxed(
    scales: np.ndarray, bound: np.ndarray, clip: np.ndarray, ceiling: np.ndarray, top: float
) -> np.ndarray:
    """This sweep's `scales` with the pair's cumulative scales kept in [T m_i / c, T]
    (`_best_top`); float64 [C]."""
    now = clip / bound
    floor = np.where(ceiling > 0, ceiling / clip, 0.0)
    return np.clip(now * scales, top * floor, top) / now


def _relu_min(graph: ir.Graph, pair: EqualizePair, bound: np.ndarray, names: Names) -> None:
    """Clip(x, 0, c) -> Min(Relu(x), c / s) with the per-channel bound (channels on axis 1)."""
    clip = pair.activation
    assert clip is not None
    weight = constant_array(pair.first.inputs[1])
    assert weight is not None
    rank = 2 if pair.first.op_type == "Gemm" else weight.ndim
    shape = (-1,) if rank == 2 else (-1,) + (1,) * (rank - 2)
    relu = ir.node("Relu", [clip.inputs[0]], name=names.fresh(f"{clip.name or 'clip'}_relu"))
    relu.outputs[0].name = names.fresh(f"{clip.outputs[0].name}_relu")
    relu.outputs[0].type = clip.outputs[0].type
    relu.outputs[0].shape = clip.outputs[0].shape
    bound_value = ir.val(names.fresh(f"{clip.name or 'clip'}_bound"),
                         const_value=ir.tensor(bound.astype(np.float32).reshape(shape)))
    graph.register_initializer(bound_value)
    minimum = ir.node("Min", [relu.outputs[0], bound_value], name=clip.name)
    graph.insert_before(clip, [relu, minimum])
    out = clip.outputs[0]
    minimum.outputs[0].name, minimum.outputs[0].type, minimum.outputs[0].shape = (
        None, out.type, out.shape)
    out.replace_all_uses_with(minimum.outputs[0])
    graph.remove(clip, safe=True)
    minimum.outputs[0].name = out.name
    for key, value in clip.meta.items():
        minimum.meta[key] = value
    minimum.metadata_props.update(clip.metadata_props)


def equalized(
    model: ir.Model, feed: Mapping[str, np.ndarray],
    ceilings: Mapping[str, np.ndarray] | None = None,
) -> ir.Model:
    """A copy of the prepared float `model`, equalized and checked exact on `feed` (what
    `quantize --equalize` quantizes); `ceilings` as `CrossLayerEqualizationPass`'s.

    Raises:
        UnsupportedModelError: no pair to equalize (`NO_PAIRS`).
        VerificationError: the equalized model's outputs differ from `model`'s on `feed`.
    """
    copy = ir.from_proto(ir.to_proto(model))
    copy.meta.update(model.meta)
    step = CrossLayerEqualizationPass()
    step.ceilings = dict(ceilings or {})
    result = step(copy).model
    expected = run(create_session(model), feed)
    got = run(create_session(result), feed)
    for name, array in expected.items():
        if exact_difference(array, got[name]) is not None:
            raise VerificationError(f"cross-layer equalization changed output '{name}'")
    return result
