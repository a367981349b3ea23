"""AWQ: activation-aware per-channel scales before weight-only quantization, folded exactly.

Lin, Tang, Tang, Yang, Dang, Gan & Han 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration". A few input channels of a MatMul carry much larger activations
than the rest; their weight rows matter most, and rounding them costs the most output error.
Scaling input channel j of the weight up by s_j and the activation down by the same factor,

    X W = (X diag(s)^-1) (diag(s) W),

leaves the float product unchanged and gives the salient rows a finer grid relative to their
block. AWQ takes s = mean|x|^alpha (per channel over the calibration data, normalized to
geometric mean 1) and searches alpha on a grid of `grid` + 1 values in [0, 1] for the lowest
output error ||X W - (X / s) Q(s W)||^2 over every MatMul that reads X (the Q, K, V projections
together, the gate and up projections together), on a sample of calibration rows; alpha = 0
(s = 1, round-to-nearest) is on the grid, so the error on that sample never rises.

The division by s is folded into the op that makes X when X feeds only these MatMuls, so the
deployed graph has no extra node: a normalization's gain and bias (LayerNormalization,
SimplifiedLayerNormalization/SkipLayerNormalization, or a decomposed RMSNorm's `Mul` by its
constant gain), a MatMul's output columns (and its bias), or, through a `Mul` of two
activations (SwiGLU's `act(gate) * up`), one of those behind either operand. Where nothing can
take it (X is also a residual, or a graph input), a `Mul(X, 1/s)` is inserted in front of the
MatMuls only. Every fold is exact in float. Activations are grouped and processed from the
output backwards, so when a fold scales a MatMul's output columns (the up projection, for the
down projection's scales), that MatMul's own search already sees its final columns.

Clipping (`clip`, AWQ's second step): for every block of every weight, the range is shrunk by
the ratio in 1, 1 - 0.5/`grid`, ..., 0.5 whose quantized block gives the lowest output error on
the sampled (scaled) inputs; ratio 1 (min-max) is a candidate.

Exactness: the scaling is exact in float; the quantization after it is approximate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes._kit import Names, add_initializer, set_constant, traced_constant
from slimgraph.passes.quantize._inputs import InputStats
from slimgraph.passes.transformer.smoothing import norm_params
from slimgraph.runtime.quant_math import (
    QuantizedTensor,
    QuantSpec,
    block_params,
    quantize_blocks,
    quantize_tensor,
    weight_blocks,
)

__all__ = ["AWQOptions", "AWQTarget", "AWQGroup", "AWQResult", "awq_scale", "SAMPLE_ROWS"]

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 1024  # calibration rows kept per activation to score scales and clipping on
_MIN_SCALE = 1e-4


@dataclass(frozen=True, kw_only=True)
class AWQOptions:
    """AWQ's settings.

    Attributes:
        grid: alpha steps in [0, 1] (grid + 1 candidates) and clipping ratios.
        clip: search a clipping ratio per block after scaling.
        max_shrink: the smallest clipping ratio is 1 - max_shrink.
    """

    grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5


@dataclass(frozen=True, eq=False)
class AWQTarget:
    """A MatMul to quantize: the node, its weight [K, N] as it will be quantized, its spec."""

    node: ir.Node
    weight: np.ndarray
    spec: QuantSpec


@dataclass(frozen=True)
class AWQGroup:
    """One activation AWQ scaled.

    Attributes:
        value: the activation's name.
        nodes: the MatMuls reading it.
        alpha: the exponent chosen (0: no scaling).
        fold: where 1/s went ("gain of LayerNormalization 'ln'", "inserted Mul", ...).
        error_rtn, error_awq: the output error (sum of squares over the sample) of
            round-to-nearest and of the chosen scales.
    """

    value: str
    nodes: tuple[str, ...]
    alpha: float
    fold: str
    error_rtn: float
    error_awq: float


@dataclass
class AWQResult:
    """Scaled weights and their quantization, by node, and what was done per activation."""

    weights: dict[ir.Node, np.ndarray] = field(default_factory=dict)
    quantized: dict[ir.Node, QuantizedTensor] = field(default_factory=dict)
    groups: list[AWQGroup] = field(default_factory=list)


def _dequantized(weight: np.ndarray, spec: QuantSpec) -> np.ndarray:
    return quantize_tensor(weight, spec).dequantize()[: weight.shape[0]]


def _search(
    targets: Sequence[AWQTarget], weights: Mapping[ir.Node, np.ndarray], stats: InputStats,
    options: AWQOptions,
) -> tuple[np.ndarray, float, float, float]:
    """(s, alpha, error at alpha 0, error at the chosen alpha) for one activation."""
    assert stats.sample is not None
    x = stats.sample.astype(np.float64)
    mean = np.maximum(stats.mean_abs, _MIN_SCALE)
    references = [x @ weights[t.node] for t in targets]
    best: tuple[float, float, np.ndarray] | None = None
    baseline = np.inf
    for step in range(options.grid + 1):
        alpha = step / options.grid
        s = np.power(mean, alpha)
        s = s / np.sqrt(s.max() * s.min())
        error = 0.0
        for target, reference in zip(targets, references, strict=True):
            scaled = weights[target.node] * s[:, None]
            approx = (x / s) @ _dequantized(scaled.astype(np.float32), target.spec)
            error += float(((approx - reference) ** 2).sum())
        if step == 0:
            baseline = error
        if best is None or error < best[0]:
            best = (error, alpha, s)
    assert best is not None
    return best[2], best[1], baseline, best[0]


def awq_scale(
    graph: ir.Graph,
    targets: Sequence[AWQTarget],
    stats: Mapping[str, InputStats],
    options: AWQOptions | None = None,
) -> AWQResult:
    """Search AWQ scales for the targets' activations, fold them into `graph` (in place, exact
    in float) and quantize the scaled weights (with clipping when `options.clip`).

    Args:
        graph: the graph holding the targets (edited: gains, producer weights, inserted Muls).
        targets: the MatMuls to quantize, with their float weights and specs.
        stats: `InputStats` (mean |x| and a row sample) by activation name.
        options: grid, clipping.

    Returns:
        The scaled weights and their `QuantizedTensor`s by node (targets whose activation has
        no statistics keep their weight and get none), and one `AWQGroup` per activation.
    """
    options = options or AWQOptions()
    result = AWQResult(weights={t.node: t.weight.astype(np.float64) for t in targets})
    names = Names(graph)
    order = {id(node): index for index, node in enumerate(graph)}
    groups: dict[str, list[AWQTarget]] = {}
    for target in targets:
        name = _input_name(target.node)
        if name is not None and name in stats:
            groups.setdefault(name, []).append(target)
    scales: dict[str, np.ndarray] = {}
    # from the output backwards: a fold into a producer's columns precedes that producer's search
    for name, members in sorted(groups.items(),
                                key=lambda item: -min(order[id(t.node)] for t in item[1])):
        s, alpha, error_rtn, error_awq = _search(members, result.weights, stats[name], options)
        value = members[0].node.inputs[0]
        assert value is not None
        fold = "none (alpha 0)"
        if alpha > 0:
            for target in members:
                result.weights[target.node] = result.weights[target.node] * s[:, None]
            fold = _fold(graph, value, [t.node for t in members], 1.0 / s, result.weights, names)
        scales[name] = s
        result.groups.append(AWQGroup(name, tuple(t.node.name or "" for t in members), alpha,
                                      fold, error_rtn, error_awq))
        logger.info("awq: %s alpha %.2f (error %.4g -> %.4g), 1/s into %s", name, alpha,
                    error_rtn, error_awq, fold)
    for target in targets:
        weight = result.weights[target.node].astype(np.float32)
        name = _input_name(target.node)
        if name is None or name not in scales:
            continue
        sample = stats[name].sample
        if options.clip and sample is not None and target.spec.block_size:
            x = sample.astype(np.float64) / scales[name]
            result.quantized[target.node] = clipped(weight, x, target.spec, options)
        else:
            result.quantized[target.node] = quantize_tensor(weight, target.spec)
    return result


def _input_name(node: ir.Node) -> str | None:
    value = node.inputs[0]
    return None if value is None else value.name


def clipped(
    weight: np.ndarray, x: np.ndarray, spec: QuantSpec, options: AWQOptions
) -> QuantizedTensor:
    """Block-wise codes of `weight` [K, N] whose range per block and column is min-max shrunk
    by the ratio with the lowest output error on the inputs `x` [rows, K]."""
    k = weight.shape[0]
    size = spec.block_size
    blocks = weight_blocks(weight.astype(np.float64), size)  # [blocks, size, N]
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    padded = np.zeros((len(x), blocks.shape[0] * size))
    padded[:, :k] = x
    xb = padded.reshape(len(x), blocks.shape[0], size).transpose(1, 0, 2)  # [blocks, rows, size]
    best_error = np.full(lo.shape, np.inf)
    best_lo, best_hi = lo.copy(), hi.copy()
    steps = options.grid
    for step in range(steps + 1):
        ratio = 1.0 - options.max_shrink * step / steps
        scale, zero = block_params(lo * ratio, hi * ratio, spec)
        q = quantize_blocks(weight, scale, zero, spec).dequantize().astype(np.float64)
        delta = blocks - q.reshape(blocks.shape)
        error = np.stack([((xb[b] @ delta[b]) ** 2).sum(axis=0) for b in range(len(xb))])
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_lo = np.where(better, lo * ratio, best_lo)
        best_hi = np.where(better, hi * ratio, best_hi)
    scale, zero = block_params(best_lo, best_hi, spec)
    return quantize_blocks(weight, scale, zero, spec)


# ----------------------------------------------------------------------------- exact folds

Edit = Callable[[], None]


def _fold(
    graph: ir.Graph, value: ir.Value, readers: list[ir.Node], inverse: np.ndarray,
    weights: dict[ir.Node, np.ndarray], names: Names,
) -> str:
    """Multiply `value`'s channels (last axis) by `inverse` for `readers`, exactly: folded into
    its producer where the readers are its only consumers, else through an inserted Mul.
    Returns where it went."""
    only_readers = not value.is_graph_output() and {id(u.node) for u in value.uses()} == {
        id(n) for n in readers} and all(u.idx == 0 for u in value.uses())
    if only_readers:
        plan = _fold_plan(value, inverse, weights, depth=0)
        if plan is not None:
            edits, where = plan
            for edit in edits:
                edit()
            return where
    mul = ir.node("Mul", [value, add_initializer(
        graph, names.fresh(f"{value.name}_awq_inv"), inverse.astype(np.float32), names=None)],
        name=names.fresh(f"{value.name}_awq"))
    mul.outputs[0].name = names.fresh(f"{value.name}_awq_scaled")
    if value.dtype is not None:
        mul.outputs[0].dtype = value.dtype
    mul.outputs[0].shape = value.shape
    first = min(readers, key=lambda n: list(graph).index(n))
    graph.insert_before(first, mul)
    for reader in readers:
        reader.replace_input_with(0, mul.outputs[0])
    return "inserted Mul"


def _single_reader(value: ir.Value) -> bool:
    return not value.is_graph_output() and len(value.uses()) == 1


def _channel_constant(value: ir.Value | None, channels: int) -> np.ndarray | None:
    """A constant that scales the last axis per channel ([C] or [1, ..., C]), else None."""
    array = traced_constant(value) if value is not None else None
    if array is None or array.dtype.kind != "f" or not array.ndim:
        return None
    if array.shape[-1] != channels or any(d != 1 for d in array.shape[:-1]):
        return None
    return array


def _scale_input(node: ir.Node, index: int, array: np.ndarray) -> Edit:
    def edit() -> None:
        set_constant(node, index, array.astype(np.float32 if array.dtype == np.float64
                                               else array.dtype))
    return edit


def _fold_plan(
    value: ir.Value, inverse: np.ndarray, weights: dict[ir.Node, np.ndarray], depth: int
) -> tuple[list[Edit], str] | None:
    """The edits that multiply `value`'s last-axis channels by `inverse` at its producer
    (nothing else reads `value`), and where; None when no exact fold exists."""
    node = value.producer()
    channels = len(inverse)
    if node is None or depth > 4:
        return None
    params = norm_params(node)
    if params is not None and value is node.outputs[0]:
        gain_index, bias_index = params
        edits = []
        for index in (gain_index, bias_index):
            if index is None:
                continue
            array = _channel_constant(node.inputs[index], channels)
            if array is None:
                return None
            edits.append(_scale_input(node, index, array * inverse))
        return edits, f"gain of {node.op_type} '{node.name}'"
    if is_onnx_op(node, "MatMul"):
        weight = weights.get(node)
        if weight is None:
            weight = traced_constant(node.inputs[1])
        if weight is None or weight.ndim != 2 or weight.shape[1] != channels:
            return None
        if node in weights:
            def edit() -> None:
                weights[node] = weights[node] * inverse[None, :]
        else:
            edit = _scale_input(node, 1, weight * inverse[None, :])
        return [edit], f"output columns of MatMul '{node.name}'"
    if is_onnx_op(node, "Add", "Mul"):
        constants = [_channel_constant(v, channels) for v in node.inputs]
        scalars = [traced_constant(v) if v is not None else None for v in node.inputs]
        if is_onnx_op(node, "Mul"):
            for index, array in enumerate(constants):
                if array is not None:
                    return [_scale_input(node, index, array * inverse)], (
                        f"constant of Mul '{node.name}'")
            for index, operand in enumerate(node.inputs):  # a scalar factor: fold behind it,
                other = node.inputs[1 - index]             # or into either activation
                if operand is None or other is None or not _single_reader(operand):
                    continue
                factor = scalars[1 - index]
                if factor is not None and factor.size != 1:
                    continue
                inner = _fold_plan(operand, inverse, weights, depth + 1)
                if inner is not None:
                    return inner
            return None
        # Add: a bias (per channel constant) after a foldable activation
        for index, array in enumerate(constants):
            operand = node.inputs[1 - index]
            if array is None or operand is None or not _single_reader(operand):
                continue
            inner = _fold_plan(operand, inverse, weights, depth + 1)
            if inner is not None:
                return [*inner[0], _scale_input(node, index, array * inverse)], inner[1]
    return None
