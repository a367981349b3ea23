"""Learned weight rounding, layer by layer: AdaRound and AdaQuant on a lowered QDQ graph.

Both reconstruct each quantized layer's output in the float model from the layer's input in the
quantized model, in the graph's order, on calibration data:

    min  || f(W~ x~ + b) - f(W x + b) ||^2      x~: the input with every earlier layer quantized

with f the Relu or Clip right after the layer, if any (the asymmetric reconstruction of Nagel et
al., 2020, section 4). The quantized model is lowered once (`_lower`), so x~ comes from its own
fake quantization (`_ops`: QuantizeLinear/DequantizeLinear on the ONNX grid, straight-through), and
each layer's learned codes are put into its weight parameter before the next layer's input is
recorded; the layer itself runs through its own kernel (`LoweredModel.node_function`).

- AdaRound (Nagel et al., 2020, "Up or Down? Adaptive Rounding for Post-Training
  Quantization"): W~ = s * clip(floor(W / s) + h(V), qmin, qmax) with the rectified sigmoid
  h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1, V initialized
  so that h(V) is the fractional part (W~ starts at W), and the regularizer
  lambda * sum(1 - |2 h(V) - 1|^beta) pushing h to 0 or 1, with beta annealed from 20 to 2 after
  a warm start of 20% of the steps without it; the codes are floor(W / s) + [V >= 0] at the end.
  The reconstruction is summed over channels and averaged over the rest (AIMET's form), lambda
  0.01.
- AdaQuant (Hubara et al., 2021, "Accurate Post Training Quantization With Small Calibration
  Sets"): W, the per-channel scale s and the bias b are all learned against the same loss, W~ the
  straight-through fake quantization of W with scale s (`_ops.fake_quantize`), s = s0 exp(t).

A layer keeps nearest rounding when its learned codes reconstruct worse than nearest does on the
whole data (both errors are in the `LearnedWeight`).

This module imports torch; `slimgraph.runtime.torch_backend` imports it lazily.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch

import slimgraph.runtime.torch_backend._ops as _ops
from slimgraph.runtime.quant_math import QuantSpec
from slimgraph.runtime.torch_backend._lower import LoweredModel, lower
from slimgraph.runtime.torch_backend._options import (
    LearnedWeight,
    RoundingLayer,
    bias_scale_after,
)

__all__ = ["METHODS", "learn_rounding"]

logger = logging.getLogger(__name__)

METHODS = ("adaround", "adaquant")
_ZETA, _GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (Louizos et al., 2018)
_LAMBDA = 0.01
_BETA = (20.0, 2.0)
_WARM = 0.2
_CHUNK = 256  # rows per forward pass when recording inputs and targets


def learn_rounding(
    float_model: ir.Model,
    quantized: ir.Model,
    layers: Sequence[RoundingLayer],
    feeds: Mapping[str, np.ndarray],
    *,
    method: str,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float | None = None,
    seed: int = 0,
) -> dict[str, LearnedWeight]:
    """Learn the rounding of `layers` of `quantized` (QDQ), one after the other.

    Args:
        float_model: the float model `quantized` was built from (same node names).
        quantized: the QDQ model (not modified).
        layers: the layers, in the graph's order.
        feeds: the calibration rows, stacked on axis 0 by input name.
        method: "adaround" or "adaquant".
        steps: optimizer steps per layer.
        batch_size: rows per step.
        lr: Adam's learning rate (default: 1e-2 for AdaRound's V, 1e-3 for AdaQuant's weights
            in units of their step, so 1e-3 of a step).
        seed: seeds the batches.

    Returns:
        Layer node name -> its `LearnedWeight`.
    """
    generator = torch.Generator().manual_seed(seed)
    q_module = lower(quantized, extra_outputs=sorted({layer.input for layer in layers}))
    f_module = lower(float_model, extra_outputs=sorted({layer.target for layer in layers}))
    inputs = {name: _ops.to_torch(np.asarray(array)) for name, array in feeds.items()}
    learned: dict[str, LearnedWeight] = {}
    for layer in layers:
        x = _record(q_module, inputs, layer.input)
        y = _record(f_module, inputs, layer.target)
        forward = _layer_forward(q_module, layer)
        if method == "adaround":
            result = _adaround(layer, forward, x, y, steps, batch_size, lr or 1e-2, generator)
        else:
            result = _adaquant(layer, forward, x, y, steps, batch_size, lr or 1e-3, generator)
        learned[layer.node] = result
        _install(q_module, layer, result)
        logger.info("%s %s: reconstruction error %.4g (nearest %.4g)", method, layer.node,
                    result.error, result.nearest_error)
    return learned


def _record(module: LoweredModel, inputs: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """Value `name` of `module` on all rows (in chunks, no gradient)."""
    index = module.output_names.index(name)
    rows = next(iter(inputs.values())).shape[0]
    parts = []
    with torch.no_grad():
        for start in range(0, rows, _CHUNK):
            chunk = [inputs[n][start:start + _CHUNK] for n in module.input_names]
            parts.append(module(*chunk)[index].detach())
    return torch.cat(parts)


Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _layer_forward(module: LoweredModel, layer: RoundingLayer) -> Forward:
    """The layer (and its Relu/Clip) as a function of input, weight and bias."""
    node = module.node_function(layer.node)
    activation = None if layer.activation is None else module.node_function(layer.activation)

    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        given = {layer.input: x, layer.weight_value: w}
        if layer.bias_value is not None and b is not None:
            given[layer.bias_value] = b
        out = node(given)[0]
        if activation is not None:
            out = activation({layer.output: out})[0]
        return out

    return forward


def _broadcast(scale: np.ndarray, weight: np.ndarray, axis: int) -> torch.Tensor:
    """A scale shaped to broadcast against the weight (one value, or one per channel)."""
    s = torch.as_tensor(np.asarray(scale, np.float32))
    if s.numel() == 1:
        return s.reshape(())
    shape = [1] * weight.ndim
    shape[axis % weight.ndim] = -1
    return s.reshape(shape)


def _error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (axis 1), averaged over rows and positions."""
    diff = (out - target) ** 2
    return diff.sum(1).mean() if diff.dim() > 1 else diff.mean()


def _full_error(
    forward: Forward, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
) -> float:
    with torch.no_grad():
        total = 0.0
        for start in range(0, x.shape[0], _CHUNK):
            out = forward(x[start:start + _CHUNK], w, b)
            total += float(_error(out, y[start:start + _CHUNK])) * out.shape[0]
    return total / x.shape[0]


def _bias(layer: RoundingLayer) -> torch.Tensor | None:
    return None if layer.bias is None else torch.as_tensor(layer.bias, dtype=torch.float32)


def _adaround(
    layer: RoundingLayer, forward: Forward, x: torch.Tensor, y: torch.Tensor, steps: int,
    batch_size: int, lr: float, generator: torch.Generator,
) -> LearnedWeight:
    """AdaRound of one layer (see the module docstring)."""
    weight = torch.as_tensor(layer.weight, dtype=torch.float32)
    s = _broadcast(layer.scale, layer.weight, layer.axis)
    bias = _bias(layer)
    floor = torch.floor(weight / s)
    rest = (weight / s - floor).clamp(1e-4, 1 - 1e-4)
    v = torch.nn.Parameter(-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1))
    optimizer = torch.optim.Adam([v], lr=lr)
    warm = int(_WARM * steps)
    for step in range(steps):
        rows = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=generator)
        h = torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)
        w = s * torch.clamp(floor + h, layer.qmin, layer.qmax)
        loss = _error(forward(x[rows], w, bias), y[rows])
        if step >= warm:
            beta = _BETA[1] + (_BETA[0] - _BETA[1]) * (1 - (step - warm) / max(steps - warm, 1))
            loss = loss + _LAMBDA * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        codes = torch.clamp(floor + (v >= 0).float(), layer.qmin, layer.qmax)
        nearest = torch.clamp(torch.round(weight / s), layer.qmin, layer.qmax)
    return _kept(layer, forward, x, y, codes, nearest, s, bias, bias)


def _adaquant(
    layer: RoundingLayer, forward: Forward, x: torch.Tensor, y: torch.Tensor, steps: int,
    batch_size: int, lr: float, generator: torch.Generator,
) -> LearnedWeight:
    """AdaQuant of one layer: weight, scale and bias learned (see the module docstring)."""
    weight = torch.as_tensor(layer.weight, dtype=torch.float32)
    s0 = _broadcast(layer.scale, layer.weight, layer.axis)
    bias0 = _bias(layer)
    spec = _grid(layer.qmin, layer.qmax)
    u = torch.nn.Parameter(weight / s0)  # the weight in units of its initial step
    t = torch.nn.Parameter(torch.zeros_like(s0))  # log of the scale's change
    params: list[dict[str, object]] = [{"params": [u], "lr": lr}, {"params": [t], "lr": lr}]
    b = None
    if bias0 is not None:
        b = torch.nn.Parameter(bias0.clone())
        params.append({"params": [b], "lr": lr * float(s0.mean())})
    optimizer = torch.optim.Adam(params)  # type: ignore[arg-type]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))
    for _ in range(steps):
        rows = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=generator)
        s = s0 * torch.exp(t)
        w = _ops.fake_quantize(u * s0, s.reshape(-1) if s.dim() else s, None, spec,
                               layer.axis % weight.dim())
        loss = _error(forward(x[rows], w, b), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        s = s0 * torch.exp(t)
        codes = torch.clamp(torch.round(u * s0 / s), layer.qmin, layer.qmax)
        nearest = torch.clamp(torch.round(weight / s0), layer.qmin, layer.qmax)
        learned_bias = None if b is None else b.detach().clone()
    return _kept(layer, forward, x, y, codes, nearest, s, learned_bias, bias0, s0)


def _grid(qmin: int, qmax: int) -> QuantSpec:
    """A signed spec whose `qrange` is (qmin, qmax) (4-bit codes too: int8 storage)."""
    for dtype in (ir.DataType.INT4, ir.DataType.INT8):
        for symmetric in (True, False):
            spec = QuantSpec(dtype, symmetric)
            if spec.qrange == (qmin, qmax):
                return spec
    raise ValueError(f"no signed grid [{qmin}, {qmax}]")


def _kept(
    layer: RoundingLayer, forward: Forward, x: torch.Tensor, y: torch.Tensor,
    codes: torch.Tensor, nearest: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None,
    bias0: torch.Tensor | None, s0: torch.Tensor | None = None,
) -> LearnedWeight:
    """The learned codes (scale, bias) or nearest rounding, whichever reconstructs better."""
    s0 = s if s0 is None else s0
    error = _full_error(forward, x, y, codes * s, bias)
    nearest_error = _full_error(forward, x, y, nearest * s0, bias0)
    if nearest_error < error:
        codes, s, bias, error = nearest, s0, bias0, nearest_error
    scale = s.detach().reshape(np.shape(layer.scale)).numpy().astype(np.float32)
    return LearnedWeight(
        codes.to(torch.int64).numpy(), scale,
        None if bias is None else bias.numpy().astype(np.float32), nearest_error, error)


def _install(module: LoweredModel, layer: RoundingLayer, result: LearnedWeight) -> None:
    """Put a layer's learned codes, scale and bias into the lowered QDQ model (its DQ kernels
    re-quantize them to exactly these codes), for the next layers' inputs."""
    with torch.no_grad():
        scale = module.value(layer.scale_name)
        scale.copy_(torch.as_tensor(result.scale).reshape(scale.shape))
        s = _broadcast(result.scale, layer.weight, layer.axis)
        module.value(layer.codes).copy_(torch.as_tensor(result.codes, dtype=torch.float32) * s)
        if result.bias is not None and layer.bias_codes and layer.bias_scale:
            bias_scale = module.value(layer.bias_scale)
            new_scale = bias_scale_after(layer.scale, result.scale, bias_scale.numpy())
            bias_scale.copy_(torch.as_tensor(new_scale))
            module.value(layer.bias_codes).copy_(torch.as_tensor(result.bias))
