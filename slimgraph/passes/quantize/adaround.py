"""Learned rounding of static quantization's weights (AdaRound, AdaQuant) and 4-bit weights.

Static quantization rounds each weight to the nearest point of its grid. With `round="adaround"`
(Nagel et al., 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization") each
layer's weights are rounded up or down as a layer-wise reconstruction of the float model's output
chooses; with `round="adaquant"` (Hubara et al., 2021, "Accurate Post Training Quantization With
Small Calibration Sets") the weights, their scales and the biases are learned against the same
loss. Both run layer by layer in the graph's order on the calibration data, each layer fed the
input it gets in the quantized model (every earlier layer quantized), through the torch backend
(`runtime.torch_backend.learn_rounding`, which lowers the QDQ graph with its fake quantization).
The result is the same QDQ graph with other codes (AdaQuant: other weight scales and int32
biases), so onnxruntime runs it as it runs nearest rounding. A layer whose learned codes
reconstruct worse than nearest rounding keeps nearest rounding.

`weight_bits=4` puts the weights on a 4-bit grid: codes in [-7, 7] (symmetric, as 8-bit weights
use [-127, 127]) stored as int8, read by the same DequantizeLinear, so the graph stays in the
model's opset and onnxruntime fuses it into QLinearConv/QGemm as it does 8-bit weights
(onnxruntime 1.32 also runs INT4 DequantizeLinear, from opset 21, but not fused).

The torch loops are in `runtime/torch_backend/_rounding.py`; here: which layers, their data, and
writing the learned values into the graph.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import get_args

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.passes._kit import set_constant
from slimgraph.passes.quantize.options import Rounding
from slimgraph.passes.quantize.policy import WEIGHT_OPS, QuantPlan
from slimgraph.passes.quantize.qdq import QDQResult
from slimgraph.runtime.quant_math import sqnr_db
from slimgraph.runtime.torch_backend import LearnedWeight, RoundingLayer, bias_scale_after
from slimgraph.runtime.torch_backend import learn_rounding as _learn

__all__ = ["ROUNDINGS", "WEIGHT_BITS", "MAX_ROWS", "STEPS", "check_rounding",
           "with_weight_bits", "learn_rounding"]

logger = logging.getLogger(__name__)

ROUNDINGS: tuple[str, ...] = get_args(Rounding)
WEIGHT_BITS = (4, 8)
MAX_ROWS = 1024  # calibration rows the reconstruction uses (AdaRound's paper: 1024 images)
STEPS = 500  # optimizer steps per layer
_ACTIVATIONS = ("Relu", "Clip")
_GRIDS = {4: ir.DataType.INT4, 8: ir.DataType.INT8}


def check_rounding(weight_bits: int, rounding: str) -> None:
    """Refuse weight bits other than 4 or 8 and an unknown rounding.

    Raises:
        BadOptionError: naming the option and the choices.
    """
    if weight_bits not in WEIGHT_BITS:
        raise BadOptionError.worded("{bits} must be 4 or 8 (got {got})",
                                    bits=("weight_bits", "--weight-bits"), got=str(weight_bits))
    if rounding not in ROUNDINGS:
        raise BadOptionError.worded("unknown {round} '{got}' (choose {choices})",
                                    round=("round", "--round"), got=str(rounding),
                                    choices=", ".join(ROUNDINGS))


def with_weight_bits(plan: QuantPlan, bits: int) -> QuantPlan:
    """`plan` with its weights on a `bits`-bit signed grid (8: unchanged)."""
    if bits == 8:
        return plan
    grid = _GRIDS[bits]
    weights = tuple(replace(w, spec=replace(w.spec, dtype=grid)) for w in plan.weights)
    return replace(plan, weights=weights)


def learn_rounding(
    float_model: ir.Model, result: QDQResult, batches: Iterable[Mapping[str, np.ndarray]],
    method: str, *, steps: int | None = None, max_rows: int = MAX_ROWS, seed: int = 0,
) -> ir.Model:
    """AdaRound or AdaQuant on the QDQ model `result.model` (edited and returned).

    Args:
        float_model: the float model the QDQ model was built from.
        result: `QDQPass`'s result (its `weight_sqnr_db` is updated).
        batches: the calibration batches (the first `max_rows` rows are used).
        method: "adaround" or "adaquant".
        steps: optimizer steps per layer (default `STEPS`).
        max_rows: calibration rows used.
        seed: seeds the optimization's batches.

    Returns:
        The QDQ model with the learned codes (scales and biases) in its initializers.

    Raises:
        MissingExtraError: torch is not installed.
        UnsupportedModelError: the torch backend cannot lower the model.
    """
    model = result.model
    layers, float_weights = _layers(float_model, model, result)
    if not layers:
        logger.warning("%s: no quantized Conv, Gemm or MatMul weight to round", method)
        return model
    feeds = _rows(batches, max_rows)
    learned = _learn(float_model, model, layers, feeds, method=method,
                     steps=STEPS if steps is None else steps, seed=seed)
    for layer in layers:
        _write(model, layer, learned[layer.node])
        dequantized = learned[layer.node].codes * _broadcast(learned[layer.node].scale,
                                                              layer.weight, layer.axis)
        noise = float(np.sum((layer.weight.astype(np.float64) - dequantized) ** 2))
        result.weight_sqnr_db[float_weights[layer.node]] = sqnr_db(
            float(np.sum(layer.weight.astype(np.float64) ** 2)), noise)
    kept = sum(learned[layer.node].error < learned[layer.node].nearest_error for layer in layers)
    logger.info("%s: %d of %d layers rounded better than nearest", method, kept, len(layers))
    return model


def _rows(batches: Iterable[Mapping[str, np.ndarray]], limit: int) -> dict[str, np.ndarray]:
    """The first `limit` calibration rows, stacked by input name."""
    parts: dict[str, list[np.ndarray]] = {}
    count = 0
    for batch in batches:
        for name, array in batch.items():
            parts.setdefault(name, []).append(np.asarray(array))
        count += len(next(iter(batch.values())))
        if count >= limit:
            break
    return {name: np.concatenate(arrays)[:limit] for name, arrays in parts.items()}


def _dequantizer(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear producing `value` from a constant read by it alone, else None."""
    if value is None or len(value.uses()) != 1:
        return None
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear":
        return None
    codes, scale = node.inputs[0], node.inputs[1]
    if codes is None or codes.const_value is None or len(codes.uses()) != 1:
        return None
    if scale is None or scale.const_value is None or len(scale.uses()) != 1:
        return None
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_point is not None and (zero_point.const_value is None
                                   or np.any(zero_point.const_value.numpy())):
        return None  # codes around a zero point: the weights here are symmetric
    return node


def _layers(
    float_model: ir.Model, model: ir.Model, result: QDQResult
) -> tuple[list[RoundingLayer], dict[str, str]]:
    """The QDQ model's layers whose weight rounding can be learned, in graph order, and each
    one's float weight name."""
    float_nodes = {node.name: node for node in float_model.graph}
    float_values = {v.name for node in float_model.graph for v in node.outputs}
    layers: list[RoundingLayer] = []
    names: dict[str, str] = {}
    for node in model.graph:
        if node.op_type not in WEIGHT_OPS or len(node.inputs) < 2:
            continue
        weight_dq = _dequantizer(node.inputs[1])
        original = float_nodes.get(node.name or "")
        if weight_dq is None or original is None or node.inputs[0] is None:
            continue
        float_weight = original.inputs[1]
        if float_weight is None or float_weight.const_value is None:
            continue
        params = result.weights.get(float_weight.name or "")
        if params is None:
            continue
        bias = _bias(node)
        if bias is None:
            logger.info("%s: bias not a constant; rounding left nearest", node.name)
            continue
        bias_dq, bias_array = bias
        output = node.outputs[0]
        users = list(output.uses())
        activation = None
        if len(users) == 1 and users[0].node.op_type in _ACTIVATIONS and users[0].idx == 0:
            activation = users[0].node
        target = activation.outputs[0] if activation is not None else output
        if target.name not in float_values:
            continue
        qmin, qmax = params.spec.qrange
        assert weight_dq.inputs[1] is not None and weight_dq.inputs[0] is not None
        scale = weight_dq.inputs[1].const_value
        assert scale is not None
        layers.append(RoundingLayer(
            node=node.name or "", input=node.inputs[0].name or "",
            weight_value=_name(node.inputs[1]),
            bias_value=None if bias_dq is None else bias_dq.outputs[0].name,
            output=output.name or "", codes=weight_dq.inputs[0].name or "",
            scale_name=weight_dq.inputs[1].name or "",
            bias_codes=None if bias_dq is None else _name(bias_dq.inputs[0]),
            bias_scale=None if bias_dq is None else _name(bias_dq.inputs[1]),
            weight=float_weight.const_value.numpy().astype(np.float32),
            scale=scale.numpy().astype(np.float32),
            axis=weight_dq.attributes.get_int("axis", 1), qmin=qmin, qmax=qmax,
            bias=bias_array, activation=None if activation is None else activation.name,
            target=target.name or "",
        ))
        names[node.name or ""] = float_weight.name or ""
    return layers, names


def _bias(node: ir.Node) -> tuple[ir.Node | None, np.ndarray | None] | None:
    """The int32 bias's DequantizeLinear and its dequantized value; (None, None) without a
    quantized bias (none, or a float constant the layer keeps); None for a bias computed at run
    time (the layer keeps nearest rounding)."""
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if value is None or value.const_value is not None:
        return None, None
    dq = _dequantizer(value)
    if dq is None:
        return None
    codes, scale = dq.inputs[0], dq.inputs[1]
    assert codes is not None and codes.const_value is not None
    assert scale is not None and scale.const_value is not None
    array = codes.const_value.numpy().astype(np.float64) * scale.const_value.numpy()
    return dq, array.astype(np.float32)


def _name(value: ir.Value | None) -> str:
    return "" if value is None else value.name or ""


def _broadcast(scale: np.ndarray, weight: np.ndarray, axis: int) -> np.ndarray:
    scale = np.asarray(scale, np.float64)
    if scale.size == 1:
        return scale.reshape(())
    shape = [1] * weight.ndim
    shape[axis % weight.ndim] = -1
    return scale.reshape(shape)


def _write(model: ir.Model, layer: RoundingLayer, learned: LearnedWeight) -> None:
    """Put a layer's learned codes (AdaQuant: scale and int32 bias too) into its initializers."""
    values = model.graph.initializers
    codes = values[layer.codes]
    (reader,) = [use.node for use in codes.uses()]
    assert codes.const_value is not None
    set_constant(reader, 0, learned.codes.astype(codes.const_value.dtype.numpy()))
    if np.array_equal(learned.scale, layer.scale):
        return
    set_constant(reader, 1, learned.scale)
    if learned.bias is None or layer.bias_codes is None or layer.bias_scale is None:
        return
    bias_scale = values[layer.bias_scale].const_value
    assert bias_scale is not None
    new_scale = bias_scale_after(layer.scale, learned.scale, bias_scale.numpy())
    (bias_reader,) = [use.node for use in values[layer.bias_codes].uses()]
    bound = 2**31 - 1
    bias_codes = np.clip(np.rint(learned.bias.astype(np.float64)
                                 / np.asarray(new_scale, np.float64).reshape(-1)), -bound, bound)
    set_constant(bias_reader, 0, bias_codes.astype(np.int32))
    set_constant(bias_reader, 1, new_scale)
