"""Empirical bias correction: the mean output shift quantization gives each layer, taken back.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction"
(section 4.2). Quantizing a layer's weights W to W~ shifts the mean of its output by
E[(W~ - W) x], per output channel; that shift passes through the next layers as a bias error.
Here it is measured on the calibration data (the paper's empirical variant), for every quantized
Conv and Gemm at once: a probe copy of the QDQ model computes, beside each such layer, the same
layer with its float weight and bias on the same (quantized) input, and the per-channel mean of
the difference over the batch and spatial positions is the layer's own shift, given the input it
really receives. The float model's biases are lowered by these shifts and quantized again.

The analytical variant (E[x] from the preceding BatchNormalization's beta and gamma through the
ReLU) is not done: quantization's `prepare` folds BatchNorm into the convolutions before anything
is planned, and many exporters fold it already, so the statistics are not there to read; the
calibration data that static quantization needs gives the empirical shift directly.
Approximate (it changes the quantized model's outputs, towards the float model's on average).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes._kit import Names, add_initializer, constant_array, set_constant
from slimgraph.runtime.session import create_session, run

__all__ = ["NO_CALIBRATION", "layer_shifts", "corrected_biases"]

logger = logging.getLogger(__name__)

# A `BadOptionError.worded` template (terms: bias, calib).
NO_CALIBRATION = ("{bias} needs calibration data ({calib}): it measures each quantized layer's "
                  "output shift on it")

_SHIFT = "_bias_shift"


def _quantized_layers(quantized: ir.Model, float_model: ir.Model) -> list[tuple[ir.Node,
                                                                                   ir.Node]]:
    """(quantized node, float node) for each Conv/Gemm whose weight is dequantized int8."""
    floats = {node.name: node for node in float_model.graph if node.name}
    pairs = []
    for node in quantized.graph:
        if not is_onnx_op(node, "Conv", "Gemm") or node.name not in floats:
            continue
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        producer = None if weight is None else weight.producer()
        if producer is None or producer.op_type != "DequantizeLinear":
            continue
        if constant_array(floats[node.name].inputs[1]) is None:
            continue
        pairs.append((node, floats[node.name]))
    return pairs


def layer_shifts(
    quantized: ir.Model, float_model: ir.Model, batches: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Each quantized Conv/Gemm's mean output shift per channel (quantized - float, on the
    quantized model's own inputs to the layer), by node name.

    Args:
        quantized: the QDQ model (not modified).
        float_model: the float model it was quantized from (same node names).
        batches: calibration feed dicts.

    Returns:
        node name -> float32 [channels] shift.
    """
    probe = ir.from_proto(ir.to_proto(quantized))
    graph = probe.graph
    names = Names(graph)
    layers = _quantized_layers(probe, float_model)
    outputs: dict[str, str] = {}
    for node, float_node in layers:
        weight = constant_array(float_node.inputs[1])
        assert weight is not None
        inputs = [node.inputs[0], add_initializer(graph, f"{node.name}_float_weight", weight,
                                                  names=names)]
        bias = constant_array(float_node.inputs[2]) if len(float_node.inputs) > 2 else None
        if bias is not None:
            inputs.append(add_initializer(graph, f"{node.name}_float_bias", bias, names=names))
        attributes = {key: attr.value for key, attr in node.attributes.items()}
        twin = ir.node(node.op_type, inputs, attributes=attributes,
                       name=names.fresh(f"{node.name}_float"))
        twin.outputs[0].name = names.fresh(f"{node.name}_float_out")
        difference = ir.node("Sub", [node.outputs[0], twin.outputs[0]],
                             name=names.fresh(f"{node.name}{_SHIFT}"))
        difference.outputs[0].name = names.fresh(f"{node.name}{_SHIFT}")
        difference.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        graph.insert_after(node, [twin, difference])
        graph.outputs.append(difference.outputs[0])
        outputs[node.name or ""] = difference.outputs[0].name or ""
    if not outputs:
        return {}
    session = create_session(probe)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feeds in batches:
        got = run(session, feeds)
        for name, output in outputs.items():
            diff = np.moveaxis(got[output].astype(np.float64), 1, 0)
            diff = diff.reshape(diff.shape[0], -1)
            sums[name] = sums.get(name, 0.0) + diff.sum(axis=1)
            counts[name] = counts.get(name, 0) + diff.shape[1]
    return {name: (sums[name] / counts[name]).astype(np.float32) for name in sums}


def corrected_biases(
    float_model: ir.Model, quantized: ir.Model, batches: Iterable[Mapping[str, np.ndarray]]
) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """A copy of `float_model` whose quantized layers' biases are lowered by their measured
    shifts (`layer_shifts`); a layer without a bias gets one.

    Returns:
        (corrected float model, node name -> shift subtracted).

    Raises:
        BadOptionError: no quantized Conv or Gemm to correct.
    """
    shifts = layer_shifts(quantized, float_model, batches)
    if not shifts:
        raise BadOptionError("bias correction found no quantized Conv or Gemm to correct")
    corrected = ir.from_proto(ir.to_proto(float_model))
    corrected.meta.update(float_model.meta)
    names = Names(corrected.graph)
    for node in corrected.graph:
        shift = shifts.get(node.name or "")
        if shift is None:
            continue
        bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
        if bias is None:
            value = add_initializer(corrected.graph, f"{node.name}_bias", -shift, names=names)
            node.resize_inputs(3)
            node.replace_input_with(2, value)
        else:
            set_constant(node, 2, (bias - shift.reshape(bias.shape)).astype(np.float32),
                         names=names)
    logger.info("bias correction: %d layers, largest shift %.3g", len(shifts),
                max(float(np.abs(s).max()) for s in shifts.values()))
    return corrected, shifts
