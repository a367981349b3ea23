"""The precision of the layers a budget search keeps out of int8: float32, or float16 weights.

Static quantization under an accuracy budget keeps its most sensitive layers float
(`slimgraph.api.budget.search_units`). Those layers' weights are stored in float32 by default
(`fallback="fp32"`); `fallback="fp16"` stores them in float16, read through a Cast to float32
(`passes.precision.store_weights_fp16`): compute stays float32, since onnxruntime's CPU provider
has no float16 Conv, Gemm or MatMul kernel on x86 (seed 003, "mixed precision": the cheapest
format that keeps the accuracy, per layer). The float16 form is kept only when it pays:

1. it shrinks the model (at least one weight of 64 or more elements converted),
2. it is not slower: both forms timed side by side (`runtime.bench.benchmark`, interleaved
   rounds, 8 rows of the budget's data); slower means the median ratio above `SLOWER` with its
   90% bootstrap interval above 1.0, in a first measurement and again in a second one twice as
   long (a shared machine can mislead one). onnxruntime folds the Cast of a constant when it
   builds a session (its optimized graph of the digits CNN with float16 weights has the same
   nodes as with float32 ones), so the two usually run the same graph;
3. the final model, float16 weights included, holds the budget (measured again on the budget's
   data; float16 rounding moves the outputs by about 2^-11 relative).

Otherwise the float32 model is kept, and `FallbackChoice.reason` says why (`sg.quantize` puts
the choice in the result's `meta[metadata.PRECISION_FALLBACK]` and its report's `fallback`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.ir import copy_model
from slimgraph.passes.precision import store_weights_fp16
from slimgraph.runtime.bench import Timing, benchmark
from slimgraph.runtime.budget import BudgetJudge
from slimgraph.runtime.metrics import Evaluation

__all__ = ["FALLBACKS", "SLOWER", "Fallback", "FallbackChoice", "check_fallback",
           "apply_fallback"]

logger = logging.getLogger(__name__)

Fallback = Literal["fp32", "fp16"]
FALLBACKS: tuple[str, ...] = ("fp32", "fp16")

# float16 weights are refused when they make the model slower by more than this (median ratio),
# beyond noise (the ratio's 90% interval above 1.0).
SLOWER = 1.03

# Side-by-side timing: rounds and the rows of the budget's data per run.
_ROUNDS = 15
_ROWS = 8


@dataclass(frozen=True)
class FallbackChoice:
    """What the layers kept out of int8 were stored in, and why.

    Attributes:
        asked: the fallback asked for ("fp32" or "fp16").
        chosen: the one written.
        layers: the nodes kept out of int8 (the budget search's).
        weights: weights stored in float16 (0 when `chosen` is "fp32").
        bytes_fp32, bytes_fp16: the serialized model with the float32 and float16 fallback
            (`bytes_fp16` None when not built).
        latency_ratio: float16 model's median latency / float32 model's, with its 90% interval
            (None when not timed).
        reason: why `chosen` (one line).
    """

    asked: str
    chosen: str
    layers: tuple[str, ...]
    weights: int
    bytes_fp32: int
    bytes_fp16: int | None
    latency_ratio: tuple[float, float, float] | None
    reason: str

    def summary(self) -> str:
        """One line for the terminal."""
        return f"fallback for {len(self.layers)} float layer(s): {self.chosen} ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "asked": self.asked, "chosen": self.chosen, "layers": list(self.layers),
            "weights": self.weights, "bytes_fp32": self.bytes_fp32,
            "bytes_fp16": self.bytes_fp16,
            "latency_ratio": None if self.latency_ratio is None else list(self.latency_ratio),
            "reason": self.reason,
        }


def check_fallback(fallback: str, *, budget: bool, mode: str | None) -> None:
    """Refuse a fallback that cannot apply, before any work.

    Raises:
        BadOptionError: an unknown fallback, or "fp16" without an accuracy budget or outside
            static mode (only static quantization's budget search keeps layers float).
    """
    if fallback not in FALLBACKS:
        raise BadOptionError(f"unknown fallback '{fallback}' (choose {' or '.join(FALLBACKS)})")
    if fallback == "fp16" and not budget:
        raise BadOptionError.worded(
            "{fallback} is the precision of the layers an accuracy budget keeps out of int8: "
            "give {budget} (and {data})", fallback=("fallback='fp16'", "--fallback fp16"),
            budget=("max_drop= or min_cosine=", "--max-drop or --min-cosine"),
            data=("data=", "--data"))
    if fallback == "fp16" and mode not in (None, "static"):
        raise BadOptionError.worded(
            "{fallback} applies to static quantization (its budget search keeps layers float), "
            "not {mode}", fallback=("fallback='fp16'", "--fallback fp16"),
            mode=(f"mode='{mode}'", f"--mode {mode}"))


def apply_fallback(
    model: ir.Model, layers: Sequence[str], fallback: str, judge: BudgetJudge,
    evaluation: Evaluation | None,
) -> tuple[ir.Model, Evaluation | None, FallbackChoice]:
    """`model` (a quantized model whose `layers` are float) with the fallback that pays.

    Args:
        model: the budget search's result (not modified).
        layers: the node names the search kept float.
        fallback: "fp32" (the model as it is) or "fp16" (chosen when smaller, not slower and
            within the budget; see the module docstring).
        judge: the budget, on its data.
        evaluation: the model's evaluation on the budget's data (None: not yet measured).

    Returns:
        (the model written, its evaluation when one was measured here or given, the choice).
    """
    size32 = _bytes(model)
    weights, size16, ratio = 0, None, None

    def keep(chosen: str, reason: str) -> FallbackChoice:
        return FallbackChoice(fallback, chosen, tuple(layers), weights, size32, size16, ratio,
                              reason)

    if fallback == "fp32":
        return model, evaluation, keep("fp32", "asked")
    if not layers:
        return model, evaluation, keep("fp32", "no layer kept out of int8")
    half = copy_model(model)
    stored = store_weights_fp16(half, layers)
    if not stored.modified:
        return model, evaluation, keep(
            "fp32", "no float32 weight of 64 or more elements in the float layers")
    for key, value in model.meta.items():
        half.meta[key] = value
    weights, size16 = stored.converted_initializers, _bytes(half)
    timing = _timing(model, half, judge)
    if _slower(timing):  # a loaded machine can mislead one measurement: confirm with another
        timing = _timing(model, half, judge, rounds=2 * _ROUNDS)
    ratio = (timing.ratio, timing.ratio_low, timing.ratio_high)
    logger.info("fp16 fallback: %d weights, %d -> %d bytes, latency %.3fx (%.2f-%.2f)",
                weights, size32, size16, *ratio)
    if size16 >= size32:
        return model, evaluation, keep("fp32", f"fp16 not smaller ({size16} >= {size32} bytes)")
    latency = f"{timing.ratio:.2f}x latency ({timing.ratio_low:.2f}-{timing.ratio_high:.2f})"
    if _slower(timing):
        return model, evaluation, keep("fp32", f"fp16 slower: {latency}")
    checked = judge.evaluate(half)
    if not judge.holds(checked):
        missed = "; ".join(m[0] for m in judge.misses(checked))
        return model, evaluation, keep("fp32", f"fp16 misses the budget: {missed}")
    return half, checked, keep("fp16", f"{weights} weight(s) in float16: {size16 / size32:.3f}x "
                                       f"the bytes at {latency}, budget held")


def _timing(model: ir.Model, half: ir.Model, judge: BudgetJudge, *, rounds: int = _ROUNDS
            ) -> Timing:
    """The float16 model's latency against the float32 one's, side by side on `_ROWS` rows of
    the budget's data."""
    feeds = {name: array[:_ROWS] for name, array in judge.data.feeds.items()}
    return benchmark([model, half], feeds, labels=["fp32", "fp16"], rounds=rounds,
                     warmup=2).timings[1]


def _slower(timing: Timing) -> bool:
    """Slower by more than `SLOWER`, beyond noise (the 90% interval above 1.0)."""
    return timing.ratio > SLOWER and timing.ratio_low > 1.0


def _bytes(model: ir.Model) -> int:
    """The serialized model's bytes (what `save` writes without external data)."""
    return ir.to_proto(model).ByteSize()
