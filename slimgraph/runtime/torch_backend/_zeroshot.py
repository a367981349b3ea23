"""Zero-shot calibration data: inputs synthesized to match the model's BatchNorm statistics.

A trained network's BatchNormalization layers remember the mean and variance of their inputs on
the training data. Starting from Gaussian noise shifted and scaled per input channel (the shift
and scale fitted to the same loss first, on a few rows: N(0, 1) can be hundreds of times farther
from the statistics than the training data is), the inputs are optimized (Adam at `lr` times
that scale, the model frozen in eval mode) until the per-channel batch mean and standard
deviation at every BatchNormalization input match those running statistics; the result stands in
for calibration data when there is none (seed 002, "zero-shot quantization"; the loss of Cai et
al., 2020, "ZeroQ: A Novel Zero Shot Quantization Framework", CVPR: the sum over BN layers of
||mu - mu_bn||_2 + ||sigma - sigma_bn||_2, sigma_bn = sqrt(var + epsilon), the deviation the
layer divides by, as ZeroQ's reference code takes it).

The cost is the model's forward and backward pass on the synthesized batch, once per step (on a
MobileNetV3-small at 224x224 the convolutions' backward is a third of it, the BatchNorm and
statistics passes most of the rest), so the synthesis is bounded three ways:

- the rows are synthesized in batches of `batch_size` (each batch matches the statistics on its
  own, as ZeroQ's batches do): peak memory follows the batch, not `samples`;
- each batch stops when the loss plateaus: after at least 2 x `patience` steps, the lowest loss
  improved by less than `tolerance` (relative) over the last `patience` steps; `steps` is only
  the cap. A batch keeps the inputs of the lowest loss it reached (the loss of a network far
  from its training data can rise for the first steps);
- `time_budget` seconds in all, checked after every step (a batch gets its share of what is left;
  a batch that runs out keeps the inputs it has, the budget never loses rows). Under a budget,
  each batch runs on torch's thread count or on one thread, whichever a timed pass finds faster:
  on cores shared with other work, torch's threads wait on each other at every op.

A progress bar (tqdm, on stderr) shows the steps and the loss.

Run it on the model as loaded: `sg.optimize` and quantization fold BatchNormalization into the
convolutions, after which there are no statistics left to match.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from tqdm import tqdm

from slimgraph.errors import BadOptionError, UnsupportedModelError, VerificationError
from slimgraph.runtime.torch_backend._lower import lower

__all__ = ["ZeroShotRun", "synthesize", "zero_shot_calibration"]

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


@dataclass
class ZeroShotRun:
    """What a synthesis did.

    Attributes:
        feeds: input name -> array [samples, ...] in the input's dtype.
        steps: Adam steps taken, per batch.
        stopped: why each batch stopped: "converged", "steps" (the cap) or "time".
        losses: the loss of each batch at its first step and the lowest it reached (the inputs
            returned).
        seconds: wall time of the synthesis.
    """

    feeds: dict[str, np.ndarray]
    steps: list[int] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    losses: list[tuple[float, float]] = field(default_factory=list)
    seconds: float = 0.0


def zero_shot_calibration(
    model: ir.Model, *, samples: int = 64, steps: int = 200, seed: int = 0, lr: float = 0.1,
    batch_size: int = 32, time_budget: float | None = None, tolerance: float = 0.01,
    patience: int = 10, progress: bool | None = None,
) -> dict[str, np.ndarray]:
    """Synthesize `samples` calibration inputs whose BatchNorm input statistics match the model's.

    Args:
        model: a float model with BatchNormalization nodes (as loaded, before BN folding); not
            modified.
        samples: rows to synthesize (the batch size of the returned arrays).
        steps: the most Adam steps per batch (fewer when the loss plateaus first).
        seed: seed of the starting Gaussian noise (same seed and no time budget: same result).
        lr: Adam's learning rate on the rows, in units of the starting noise's scale (the
            mean over input channels of the scale fitted to the loss).
        batch_size: rows optimized together (the last batch takes the rest).
        time_budget: seconds for the whole synthesis (None: no limit), checked after each step.
        tolerance, patience: a batch has converged when, after at least 2 x `patience` steps,
            its lowest loss improved by less than `tolerance` (relative) over the last
            `patience` steps (tolerance 0: run `steps`).
        progress: a progress bar on stderr (None: when stderr is a terminal).

    Returns:
        Input name -> array of shape [samples, *input shape without batch] in the input's dtype,
        usable as `calibration=` for `sg.quantize`.

    Raises:
        UnsupportedModelError: no BatchNormalization node with constant running statistics, an
            input that is not float or whose non-batch sizes are not fixed, an op the torch
            backend cannot lower, or a loss that diverged.
        BadOptionError: samples < 2, steps < 0, batch_size < 2, time_budget <= 0, tolerance < 0
            or patience < 1.
        VerificationError: the time budget stopped a batch whose loss was still above half its
            start (`UNCONVERGED_LOSS_SHARE`): calibration on it would be worse than none.

    Example (the calibrator and BatchNorm bounds `quantize --zero-shot` takes for these rows,
    `_bn_bounds.zero_shot_options`; min/max ranges read their tails):
        >>> feeds = zero_shot_calibration(model, samples=64, time_budget=120)  # doctest: +SKIP
        >>> q = sg.quantize(model, calibration=feeds,
        ...                 **zero_shot_options(model))  # doctest: +SKIP
    """
    run = synthesize(
        model, samples=samples, steps=steps, seed=seed, lr=lr, batch_size=batch_size,
        time_budget=time_budget, tolerance=tolerance, patience=patience, progress=progress,
    )
    _check_converged(run, time_budget)
    return run.feeds


# A batch the time budget stopped with its loss above this share of its start is refused: on a
# trained MobileNetV3-small at 224x224, 7-10 steps left it at 0.77-0.93 of its start and int8
# calibrated on those inputs reached output cosine 0.17 (Gaussian noise: 0.25); the digits CNN
# converges to below 0.01 of its start.
UNCONVERGED_LOSS_SHARE = 0.5


def _check_converged(run: ZeroShotRun, time_budget: float | None) -> None:
    """Raise when the time budget stopped a batch before its loss fell to half its start.

    Raises:
        VerificationError: the inputs are still far from the BatchNorm statistics: calibrating
            on them gives ranges far wider than real data's (nothing is quantized).
    """
    for why, taken, (first, lowest) in zip(run.stopped, run.steps, run.losses, strict=True):
        if why == "time" and lowest > UNCONVERGED_LOSS_SHARE * first:
            raise VerificationError(
                f"zero-shot synthesis did not converge within {time_budget:g} s: the BatchNorm-"
                f"statistics loss fell only from {first:.4g} to {lowest:.4g} in {taken} steps; "
                "calibration ranges from these inputs would be far wider than real data's: "
                "give --calib DATA.npz or a larger --zero-shot-time")


def synthesize(
    model: ir.Model, *, samples: int = 64, steps: int = 200, seed: int = 0, lr: float = 0.1,
    batch_size: int = 32, time_budget: float | None = None, tolerance: float = 0.01,
    patience: int = 10, progress: bool | None = None,
) -> ZeroShotRun:
    """`zero_shot_calibration`, also saying how each batch ran (`ZeroShotRun`).

    Args, Raises: as for `zero_shot_calibration`.
    """
    started = time.perf_counter()
    _check(samples=samples, steps=steps, batch_size=batch_size, time_budget=time_budget,
           tolerance=tolerance, patience=patience)
    graph = model.graph
    layers = []
    for node in graph:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        source, mean_value, var_value = node.inputs[0], node.inputs[3], node.inputs[4]
        if (source is None or mean_value is None or var_value is None
                or mean_value.const_value is None or var_value.const_value is None):
            continue
        epsilon = node.attributes.get_float("epsilon", 1e-5)  # BN divides by sqrt(var + eps)
        layers.append((source.name or "", mean_value.const_value.numpy(),
                       var_value.const_value.numpy() + epsilon))
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
    first = len(lowered.output_names) - len(names)

    def loss_of(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        total = torch.zeros(())
        for name, value in zip(names, outputs[first:], strict=True):
            dims = [d for d in range(value.dim()) if d != 1]
            var, mu = torch.var_mean(value, dims, correction=0)  # one pass over the activation
            sigma = torch.sqrt(var + 1e-8)
            mean, std = targets[name]
            total = total + torch.linalg.vector_norm(mu - mean) + torch.linalg.vector_norm(
                sigma - std
            )
        return total

    generator = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=generator) for shape in shapes]
    bounds = [(start, min(start + batch_size, samples)) for start in range(0, samples, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2:  # a batch of 1 has no variance
        bounds[-2:] = [(bounds[-2][0], samples)]
    run = ZeroShotRun(feeds={})
    show = sys.stderr.isatty() if progress is None else progress
    threads = torch.get_num_threads()
    with _restored_threads(threads), tqdm(
            total=steps * len(bounds), desc="zero-shot synthesis", unit="step", file=sys.stderr,
            disable=not show, leave=False) as bar:
        for index, (start, stop) in enumerate(bounds):
            share = None
            if time_budget is not None:
                left = time_budget - (time.perf_counter() - started)
                share = max(left, 0.0) / (len(bounds) - index)
            begun = time.perf_counter()
            if time_budget is not None:  # timed: no longer bit-for-bit the same per seed
                torch.set_num_threads(_fastest_threads(
                    [x[start:start + START_ROWS] for x in xs], lowered, loss_of, threads))
            batch, scale = _fit_start([x[start:stop] for x in xs], lowered, loss_of)
            taken, why, losses = _optimize(batch, lowered, loss_of, steps=steps, lr=lr * scale,
                                           deadline=None if share is None else begun + share,
                                           tolerance=tolerance, patience=patience, bar=bar)
            bar.update(steps - taken)  # a batch that stopped early gives back its steps
            for x, part in zip(xs, batch, strict=True):
                x[start:stop] = part.detach()
            run.steps.append(taken)
            run.stopped.append(why)
            run.losses.append(losses)
    run.seconds = time.perf_counter() - started
    logger.info(
        "zero-shot calibration: %d samples in %d batch(es), steps %s (%s), %d BatchNorm layers, "
        "loss %s, %.1f s", samples, len(bounds), run.steps, ", ".join(run.stopped), len(names),
        ", ".join(f"{a:.4g} -> {b:.4g}" for a, b in run.losses), run.seconds,
    )
    run.feeds = {
        value.name or "": x.numpy().astype(
            value.dtype.numpy() if value.dtype is not None else np.float32
        )
        for value, x in zip(inputs, xs, strict=True)
    }
    return run


@contextlib.contextmanager
def _restored_threads(threads: int) -> Iterator[None]:
    """Set torch's intra-op thread count back to `threads` on the way out."""
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fastest_threads(rows: list[torch.Tensor], lowered: torch.nn.Module,
                     loss_of: Callable[..., torch.Tensor], threads: int) -> int:
    """`threads` or 1, whichever runs a forward and backward pass on `rows` faster (best of 3).

    On cores other processes keep busy, torch's threads wait on each other at every op: a step
    of a MobileNetV3-small at 224x224 took about 6 s on 2 threads and 0.6 s on 1 with a test
    suite on the other core.
    """
    if threads <= 1:
        return threads
    batch = [x.clone().requires_grad_(True) for x in rows]
    seconds = {threads: math.inf, 1: math.inf}
    for count in (threads, threads, 1, 1, threads, 1):  # the first pass warms up
        torch.set_num_threads(count)
        begun = time.perf_counter()
        loss_of(lowered(*batch)).backward()
        seconds[count] = min(seconds[count], time.perf_counter() - begun)
    logger.debug("seconds of a pass by threads: %s", seconds)
    return min(seconds, key=lambda count: seconds[count])


# The start: `START_STEPS` Adam steps (lr 0.1 on the logarithm of the scale) on `START_ROWS`
# rows fit a shift and a scale per input channel to the noise before the rows themselves move.
START_STEPS = 30
START_ROWS = 4


def _fit_start(noise: list[torch.Tensor], lowered: torch.nn.Module,
               loss_of: Callable[..., torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """Shift and scale the starting noise per input channel (axis 1) to lower the loss.

    N(0, 1) noise can be far from the inputs a network was trained on (a MobileNetV3-small on
    images in [0, 1]: the loss of N(0, 1) is 200 times that of real images, and zeros do better
    than it); a shift `m` and a scale `s` per channel, fitted on the first `START_ROWS` rows, give
    `m + s * noise`, whose loss is several times lower. Returns those inputs (requiring grad) and
    the mean scale, the unit of the rows' learning rate.
    """
    shifts = [torch.zeros([1, z.shape[1], *[1] * (z.dim() - 2)] if z.dim() >= 2 else [1])
              .requires_grad_(True) for z in noise]
    logs = [torch.zeros_like(m).requires_grad_(True) for m in shifts]
    optimizer = torch.optim.Adam([*shifts, *logs], lr=0.1)
    few = [z[:START_ROWS] for z in noise]
    best, kept = math.inf, [(m.detach().clone(), s.detach().clone()) for m, s in zip(
        shifts, logs, strict=True)]
    for _ in range(START_STEPS):
        loss = loss_of(lowered(*[m + torch.exp(s) * z for m, s, z in zip(
            shifts, logs, few, strict=True)]))
        value = float(loss.detach())
        if value < best:
            best = value
            kept = [(m.detach().clone(), s.detach().clone()) for m, s in zip(
                shifts, logs, strict=True)]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scale = float(torch.cat([torch.exp(s).flatten() for _, s in kept]).mean())
    logger.debug("start: loss %.4g on %d rows, mean scale %.3g", best, START_ROWS, scale)
    return [(m + torch.exp(s) * z).requires_grad_(True)
            for (m, s), z in zip(kept, noise, strict=True)], scale


def _optimize(
    batch: list[torch.Tensor], lowered: torch.nn.Module, loss_of: Callable[..., torch.Tensor],
    *, steps: int, lr: float, deadline: float | None, tolerance: float, patience: int,
    bar: Any,
) -> tuple[int, str, tuple[float, float]]:
    """Adam on `batch` until the loss plateaus, `steps`, or `deadline`; `batch` ends holding the
    inputs of the lowest loss seen. Returns (steps taken, why it stopped, (first loss, lowest
    loss))."""
    optimizer = torch.optim.Adam(batch, lr=lr)
    best: list[float] = []  # the lowest loss after each step
    kept: list[torch.Tensor] = []
    first = math.nan
    taken, why = steps, "steps"
    for step in range(steps):
        loss = loss_of(lowered(*batch))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise UnsupportedModelError(
                f"zero-shot calibration diverged at step {step} (loss {value})"
            )
        if step == 0:
            first = value
        if not best or value < best[-1]:
            kept = [x.detach().clone() for x in batch]  # the inputs this loss was measured on
        best.append(min(value, best[-1]) if best else value)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4g}", refresh=False)
        if tolerance > 0 and len(best) >= 2 * patience and (
            best[-patience - 1] - best[-1] < tolerance * best[-patience - 1]
        ):
            taken, why = step + 1, "converged"
            break
        if deadline is not None and time.perf_counter() >= deadline:
            taken, why = step + 1, "time"
            break
    with torch.no_grad():
        for x, lowest in zip(batch, kept, strict=False):  # none kept: no step taken
            x.copy_(lowest)
    return taken, why, (first, best[-1] if best else math.nan)


def _check(*, samples: int, steps: int, batch_size: int, time_budget: float | None,
           tolerance: float, patience: int) -> None:
    if samples < 2:
        raise BadOptionError(f"zero-shot calibration needs at least 2 samples, got {samples}")
    if steps < 0:
        raise BadOptionError(f"steps must be >= 0, got {steps}")
    if batch_size < 2:
        raise BadOptionError(f"batch_size must be at least 2, got {batch_size}")
    if time_budget is not None and not time_budget > 0:
        raise BadOptionError(f"time_budget must be positive seconds, got {time_budget:g}")
    if tolerance < 0 or patience < 1:
        raise BadOptionError(
            f"tolerance must be >= 0 and patience >= 1, got {tolerance:g} and {patience}"
        )
