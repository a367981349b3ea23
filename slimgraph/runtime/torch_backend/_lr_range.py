"""The learning-rate range test: the default learning rate, measured on the model and data.

A fixed default learning rate suits one kind of model: 1e-3 with AdamW is slow for a CNN whose
pruning left it at chance, and 1e-2 wrecks a transformer or an already-good QDQ model. The range
test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2017; the fastai `lr_find`
heuristic) trains a few steps from the model's own weights with the learning rate growing
geometrically from `start` to `stop`, records the loss, and picks the rate at which the
(smoothed) loss was lowest divided by `BELOW`: below the point where it starts to climb, high
enough to move. fastai divides by 10; on the held-out CNNs of `benchmarks/holdout_cnns.py`
(pruned ResNet, MobileNet and bottleneck nets tuned on, the VGG and a BERT encoder held out) 10
left pruned networks short of their accuracy after 10 epochs and 2 recovered them (the
`--holdout` benchmark prints both). Everything it trained (weights, BatchNorm statistics,
adapters, the optimizer) is put back afterwards; only the rate is kept. Streamed data, which may
be one-shot, is tested on its first batch repeated.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

__all__ = ["LrSearch", "lr_range_test"]

logger = logging.getLogger(__name__)

START, STOP, STEPS = 1e-6, 1.0, 40
# The pick is bounded: below LOWEST nothing moves in a few epochs; above HIGHEST Adam-style
# updates overshoot on every model measured (CNNs, transformers, factorized layers).
LOWEST, HIGHEST = 1e-5, 3e-2
_DIVERGED = 4.0  # stop once the loss exceeds this multiple of the lowest loss so far
_WINDOW = 5  # centred moving average over this many steps
BELOW = 2.0  # the pick: the rate of the lowest smoothed loss divided by this


@dataclass
class LrSearch:
    """What the range test measured and chose.

    Attributes:
        lr: the chosen learning rate.
        lrs, losses: the rates tried and the loss at each (one step each).
        best: the rate at the lowest smoothed loss (the pick is a tenth of it, bounded).
    """

    lr: float
    best: float
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"learning rate {self.lr:.3g} (range test: {len(self.lrs)} steps, lowest loss "
                f"at {self.best:.3g})")  # fmt: skip


def _smoothed(losses: Sequence[float]) -> np.ndarray:
    values = np.asarray(losses, dtype=np.float64)
    half = _WINDOW // 2
    padded = np.pad(values, half, mode="edge")
    return np.convolve(padded, np.ones(_WINDOW) / _WINDOW, mode="valid")


def lr_range_test(
    step_loss: Callable[[], torch.Tensor],
    modules: Sequence[nn.Module],
    make_optimizer: Callable[[float], torch.optim.Optimizer],
    *,
    start: float = START,
    stop: float = STOP,
    steps: int = STEPS,
) -> LrSearch:
    """Run the range test and restore every module's state.

    Args:
        step_loss: the loss of the next training batch (forward pass included).
        modules: everything the optimizer trains (student, adapters, an online teacher); their
            `state_dict`s are restored at the end.
        make_optimizer: the run's optimizer at a given learning rate.
        start, stop, steps: the geometric range and the number of steps.

    Returns:
        The chosen rate and the measurements.
    """
    saved = [copy.deepcopy(m.state_dict()) for m in modules]
    modes = [m.training for m in modules]
    optimizer = make_optimizer(start)
    factor = (stop / start) ** (1.0 / max(1, steps - 1))
    lrs: list[float] = []
    losses: list[float] = []
    lowest = math.inf
    try:
        for step in range(steps):
            lr = start * factor**step
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = step_loss()
            value = float(loss.detach())
            if not math.isfinite(value) or (step >= _WINDOW and value > _DIVERGED * lowest):
                break
            lrs.append(lr)
            losses.append(value)
            lowest = min(lowest, value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for module, state, mode in zip(modules, saved, modes, strict=True):
            module.load_state_dict(state)
            module.train(mode)
    if len(losses) < 2:
        return LrSearch(LOWEST, start, lrs, losses)
    smooth = _smoothed(losses)
    best = lrs[int(np.argmin(smooth))]
    chosen = float(min(HIGHEST, max(LOWEST, best / BELOW)))
    search = LrSearch(chosen, best, lrs, losses)
    logger.info("%s", search)
    return search


def cycle(epochs: Callable[[], Iterator[object]]) -> Iterator[object]:
    """Batches from `epochs()` over and over (for a range test longer than one epoch)."""
    while True:
        empty = True
        for item in epochs():
            empty = False
            yield item
        if empty:
            return
