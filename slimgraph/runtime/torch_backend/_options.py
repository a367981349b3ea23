"""Training options and knowledge-distillation vocabulary, and the layers of learned rounding
(`RoundingLayer`, `LearnedWeight`), without torch.

`slimgraph.finetune` checks its options against these before torch is imported; the training loop
(`_train`) reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from slimgraph.errors import BadOptionError

__all__ = [
    "KD_KINDS", "SCHEMES", "OPTIMIZERS", "FEATURE_LOSSES", "TrainOptions", "RoundingLayer",
    "LearnedWeight", "bias_scale_after",
]

# Knowledge kinds of distillation, the teacher schemes, and the optimizers.
KD_KINDS: tuple[str, ...] = ("response", "feature", "relation")
SCHEMES: tuple[str, ...] = ("offline", "online", "self")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
FEATURE_LOSSES: tuple[str, ...] = ("mse", "cosine")


@dataclass(frozen=True)
class TrainOptions:
    """Optimization and distillation settings.

    Attributes:
        epochs: passes over the data (0 trains nothing).
        batch_size: rows per step (in-memory data; streamed feed dicts keep their own size).
        lr: peak learning rate; a cosine schedule decays it to 0 over the run unless
            `schedule="constant"`. None (the default): measured by a learning-rate range test
            on the model and data before training (`_lr_range`).
        optimizer: "adamw" or "sgd" (momentum 0.9, Nesterov).
        weight_decay: decoupled (AdamW) or L2 (SGD) decay on weights with 2+ axes only.
        seed: seeds shuffling, dropout and adapter initialization: same seed, same result.
        temperature: softening temperature T of response KD.
        alpha: weight of the KD term against the label cross-entropy, in [0, 1].
        feature_weight: weight of the feature-KD term.
        feature_loss: "mse" (FitNets) or "cosine" (1 - cosine similarity over the channel
            axis, for embeddings: scale-free, what a sentence encoder is judged by).
        unfold_batchnorm: train convolutions whose BatchNorm was folded away with batch
            statistics again, folded back exactly at the end (`_batchnorm`).
        relation_weights: (distance, angle) weights of relation KD (Park et al.: 1, 2).
        ema_decay: decay of the self-distillation teacher's moving average, in [0, 1).
        progress: tqdm bar with the running loss; None shows it only on a terminal.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    seed: int = 0
    temperature: float = 4.0
    alpha: float = 0.5
    feature_weight: float = 1.0
    feature_loss: str = "mse"
    unfold_batchnorm: bool = True
    relation_weights: tuple[float, float] = (1.0, 2.0)
    ema_decay: float = 0.99
    progress: bool | None = None

    def check(self) -> None:
        """Refuse impossible values before anything runs.

        Raises:
            BadOptionError: naming the option and the allowed range.
        """
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 0, f"epochs must be >= 0, got "
             f"{self.epochs}"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr is None or math.isfinite(self.lr) and self.lr > 0,
             f"learning rate must be > 0, got {self.lr}"),
            (self.optimizer in OPTIMIZERS,
             f"unknown optimizer '{self.optimizer}' (choose from {', '.join(OPTIMIZERS)})"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.schedule in ("cosine", "constant"),
             f"unknown schedule '{self.schedule}' (choose from cosine, constant)"),
            (math.isfinite(self.temperature) and self.temperature > 0,
             f"temperature must be > 0, got {self.temperature}"),
            (0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}"),
            (self.feature_weight >= 0, f"feature weight must be >= 0, got {self.feature_weight}"),
            (self.feature_loss in FEATURE_LOSSES, f"unknown feature loss '{self.feature_loss}' "
             f"(choose from {', '.join(FEATURE_LOSSES)})"),
            (all(w >= 0 for w in self.relation_weights),
             f"relation weights must be >= 0, got {self.relation_weights}"),
            (0.0 <= self.ema_decay < 1.0, f"ema decay must be in [0, 1), got {self.ema_decay}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise BadOptionError(message)


@dataclass(frozen=True)
class RoundingLayer:
    """One layer whose weight rounding is learned (`_rounding.learn_rounding`), as the QDQ graph
    holds it.

    Attributes:
        node: the Conv/Gemm/MatMul node (the same name in the float and the QDQ model).
        input: the QDQ model's value the node reads as its input (a DequantizeLinear output).
        weight_value: the QDQ model's dequantized weight (the DequantizeLinear output it reads).
        bias_value: likewise for the bias, or None.
        output: the node's output value.
        codes: the integer initializer holding the weight's codes.
        scale_name: the initializer holding its scale.
        bias_codes, bias_scale: the int32 bias's codes and scale initializers, or None.
        weight: the float weight, float32, the codes' shape.
        scale: the weight's scale as stored (one value, or one per channel along `axis`).
        axis: the channel axis of `scale`.
        qmin, qmax: the codes' grid.
        bias: the bias the QDQ model computes with (dequantized), float32, or None.
        activation: a Relu or Clip node right after `node` whose output is the target, or None.
        target: the float model's value the layer reconstructs (the activation's output, else
            the node's).
    """

    node: str
    input: str
    weight_value: str
    bias_value: str | None
    output: str
    codes: str
    scale_name: str
    bias_codes: str | None
    bias_scale: str | None
    weight: np.ndarray
    scale: np.ndarray
    axis: int
    qmin: int
    qmax: int
    bias: np.ndarray | None
    activation: str | None
    target: str


@dataclass(frozen=True)
class LearnedWeight:
    """A layer's learned codes (int64, the weight's shape), its scale and bias (float32; AdaRound
    keeps both), and the reconstruction error (mean squared, over the data) with nearest rounding
    and with the codes kept (the smaller one: a method that does worse keeps nearest)."""

    codes: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None
    nearest_error: float
    error: float


def bias_scale_after(old_weight_scale: np.ndarray, new_weight_scale: np.ndarray,
                     bias_scale: np.ndarray) -> np.ndarray:
    """An int32 bias's scale s_x * s_w after the weight's scale changed (float32, the bias
    scale's shape)."""
    ratio = (np.asarray(new_weight_scale, np.float64)
             / np.asarray(old_weight_scale, np.float64)).reshape(-1)
    new = np.asarray(bias_scale, np.float64).reshape(-1) * ratio
    return new.astype(np.float32).reshape(np.shape(bias_scale))
