"""The speed guard's baseline: the input in the form `slimgraph optimize` writes by default.

A raw export can run several times slower than its lossless-optimized form (BatchNorm not folded,
zero biases computed at run time, ...), and the README calls the optimized model the fair fp32
baseline: a compressed model is judged against it, not against the file as given. The runtime's
guard (`runtime.speed_guard`) imports no passes, so the baseline is made here, with the preset
`optimize` applies by default (`DEFAULT_PRESET`, run by the same pipeline) and handed to it.
`optimize` itself is judged against its own input.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import onnx_ir as ir

from slimgraph.errors import first_line
from slimgraph.passes.pipeline import run_pipeline
from slimgraph.runtime.speed_guard import (
    BUDGET_S,
    SpeedCheck,
    skipped_by_environment,
    speed_guard,
)

__all__ = ["DEFAULT_PRESET", "guard_speed", "speed_baseline"]

logger = logging.getLogger(__name__)

# The preset `optimize` runs when given neither a preset nor a recipe (`OptimizeOptions.preset`).
DEFAULT_PRESET = "lossless"


def speed_baseline(model: ir.Model) -> ir.Model | None:
    """`model` as `optimize` writes it by default (`DEFAULT_PRESET`, exact; not verified again
    here: its passes are), or None when the preset changes nothing, or fails on this model
    (logged; the input as given is then the baseline). `model` is not modified."""
    try:
        result = run_pipeline(model, [DEFAULT_PRESET], verify=False)
    except Exception as error:  # the baseline is a measurement aid: never fail a command on it
        logger.warning(
            "the %s preset failed on the input (%s): the speed check times the "
            "output against the input as given",
            DEFAULT_PRESET,
            first_line(error),
        )
        return None
    return result.model if result.modified else None


def guard_speed(
    reference: ir.Model,
    candidate: ir.Model,
    *,
    batches: Sequence[int] | int | None = None,
    allow_slower: bool = False,
    optimized_baseline: bool = True,
) -> SpeedCheck | None:
    """`runtime.speed_guard` against the lossless-optimized `reference` (`speed_baseline`;
    `optimized_baseline=False`: against `reference` itself, what `optimize` asks), the preset's
    time taken from the rounds' budget (at most half of `BUDGET_S`). None when
    `SLIMGRAPH_NO_SPEED_CHECK` skips the guard (then no baseline is made either).

    Raises:
        VerificationError: `candidate` is slower beyond noise and `allow_slower` is False.
        BadOptionError: a bad batch (`runtime.speed_guard.guard_batches`).
    """
    if skipped_by_environment():
        return speed_guard(reference, candidate)  # logs the skip, returns None
    start = time.perf_counter()
    baseline = speed_baseline(reference) if optimized_baseline else None
    # the preset's time comes out of the rounds' budget (at most half of it): the check keeps
    # its few seconds (MobileNetV2: 2.6 s of preset on a loaded 2-core machine)
    spent = time.perf_counter() - start
    return speed_guard(reference, candidate, baseline=baseline, batches=batches,
                       allow_slower=allow_slower,
                       budget_s=max(BUDGET_S / 2, BUDGET_S - spent))  # fmt: skip
