"""What `slimgraph auto` tries: the bounded search space, as `sweep` grids run one after another.

The model's kind decides the candidates (`plan`):

- a model with attention (a Softmax fed by a MatMul, or fused attention already): the
  `transformer` preset's exact fusions (attention, bias + GELU, residual sums) with and without
  dynamic int8 (per-channel weights), the fusions alone, dynamic int8 on the graph's own ops, and
  int4 weight-only where the timed batch gives each MatMul fewer than 8 rows (above that, int4's
  MatMulNBits is slower than int8 on onnxruntime's CPU kernels); with `--train`, head-free channel
  pruning is not tried (an encoder's hidden width is shared by every residual sum);
- any other model: structured channel pruning at a few global ratios (0.5, 0.6, 0.7; kept
  counts rounded to multiples of 8, what runs fast on onnxruntime's kernels), with knowledge
  distillation from the input model on `--train` after pruning (without training data only the
  mildest ratio, whose loss the budget judges), each with and without static int8 (per-channel,
  calibrated); static and dynamic int8 alone (dynamic int8 is not combined with pruning: on
  convolutions it quantizes little and adds distillation runs to the search); with `--train`,
  low-rank factorization (rank ratio 0.5) + distillation, with and without static int8.

Sensitive layers are not excluded by name: the prune pass leaves a model's outputs and the
groups it cannot prune exactly whole, and distillation recovers the rest; the budget then judges
every candidate on the validation data. Each grid is one `sweep` (a dask.distributed cluster,
candidates in parallel, latency measured side by side afterwards); the grids run in order, most
promising first (with training data pruning + distillation, without it precision alone), so a
time budget that stops the search early keeps the likeliest winners.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["Stage", "plan", "has_attention", "matmul_rows"]

# Global channel-pruning ratios tried with training data (distillation recovers them), and
# without (only a mild one: nothing recovers the loss).
PRUNE_RATIOS_TRAINED = (0.5, 0.6, 0.7)
PRUNE_RATIOS_UNTRAINED = (0.3,)
# Kept channel counts are multiples of this (onnxruntime's convolution and GEMM kernels run
# vector widths of 8 floats; odd counts are slower than the unpruned layer).
ROUND_TO = 8
# Rank ratio of the low-rank candidates (with training data only).
RANK_RATIO = 0.5
# int4 weight-only only below this many rows per MatMul (batch x sequence).
INT4_MAX_ROWS = 8


@dataclass(frozen=True)
class Stage:
    """One sweep of the search: a name for the report and the grid (`slimgraph.api.sweep`)."""

    name: str
    grid: dict[str, Any]
    needs_calibration: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)


def has_attention(model: ir.Model) -> bool:
    """Whether the graph computes attention: a Softmax whose input comes from a MatMul (through
    any Add/Mul/Div/Where masking or scaling), or an already fused attention op."""
    fused = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "QAttention"}
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    if any(node.op_type in fused for node in nodes):
        return True
    for node in nodes:
        if node.op_type != "Softmax":
            continue
        frontier = [node.inputs[0]] if node.inputs else []
        for _ in range(6):  # a few scaling/masking steps back
            producers = [v.producer() for v in frontier if v is not None and v.producer()]
            if any(p is not None and p.op_type == "MatMul" for p in producers):
                return True
            frontier = [i for p in producers if p is not None for i in p.inputs]
    return False


def matmul_rows(feed: Mapping[str, np.ndarray]) -> int:
    """Rows a MatMul sees for one timed run of `feed`: batch x sequence for token inputs (an
    integer input of rank 2), else the batch (the first dimension of the first input)."""
    for value in feed.values():
        if np.issubdtype(value.dtype, np.integer) and value.ndim == 2:
            return int(value.shape[0] * value.shape[1])
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def plan(
    model: ir.Model,
    *,
    train: str | None,
    calibration: bool,
    rows: int,
    epochs: int,
) -> list[Stage]:
    """The sweeps `auto` runs on `model`, in order.

    Args:
        model: the input model.
        train: absolute path of the training .npz (distillation after pruning/low-rank), or None.
        calibration: whether calibration data exists (static int8 candidates).
        rows: rows per MatMul at the timed batch (`matmul_rows`).
        epochs: distillation epochs per candidate.

    Returns:
        The stages, most promising first; each grid's candidates run in parallel.
    """
    if has_attention(model):
        return _transformer_plan(rows)
    return _general_plan(train=train, calibration=calibration, epochs=epochs)


def _transformer_plan(rows: int) -> list[Stage]:
    quantize: list[Any] = ["dynamic"]  # the pipeline's dynamic int8: no fusions of its own
    notes = []
    if rows < INT4_MAX_ROWS:
        quantize.append("int4")
    else:
        notes.append(f"int4 weight-only not tried: {rows} rows per MatMul at this batch "
                     f"(it is slower than int8 from {INT4_MAX_ROWS} rows on)")
    return [
        Stage("fusions + dynamic int8", {"transformer": [True], "quantize": ["none", "dynamic"]},
              notes=tuple(notes)),
        Stage("precision alone", {"quantize": quantize}),
    ]


def _general_plan(*, train: str | None, calibration: bool, epochs: int) -> list[Stage]:
    int8 = ["int8"] if calibration else []
    ratios = PRUNE_RATIOS_TRAINED if train else PRUNE_RATIOS_UNTRAINED
    stages = []
    pruned: dict[str, Any] = {"prune": {"ratio": list(ratios), "round_to": ROUND_TO}}
    if train:
        pruned["finetune"] = {"epochs": [epochs], "data": train}
    pruned["quantize"] = ["none", *int8]
    stages.append(Stage("channel pruning" + (" + distillation" if train else ""), pruned,
                        needs_calibration=calibration))
    precision = Stage("precision alone", {"quantize": ["dynamic", *int8]},
                      needs_calibration=calibration)
    # without training data precision is the likelier winner: it runs first
    stages.insert(1 if train else 0, precision)
    if train:
        stages.append(Stage("low-rank + distillation", {
            "factorize": [RANK_RATIO], "finetune": {"epochs": [epochs], "data": train},
            "quantize": ["none", *(["int8"] if calibration else [])]},
            needs_calibration=calibration))
    return stages
