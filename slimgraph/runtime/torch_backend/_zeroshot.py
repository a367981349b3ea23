"""Zero-shot calibration data: inputs synthesized to match the model's BatchNorm statistics.

A trained network's BatchNormalization layers remember the mean and variance of their inputs on
the training data. Starting from Gaussian noise, the inputs are optimized (Adam, the model frozen
in eval mode) until the per-channel batch mean and standard deviation at every BatchNormalization
input match those running statistics; the result stands in for calibration data when there is
none (seed 002, "zero-shot quantization"; the loss of Cai et al., 2020, "ZeroQ: A Novel Zero Shot
Quantization Framework", CVPR: the sum over BN layers of ||mu - mu_bn||_2 + ||sigma - sigma_bn||_2).

Run it on the model as loaded: `sg.optimize` and quantization fold BatchNormalization into the
convolutions, after which there are no statistics left to match.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir
import torch

from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.runtime.torch_backend._lower import lower

__all__ = ["zero_shot_calibration"]

logger = logging.getLogger(__name__)


def _input_shape(value: ir.Value, samples: int) -> list[int]:
    shape = value.shape
    if shape is None:
        raise UnsupportedModelError(
            f"zero-shot calibration needs the shape of input '{value.name}'; it has none"
        )
    dims = list(shape)
    out = []
    for i, dim in enumerate(dims):
        if isinstance(dim, int):
            out.append(samples if i == 0 else dim)
        elif i == 0:
            out.append(samples)
        else:
            raise UnsupportedModelError(
                f"zero-shot calibration needs fixed sizes beyond the batch axis; input "
                f"'{value.name}' has a symbolic dimension {i} ({dim})"
            )
    return out


def zero_shot_calibration(
    model: ir.Model, *, samples: int = 64, steps: int = 200, seed: int = 0, lr: float = 0.1
) -> dict[str, np.ndarray]:
    """Synthesize `samples` calibration inputs whose BatchNorm input statistics match the model's.

    Args:
        model: a float model with BatchNormalization nodes (as loaded, before BN folding); not
            modified.
        samples: rows to synthesize (the batch size of the returned arrays).
        steps: Adam steps on the inputs.
        seed: seed of the starting Gaussian noise (same seed, same result).
        lr: Adam's learning rate.

    Returns:
        Input name -> float32 array of shape [samples, *input shape without batch], usable as
        `calibration=` for `sg.quantize`.

    Raises:
        UnsupportedModelError: no BatchNormalization node with constant running statistics, an
            input that is not float or whose non-batch sizes are not fixed, or an op the torch
            backend cannot lower.
        BadOptionError: samples < 2 or steps < 0.

    Example:
        >>> feeds = zero_shot_calibration(model, samples=64)  # doctest: +SKIP
        >>> q = sg.quantize(model, calibration=feeds)  # doctest: +SKIP
    """
    if samples < 2:
        raise BadOptionError(f"zero-shot calibration needs at least 2 samples, got {samples}")
    if steps < 0:
        raise BadOptionError(f"steps must be >= 0, got {steps}")
    graph = model.graph
    layers = []
    for node in graph:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        source, mean_value, var_value = node.inputs[0], node.inputs[3], node.inputs[4]
        if (source is None or mean_value is None or var_value is None
                or mean_value.const_value is None or var_value.const_value is None):
            continue
        layers.append((source.name or "", mean_value.const_value.numpy(),
                       var_value.const_value.numpy()))
    if not layers:
        raise UnsupportedModelError(
            "zero-shot calibration needs BatchNormalization layers (their running statistics); "
            "the model has none (calibrate with data instead)"
        )
    inputs = [v for v in graph.inputs if v.name not in graph.initializers]
    for value in inputs:
        if value.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16):
            raise UnsupportedModelError(
                f"zero-shot calibration synthesizes float inputs; input '{value.name}' is "
                f"{value.dtype.name if value.dtype is not None else 'untyped'}"
            )
    shapes = [_input_shape(v, samples) for v in inputs]

    names = list(dict.fromkeys(name for name, _, _ in layers))
    lowered = lower(model, extra_outputs=names)
    lowered.eval()
    for parameter in lowered.parameters():
        parameter.requires_grad_(False)
    targets = {}
    for name, mean, var in layers:
        targets[name] = (
            torch.from_numpy(mean.astype(np.float32)),
            torch.from_numpy(np.sqrt(np.maximum(var.astype(np.float32), 0.0))),
        )
    generator = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=generator).requires_grad_(True) for shape in shapes]
    optimizer = torch.optim.Adam(xs, lr=lr)
    first = len(lowered.output_names) - len(names)

    def loss_of(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        total = torch.zeros(())
        for name, value in zip(names, outputs[first:], strict=True):
            dims = [d for d in range(value.dim()) if d != 1]
            mu = value.mean(dims)
            sigma = torch.sqrt(value.var(dims, unbiased=False) + 1e-8)
            mean, std = targets[name]
            total = total + torch.linalg.vector_norm(mu - mean) + torch.linalg.vector_norm(
                sigma - std
            )
        return total

    start = None
    for step in range(steps):
        loss = loss_of(lowered(*xs))
        if not math.isfinite(float(loss.detach())):
            raise UnsupportedModelError(
                f"zero-shot calibration diverged at step {step} (loss {float(loss.detach())})"
            )
        if start is None:
            start = float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = float(loss_of(lowered(*xs)))
    logger.info(
        "zero-shot calibration: %d samples, %d steps, %d BatchNorm layers, loss %s -> %.4g",
        samples, steps, len(names), f"{start:.4g}" if start is not None else "-", final,
    )
    return {
        value.name or "": x.detach().numpy().astype(
            value.dtype.numpy() if value.dtype is not None else np.float32
        )
        for value, x in zip(inputs, xs, strict=True)
    }
