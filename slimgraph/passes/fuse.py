"""Exact fusions: fold BatchNorm, per-channel Mul/Add and zero Pad into the layer before them.

Each pass replaces a pattern by fewer nodes computing the same function (up to float rounding, so
each is `exact = True` and verified at rtol 1e-4). The patterns are onnxscript rewrite rules, all
in one table (`slimgraph.passes.fuse_rules`); each pass applies its family of rules and reports,
in `FusionResult.skipped`, why every candidate left alone was refused. A fold only happens where
the intermediate value has exactly one reader and is not a graph output. The algebra is in
`slimgraph.passes.fuse_math`; weights are written copy-on-share through the kit.

- `fuse-batchnorm`: BN after Conv, ConvTranspose (groups included), Gemm, and after a 2-D MatMul
  with a constant weight (becomes a Gemm).
- `fold-affine`: Mul/Add/Sub by per-channel constants after Conv, ConvTranspose, Gemm or BN.
- `batchnorm-to-affine`: a BN left alone (nothing to fold it into) becomes Mul + Add (or a
  depthwise Conv).
- `fuse-pad`: a constant-zero Pad of the spatial axes folded into the next Conv's pads.
- `sum-to-add`: Sum of two inputs becomes Add (one input: removed).
- `matmul-add-to-gemm`: Add(MatMul(a, b), c) with 2-D a, b becomes Gemm (onnxscript's rules, with
  the checks Gemm needs).
- `mark-units`: Conv/ConvTranspose/Gemm/MatMul followed by Relu/Clip/HardSwish recorded as one
  unit in node metadata (`pkg.slimgraph.unit`), so quantization keeps them together.

`mark-units` stays a plain loop: it only annotates, nothing is replaced. The one-input Sum of
`sum-to-add` is removed by `bypass`, not a rule (see `SumToAddPass`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import ClassVar

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter.pattern import RewriteRuleSet

from slimgraph.ir import metadata
from slimgraph.passes._graph_utils import bypass, is_onnx_op, single_consumer
from slimgraph.passes._kit import Names
from slimgraph.passes.base import SlimgraphPass, SlimgraphPassResult
from slimgraph.passes.fuse_rules import (
    BatchNormToAffine,
    RuleEdit,
    fusion_rules,
    run_rules,
)
from slimgraph.passes.registry import register_pass

__all__ = [
    "FuseBatchNormPass",
    "FoldAffinePass",
    "BatchNormToAffinePass",
    "FusePadPass",
    "SumToAddPass",
    "MatMulAddToGemmPass",
    "MarkUnitsPass",
    "FusionResult",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FusionResult(SlimgraphPassResult):
    """How many patterns each fusion rewrote."""

    fused: dict[str, int] = dataclasses.field(default_factory=dict)


def _tidy(result: FusionResult) -> FusionResult:
    """Drop what a fusion left dead (old weights, replaced nodes), so cleanup has less to redo."""
    if result.modified:
        common.RemoveUnusedNodesPass()(result.model)
    for item in result.skipped:
        logger.debug("%s not fused: %s", item.node, item.reason)
    return result


def _fuse(
    model: ir.Model,
    family: str,
    *,
    max_rounds: int = 1,
    build: Callable[[RuleEdit], RewriteRuleSet] | None = None,
) -> FusionResult:
    """Apply the rules of `family` (a pass name in the rule table, or the set `build` makes for
    this run) and collect the counts and the skip reasons."""
    edit = RuleEdit(Names(model.graph))
    rules = build(edit) if build is not None else fusion_rules(edit, family)
    count, skipped = run_rules(model, rules, edit=edit, max_rounds=max_rounds)
    fused = {label: n for label, n in edit.fused.items() if n}
    return _tidy(FusionResult(model, bool(count), skipped=skipped, fused=fused))


@register_pass("fuse-batchnorm", exact=True)
class FuseBatchNormPass(SlimgraphPass):
    """Fold BatchNormalization into the Conv, ConvTranspose, Gemm or 2-D MatMul before it; exact.

    `W * s` on the output-channel axis, `b' = b * s + t` (`s, t`: the BN as an affine map; Gemm's
    `beta` folded into the bias). A MatMul with a 2-D input and a constant (K, N) weight followed
    by BN becomes `Gemm(x, W * s, t)`. The layer keeps its name, the BN's output its name. Each
    BN after such a layer that stays is in `skipped` with the reason (training mode, parameters
    not constant, the layer output read elsewhere, ...).
    """

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> FusionResult:
        return _fuse(model, "fuse-batchnorm")


@register_pass("fold-affine", exact=True)
class FoldAffinePass(SlimgraphPass):
    """Fold `Mul`/`Add`/`Sub` by per-channel constants into the Conv, ConvTranspose, Gemm or
    BatchNormalization before them; exact.

    `(W x + b) * k + c = (k W) x + (k b + c)` per output channel. Only constants that vary along
    the channel axis alone (or scalars) and do not broadcast the output to a bigger shape qualify;
    `k - y` (constant on the left of Sub) does not. Weights shared with other nodes are never
    changed (copy-on-share).
    """

    exact: ClassVar[bool] = True

    def __init__(self, *, max_rounds: int = 8) -> None:
        super().__init__()
        self.max_rounds = max_rounds

    def call(self, model: ir.Model) -> FusionResult:
        return _fuse(model, "fold-affine", max_rounds=self.max_rounds)


# ---------------------------------------------------------------- standalone BatchNorm


@register_pass("batchnorm-to-affine", exact=True)
class BatchNormToAffinePass(SlimgraphPass):
    """Turn a BatchNormalization with nothing to fold into into `Mul(x, s) + t`; exact.

    `s = gamma / sqrt(var + eps)`, `t = beta - mean * s`, shaped `(C, 1, ...)` to broadcast over
    the input's spatial axes; needs the input's rank (skipped, with the reason, when unknown).
    Quantizers handle Mul/Add; they do not handle a bare BatchNormalization.

    Args:
        form: "mul-add" (default), or "conv": one depthwise 1x1 Conv (`group=C`, weight `s`,
            bias `t`) for inputs with spatial axes (rank >= 3).
    """

    exact: ClassVar[bool] = True

    def __init__(self, *, form: str = "mul-add") -> None:
        super().__init__()
        if form not in ("mul-add", "conv"):
            raise ValueError(f"form must be 'mul-add' or 'conv', got {form!r}")
        self.form = form

    def call(self, model: ir.Model) -> FusionResult:
        form = self.form
        return _fuse(
            model,
            "batchnorm-to-affine",
            build=lambda edit: RewriteRuleSet([BatchNormToAffine.rule(edit, form)]),
        )


# ---------------------------------------------------------------- Pad into Conv, Sum, Gemm


@register_pass("fuse-pad", exact=True)
class FusePadPass(SlimgraphPass):
    """Fold a constant-zero Pad of the spatial axes into the Conv that reads it; exact.

    Handles Pad before opset 11 (`pads`/`value` attributes) and after (inputs, `axes` from opset
    18). The Conv must have `auto_pad` NOTSET; its pads become the sum. Negative pads (crops),
    padded batch/channel axes, and reflect/edge modes are left alone (in `skipped`, by the Pad).
    """

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> FusionResult:
        return _fuse(model, "fuse-pad")


@register_pass("sum-to-add", exact=True)
class SumToAddPass(SlimgraphPass):
    """Sum with two inputs becomes Add; Sum with one input is removed; exact.

    The one-input Sum is removed with `bypass` (as identity elimination does), not by a rule: a
    rule's replacement value takes the replaced value's name, and a graph input or initializer
    must keep its own.
    """

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> FusionResult:
        removed = 0
        for node in list(model.graph):
            inputs = [v for v in node.inputs if v is not None]
            if is_onnx_op(node, "Sum") and node.graph is not None and len(inputs) == 1:
                bypass(node, inputs[0])
                removed += 1
        result = _fuse(model, "sum-to-add")
        if removed:
            result.fused["sum"] = result.fused.get("sum", 0) + removed
            result.modified = True
        return result


@register_pass("matmul-add-to-gemm", exact=True)
class MatMulAddToGemmPass(SlimgraphPass):
    """Add(MatMul(a, b), c) with 2-D a and b becomes Gemm(a, b, c); exact.

    onnxscript's rules (also with a Transpose on a or b), both operand orders of the Add, plus
    checks that c broadcasts to the MatMul's (M, N) output (Gemm cannot grow its output).
    """

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> FusionResult:
        return _fuse(model, "matmul-add-to-gemm")


# ---------------------------------------------------------------- activation units

_UNIT_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_UNIT_ACTIVATIONS = ("Relu", "Clip", "HardSwish")


@register_pass("mark-units", exact=True, metadata_only=True)
class MarkUnitsPass(SlimgraphPass):
    """Record Conv/ConvTranspose/Gemm/MatMul followed by Relu, Clip or HardSwish as one unit.

    Both nodes get metadata `pkg.slimgraph.unit` = the layer's name (quantization then quantizes
    after the activation, not between). Only metadata changes: exact, nothing to verify.
    """

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> FusionResult:
        count = 0
        for index, layer in enumerate(model.graph):
            if not is_onnx_op(layer, *_UNIT_LAYERS) or len(layer.outputs) != 1:
                continue
            activation = single_consumer(layer.outputs[0])
            if activation is None or not is_onnx_op(activation, *_UNIT_ACTIVATIONS):
                continue
            unit = layer.name or f"{layer.op_type}_{index}"
            if not layer.name:
                layer.name = unit
            changed = False
            for node in (layer, activation):
                if node.metadata_props.get(metadata.UNIT) != unit:
                    node.metadata_props[metadata.UNIT] = unit
                    changed = True
            count += changed
        fused = {"units": count} if count else {}
        return FusionResult(model, bool(count), fused=fused)
