"""Materialize a `QuantPlan`: QuantizeLinear/DequantizeLinear pairs from calibrated ranges.

Activations get a Q->DQ pair right after the value (every consumer reads the DQ output; a graph
output keeps the float value). Weights become int8 initializers read through a DequantizeLinear
(per-channel `axis` where the plan says so), biases int32 with scale s_input * s_weight. This is
the QDQ format onnxruntime fuses into QLinearConv, QLinearMatMul, QLinearAdd, QGemm, ...
A weight's or bias's DequantizeLinear omits its zero point when it is all zero (symmetric
signed: the ONNX default): 5 bytes per output channel that would otherwise be stored as zeros.

The pass is approximate (`exact = False`): quantization changes outputs; `report.py` measures by
how much.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadDataError, UnsupportedModelError
from slimgraph.ir import copy_model
from slimgraph.passes._kit import Names, add_initializer
from slimgraph.passes.base import SlimgraphFunctionalPass, SlimgraphPassResult
from slimgraph.passes.quantize.policy import BiasAnnotation, QuantPlan, is_global_mean
from slimgraph.runtime.histogram import TensorStats, calibrated_range
from slimgraph.runtime.quant_math import (
    QuantSpec,
    dequantize_values,
    quant_params,
    quantize_values,
    sqnr_db,
    valid_scale,
)

__all__ = [
    "MIN_OPSET",
    "QParams",
    "activation_params",
    "weight_params",
    "QDQPass",
    "QDQResult",
    "DQ_SUFFIX",
]

logger = logging.getLogger(__name__)

DQ_SUFFIX = "_dq"
MIN_OPSET = _MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (axis)
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class QParams:
    """Scale (float32) and zero point of one tensor; arrays are 1-D when per-channel."""

    scale: np.ndarray
    zero_point: np.ndarray
    spec: QuantSpec


def activation_params(
    plan: QuantPlan,
    stats: Mapping[str, TensorStats],
    method: str,
    *,
    percentile: float = 99.99,
    bounds: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, QParams]:
    """Scales and zero points of every planned activation; a scale group shares one range.

    `bounds` (value name -> (low, high)) narrows a calibrated range to at most those bounds
    (zero stays inside): where the calibration data's tails are known to be wider than the
    model's inputs give (zero-shot rows; `runtime.torch_backend.batchnorm_bounds`).

    Raises:
        BadDataError: a calibrated range that is not finite (named).
    """
    params: dict[str, QParams] = {}
    for root, members in plan.groups().items():
        spec = next(a.spec for a in plan.activations if a.value == root)
        qmin, qmax = spec.qrange
        low, high = 0.0, 0.0
        for name in members:
            if name not in stats or stats[name].count == 0:
                continue
            rmin, rmax = calibrated_range(
                stats[name], method, qmin=qmin, qmax=qmax, percentile=percentile
            )
            if not (np.isfinite(rmin) and np.isfinite(rmax)):
                raise BadDataError(f"tensor '{name}' has a non-finite calibrated range")
            if bounds is not None and name in bounds:
                lowest, highest = bounds[name]
                rmin, rmax = max(rmin, min(lowest, 0.0)), min(rmax, max(highest, 0.0))
            low, high = min(low, rmin), max(high, rmax)
        scale, zero_point = quant_params(low, high, qmin=qmin, qmax=qmax, symmetric=spec.symmetric)
        for name in members:
            params[name] = QParams(scale, zero_point, spec)
    return params


def weight_params(array: np.ndarray, spec: QuantSpec) -> QParams:
    """Symmetric scales of a weight, per channel along `spec.axis` or per tensor."""
    if not np.isfinite(array).all():
        raise BadDataError("contains NaN or Inf")
    qmin, qmax = spec.qrange
    if spec.axis is None:
        bound = np.abs(array).max(initial=0.0)
    else:
        axes = tuple(i for i in range(array.ndim) if i != spec.axis % array.ndim)
        bound = np.abs(array).max(axis=axes, initial=0.0)
    scale, zero_point = quant_params(-bound, bound, qmin=qmin, qmax=qmax, symmetric=True)
    return QParams(scale, zero_point, spec)


def quantize_array(array: np.ndarray, params: QParams) -> np.ndarray:
    """round(x / scale) + zero_point, saturated, in the spec's integer type."""
    scale, zero_point = _broadcast(params, array.ndim)
    return quantize_values(array, scale, zero_point, params.spec)


def _broadcast(params: QParams, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point shaped to broadcast against a rank-`rank` tensor."""
    scale, zero_point = params.scale, params.zero_point
    if params.spec.axis is not None and scale.ndim == 1:
        shape = [1] * rank
        shape[params.spec.axis % rank] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return scale, zero_point


@dataclass
class QDQResult(SlimgraphPassResult):
    """The QDQ model plus, per quantized tensor, the parameters used (for the report)."""

    activations: dict[str, QParams] = field(default_factory=dict)
    weights: dict[str, QParams] = field(default_factory=dict)
    weight_sqnr_db: dict[str, float] = field(default_factory=dict)
    dequantized: dict[str, str] = field(default_factory=dict)  # activation -> its DQ output


class QDQPass(SlimgraphFunctionalPass):
    """Insert QuantizeLinear/DequantizeLinear pairs as `plan` says (approximate).

    Args:
        plan: from `policy.annotate`.
        activations: from `activation_params`.
    """

    exact = False

    def __init__(self, plan: QuantPlan, activations: Mapping[str, QParams]) -> None:
        super().__init__()
        self.plan = plan
        self.activations = dict(activations)

    def call(self, model: ir.Model) -> QDQResult:
        model = copy_model(model)
        graph = model.graph
        _ensure_opset(model)
        names = Names(graph)
        nodes = {node.name: node for node in graph}
        values = {v.name: v for v in graph.inputs}
        values.update({v.name: v for n in graph for v in n.outputs})
        result = QDQResult(model, modified=True, skipped=list(self.plan.skipped))
        quantized_nodes = set(self.plan.nodes)
        # decided before Q/DQ are inserted (the DequantizeLinear outputs carry no shapes)
        global_means = [nodes[n] for n in self.plan.nodes
                        if n in nodes and is_global_mean(nodes[n])]

        # Weights first: biases need their (possibly raised) scales.
        bias_by_weight: dict[str, list[BiasAnnotation]] = {}
        for bias in self.plan.biases:
            bias_by_weight.setdefault(bias.weight, []).append(bias)
        for annotation in self.plan.weights:
            array = _initializer_array(graph, annotation.value).astype(np.float32)
            try:
                params = weight_params(array, annotation.spec)
            except BadDataError as error:
                raise BadDataError(f"weight '{annotation.value}' {error}") from None
            params = _fit_biases(params, bias_by_weight.get(annotation.value, []), graph,
                                 self.activations)
            quantized = quantize_array(array, params)
            dequantized = _dequantize(quantized, params)
            result.weights[annotation.value] = params
            result.weight_sqnr_db[annotation.value] = _weight_sqnr(array, dequantized)
            q_init = add_initializer(graph, f"{annotation.value}_quantized", quantized, names=names)
            scale_init, zp_init = _qparam_initializers(graph, names, annotation.value, params,
                                                       dequantize_only=True)
            for node_name, index in annotation.uses:
                node = nodes[node_name]
                if node.op_type == "Gather" and index == 0 and params.spec.axis is None:
                    _gather_then_dequantize(graph, names, node, q_init, scale_init, zp_init)
                    continue
                dq = _dq_node(names, q_init, scale_init, zp_init, params.spec.axis,
                              f"{annotation.value}{DQ_SUFFIX}")
                graph.append(dq)
                node.replace_input_with(index, dq.outputs[0])
            _drop_if_unused(graph, annotation.value)

        for bias in self.plan.biases:
            node = nodes[bias.node]
            array = _initializer_array(graph, bias.value).astype(np.float32)
            act = self.activations[bias.activation]
            weight = result.weights[bias.weight]
            scale = (act.scale.astype(np.float64) * weight.scale.astype(np.float64))
            scale = valid_scale(scale)
            axis = 0 if scale.ndim == 1 and scale.size > 1 else None
            if axis is None:
                scale = scale.reshape(()) if scale.size == 1 else scale
            params = QParams(scale, np.zeros(scale.shape, np.int32), QuantSpec(
                ir.DataType.INT32, True, axis))
            quantized = quantize_array(array, params)
            q_init = add_initializer(graph, f"{bias.value}_quantized", quantized, names=names)
            scale_init, zp_init = _qparam_initializers(graph, names, bias.value, params,
                                                       dequantize_only=True)
            dq = _dq_node(names, q_init, scale_init, zp_init, axis, f"{bias.value}{DQ_SUFFIX}")
            graph.append(dq)
            node.replace_input_with(bias.index, dq.outputs[0])
            _drop_if_unused(graph, bias.value)

        for activation in self.plan.activations:
            value = values[activation.value]
            params = self.activations[activation.value]
            result.activations[activation.value] = params
            scale_init, zp_init = _qparam_initializers(graph, names, activation.value, params)
            q = ir.node("QuantizeLinear", [value, scale_init, zp_init])
            q.outputs[0].name = q.name = names.fresh(f"{activation.value}_quantized")
            dq = _dq_node(names, q.outputs[0], scale_init, zp_init, None,
                          f"{activation.value}{DQ_SUFFIX}")
            result.dequantized[activation.value] = dq.outputs[0].name or ""
            uses = [u for u in value.uses() if u.node is not q]
            if activation.float_producer:
                uses = [u for u in uses if u.node.name in quantized_nodes]
            for use in uses:
                use.node.replace_input_with(use.idx, dq.outputs[0])
            graph.append(q)
            graph.append(dq)
        for node in global_means:  # run as QLinearGlobalAveragePool
            _as_global_pool(graph, node)
        graph.sort()
        return result


def _as_global_pool(graph: ir.Graph, node: ir.Node) -> None:
    """Replace a ReduceMean over all spatial axes (`policy.is_global_mean`) by GlobalAveragePool,
    the same values; the pool keeps the node's name, metadata and output name."""
    pool = ir.node("GlobalAveragePool", [node.inputs[0]], name=node.name)
    pool.metadata_props.update(node.metadata_props)
    graph.insert_before(node, pool)
    old, new = node.outputs[0], pool.outputs[0]
    name = old.name
    new.shape = old.shape
    if old.dtype is not None:
        new.dtype = old.dtype
    axes = node.inputs[1] if len(node.inputs) > 1 else None
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    new.name = name
    if axes is not None and axes.name:
        _drop_if_unused(graph, axes.name)


def _ensure_opset(model: ir.Model) -> None:
    opset = model.opset_imports.get("", 0)
    if opset < _MIN_OPSET:  # `api.prepare` converts older models first
        raise UnsupportedModelError(
            f"QDQ with per-channel scales needs opset {_MIN_OPSET} or newer; the model has {opset}"
        )


def _initializer_array(graph: ir.Graph, name: str) -> np.ndarray:
    tensor = graph.initializers[name].const_value
    assert tensor is not None  # an initializer always has its tensor
    return tensor.numpy()


def _qparam_initializers(
    graph: ir.Graph, names: Names, base: str, params: QParams, *, dequantize_only: bool = False
) -> tuple[ir.Value, ir.Value | None]:
    """Scale and zero-point initializers. With `dequantize_only` (a constant read only through
    DequantizeLinear, whose integer type comes from the data), an all-zero zero point of a
    signed type is left out: ONNX defines a missing one as 0."""
    scale = np.asarray(params.scale, dtype=np.float32)
    zero_point = np.asarray(params.zero_point).astype(params.spec.dtype.numpy())
    if params.spec.axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    scale_init = add_initializer(graph, f"{base}_scale", scale, names=names)
    if dequantize_only and params.spec.dtype.is_signed() and not zero_point.any():
        return scale_init, None
    return scale_init, add_initializer(graph, f"{base}_zero_point", zero_point, names=names)


def _dq_node(
    names: Names, source: ir.Value, scale: ir.Value, zero_point: ir.Value | None,
    axis: int | None, output: str,
) -> ir.Node:
    attributes = {"axis": axis} if axis is not None else {}
    inputs = [source, scale] if zero_point is None else [source, scale, zero_point]
    node = ir.node("DequantizeLinear", inputs, attributes=attributes)
    node.outputs[0].name = node.name = names.fresh(output)  # nodes and values: two namespaces
    return node


def _gather_then_dequantize(
    graph: ir.Graph, names: Names, gather: ir.Node, table: ir.Value, scale: ir.Value,
    zero_point: ir.Value | None,
) -> None:
    """Gather int8 rows, then dequantize only those (not the whole table on every run)."""
    rows = gather.outputs[0]
    users = list(rows.uses())
    gather.replace_input_with(0, table)
    dq = _dq_node(names, rows, scale, zero_point, None, f"{rows.name}{DQ_SUFFIX}")
    dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, rows.shape
    for use in users:
        use.node.replace_input_with(use.idx, dq.outputs[0])
    # A new type object: a clone shares its values' types with the original model, and
    # setting `dtype` would change the float model too.
    rows.type = ir.TensorType(ir.DataType.INT8)
    graph.append(dq)


def _drop_if_unused(graph: ir.Graph, name: str) -> None:
    value = graph.initializers.get(name)
    if value is not None and not value.uses() and not value.is_graph_output():
        if value.is_graph_input():
            graph.inputs.remove(value)
        del graph.initializers[name]


def _dequantize(quantized: np.ndarray, params: QParams) -> np.ndarray:
    scale, zero_point = _broadcast(params, quantized.ndim)
    return dequantize_values(quantized, scale, zero_point)


def _weight_sqnr(reference: np.ndarray, approx: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    return sqnr_db(float(np.sum(reference**2)), float(np.sum((reference - approx) ** 2)))


def _fit_biases(params: QParams, biases: list[BiasAnnotation], graph: ir.Graph,
                activations: Mapping[str, QParams]) -> QParams:
    """Raise weight scales where an int32 bias with scale s_in * s_w would overflow."""
    scale = params.scale.astype(np.float64)
    for bias in biases:
        if bias.activation not in activations:
            continue
        b = np.abs(_initializer_array(graph, bias.value).astype(np.float64))
        s_in = float(np.asarray(activations[bias.activation].scale))
        needed = b / (s_in * (_INT32_MAX // 2))
        if scale.ndim == 0:
            needed = needed.max(initial=0.0)
        scale = np.maximum(scale, needed)
    return QParams(scale.astype(np.float32), params.zero_point, params.spec)
