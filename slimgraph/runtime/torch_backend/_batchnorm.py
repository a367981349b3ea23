"""Batch statistics for graphs whose BatchNormalization was folded away: unfold for training,
fold back exactly.

An exporter or an optimizer (torch.onnx's `optimize=True`, `slimgraph optimize`, any deployment
tool) folds `BN(conv(x))` into the convolution's weight and bias. Training such a graph loses
what BatchNorm gave the original training: every step re-centres and re-scales each channel on
the batch, so a layer whose inputs shifted (after pruning or factorization) is put back on
scale at once and the weights' scale no longer conditions the gradient.

`unfold_batchnorm` puts it back for training only, inside the lowered module (the graph is not
touched): each Conv with a trainable weight and bias whose output feeds no BatchNormalization
gets a per-channel `y' = gamma * (y - mean_B) / sqrt(var_B + eps) + beta` after it (batch
statistics in training mode, running ones in eval mode). It starts as the identity in eval mode:
running mean and variance are the channel's statistics on a sample batch, `gamma =
sqrt(var + eps)`, `beta = mean`. `fold_batchnorm` then folds the eval-mode form back into the
convolution, `W' = W * s`, `b' = (b - mean) * s + beta` with `s = gamma / sqrt(var + eps)` per
output channel (Ioffe and Szegedy, 2015; the same algebra as BatchNorm folding), and removes it:
the module computes what its eval mode computed, in the graph's own weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import onnx_ir as ir
import torch
from torch import nn
from torch.nn import functional as F

from slimgraph.runtime.torch_backend._lower import LoweredModel, WeightInfo

__all__ = ["unfold_batchnorm", "fold_batchnorm", "Unfolded"]

logger = logging.getLogger(__name__)

_EPS = 1e-5
_MOMENTUM = 0.1  # torch's convention (ONNX momentum 0.9)


class _ChannelNorm(nn.Module):
    """BatchNorm over axis 1 of a conv output, measured (first call) or applied."""

    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.measure = False

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.measure:
            with torch.no_grad():
                axes = [a for a in range(y.ndim) if a != 1]
                mean = y.mean(axes)
                var = y.var(axes, unbiased=False)
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
                self.weight.copy_(torch.sqrt(var + _EPS))
                self.bias.copy_(mean)
            return y
        return F.batch_norm(y, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, _MOMENTUM, _EPS)  # fmt: skip


@dataclass
class Unfolded:
    """One convolution trained with batch statistics: its step, weight and bias paths, norm."""

    step: int
    weight: str
    bias: str
    norm: _ChannelNorm
    kernel: object


class _Normed:
    """A conv kernel followed by its `_ChannelNorm` (picklable and deep-copyable)."""

    def __init__(self, kernel: object, norm: _ChannelNorm) -> None:
        self.kernel = kernel
        self.norm = norm

    def __call__(self, module: nn.Module, inputs: list[object]) -> list[object]:
        outputs = self.kernel(module, inputs)  # type: ignore[operator]
        return [self.norm(outputs[0]), *outputs[1:]]


def _candidates(model: ir.Model, weights: Mapping[str, WeightInfo]) -> dict[str, tuple[str, str]]:
    """Conv output name -> (weight, bias) initializer names, for convs that can be unfolded."""
    outputs = {v.name for v in model.graph.outputs}
    found: dict[str, tuple[str, str]] = {}
    for node in model.graph:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
            continue
        weight, bias, out = node.inputs[1], node.inputs[2], node.outputs[0]
        if weight is None or bias is None or not out.name or out.name in outputs:
            continue
        if weight.name not in weights or bias.name not in weights:
            continue
        if len(weight.uses()) != 1 or len(bias.uses()) != 1:
            continue
        if any(user.op_type == "BatchNormalization" for user, _ in out.uses()):
            continue
        found[out.name] = (weight.name or "", bias.name or "")
    return found


def unfold_batchnorm(
    module: LoweredModel, model: ir.Model, sample: Mapping[str, torch.Tensor]
) -> list[Unfolded]:
    """Give every foldable convolution of `module` a BatchNorm for training (see the module
    docstring); its statistics and initial affine come from one eval-mode pass on `sample`.

    Args:
        module: `lower(model)`; changed in place (its `unfolded` child holds the norms).
        model: the graph it was lowered from.
        sample: one batch of inputs by name (two rows or more).

    Returns:
        What `fold_batchnorm` needs; empty when no convolution qualifies.
    """
    weights = {w.initializer: w for w in module._float_weights}
    candidates = _candidates(model, weights)
    unfolded: list[Unfolded] = []
    for index, step in enumerate(module._steps):
        if not step.outputs or step.outputs[0] not in candidates:
            continue
        weight, bias = candidates[step.outputs[0]]
        channels = int(getattr(module.weights, weights[weight].path).shape[0])
        norm = _ChannelNorm(channels)
        unfolded.append(Unfolded(index, weights[weight].path, weights[bias].path, norm,
                                 step.kernel))  # fmt: skip
        step.kernel = _Normed(step.kernel, norm)  # type: ignore[assignment]
        # the batch mean cancels the bias: zero gradient, and torch's conv backward is faster
        getattr(module.weights, weights[bias].path).requires_grad_(False)
    if not unfolded:
        return []
    module.unfolded = nn.ModuleList([u.norm for u in unfolded])
    was_training = module.training
    module.eval()
    for u in unfolded:
        u.norm.measure = True
    with torch.no_grad():
        module(*(sample[name] for name in module.input_names))
    for u in unfolded:
        u.norm.measure = False
    module.train(was_training)
    logger.info("training %d convolutions with batch statistics (BatchNorm folded in the graph)",
                len(unfolded))  # fmt: skip
    return unfolded


@torch.no_grad()
def fold_batchnorm(module: LoweredModel, unfolded: list[Unfolded]) -> None:
    """Fold each eval-mode norm of `unfold_batchnorm` into its convolution and remove it: the
    module then computes what its eval mode computed before (up to float rounding)."""
    for u in unfolded:
        norm = u.norm
        scale = norm.weight / torch.sqrt(norm.running_var + _EPS)
        weight = getattr(module.weights, u.weight)
        bias = getattr(module.weights, u.bias)
        weight.mul_(scale.reshape(-1, *([1] * (weight.ndim - 1))).to(weight.dtype))
        bias.copy_(((bias - norm.running_mean) * scale + norm.bias).to(bias.dtype))
        module._steps[u.step].kernel = u.kernel  # type: ignore[assignment]
        bias.requires_grad_(True)
    if unfolded and hasattr(module, "unfolded"):
        del module.unfolded
