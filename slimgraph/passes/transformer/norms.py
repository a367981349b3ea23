"""Exact fusions around attention: bias + Gelu, residual + LayerNorm, residual Adds as Sum.

- `fuse-bias-gelu`: Add(bias) + Gelu (erf form) becomes `com.microsoft.BiasGelu`
  (onnxscript's rule, `onnxscript.rewriter.ort_fusions.bias_gelu`).
- `fuse-skip-layernorm`: residual Add (+ bias) + LayerNormalization becomes
  `com.microsoft.SkipLayerNormalization` (onnxscript's rules). Not in the `transformer` preset:
  onnxruntime 1.32's CPU kernel for it is several times slower than Add + LayerNormalization
  (measured, see `slimgraph.passes.TRANSFORMER_STEPS`); for other execution providers or
  versions, add it to a recipe.
- `fuse-rms-norm`: RMS normalization as exporters write it (`x * 1/sqrt(mean(x^2) + eps) *
  gamma`: Llama, Mistral, Qwen2, T5) becomes onnxruntime's SimplifiedLayerNormalization
  (registered in the default domain; onnxscript's rules,
  `onnxscript.rewriter.ort_fusions.rms_normalization`): seven kernels into one on
  onnxruntime's CPU, where the session optimizer leaves them apart.
- `residual-sum`: the residual Add read by a LayerNormalization becomes Sum, which
  onnxruntime's session optimizer does not fuse into its slower SkipLayerNormalization.

All exact. fuse-skip-layernorm and fuse-bias-gelu apply onnxscript's rule sets through
`fuse_rules.run_rules`, so their checks' reasons are recorded as skipped nodes.

Source: onnxruntime contrib op specs (SkipLayerNormalization, BiasGelu).
"""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter.pattern import RewriteRuleSet

from slimgraph.passes._graph_utils import is_onnx_op, replace_output
from slimgraph.passes.base import SlimgraphPass
from slimgraph.passes.fuse_rules import run_rules
from slimgraph.passes.registry import register_pass
from slimgraph.passes.transformer._emit import MS_DOMAIN
from slimgraph.passes.transformer.attention import TransformerFusionResult

__all__ = ["FuseSkipLayerNormPass", "FuseBiasGeluPass", "FuseRmsNormPass", "ResidualSumPass",
           "has_residual_sums"]


def _onnxscript_fusion(
    model: ir.Model, rules: RewriteRuleSet, label: str
) -> TransformerFusionResult:
    """Apply one of onnxscript's rule sets; its checks' reasons become the skipped records."""
    count, skipped = run_rules(model, rules)
    if count:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        common.RemoveUnusedNodesPass()(model)
    fused = {label: count} if count else {}
    return TransformerFusionResult(model, bool(count), skipped=skipped, fused=fused)


@register_pass("fuse-skip-layernorm", exact=True)
class FuseSkipLayerNormPass(SlimgraphPass):
    """Residual Add (+ bias Add) + LayerNormalization over the last axis becomes
    `com.microsoft.SkipLayerNormalization`; exact. onnxscript's rules (they check [B, S, D]
    shapes, 1-D gamma/beta/bias and stash_type 1)."""

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> TransformerFusionResult:
        from onnxscript.rewriter.ort_fusions.skip_normalization import (
            skip_layer_normalization_ruleset,
        )

        return _onnxscript_fusion(model, skip_layer_normalization_ruleset, "skip_layernorm")


@register_pass("fuse-bias-gelu", exact=True)
class FuseBiasGeluPass(SlimgraphPass):
    """Add(x, bias[D]) + Gelu (exact erf form) becomes `com.microsoft.BiasGelu`; exact.
    onnxscript's rule (`approximate="tanh"` is left alone)."""

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> TransformerFusionResult:
        from onnxscript.rewriter.ort_fusions.bias_gelu import bias_gelu_rules

        return _onnxscript_fusion(model, bias_gelu_rules, "bias_gelu")



@register_pass("fuse-rms-norm", exact=True)
class FuseRmsNormPass(SlimgraphPass):
    """`Mul(x, Reciprocal(Sqrt(ReduceMean(Pow(x, 2)) + eps))) * gamma` (the RMS normalization of
    the last axis) becomes onnxruntime's SimplifiedLayerNormalization; exact. onnxscript's
    rules (they check a float epsilon and float input, scale and compute types)."""

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> TransformerFusionResult:
        from onnxscript.rewriter.ort_fusions.rms_normalization import (
            rms_normalization_ruleset,
        )

        return _onnxscript_fusion(model, rms_normalization_ruleset, "rms_norm")


# ---------------------------------------------------------------- residual Add -> Sum


def _residual_add(node: ir.Node) -> bool:
    """An Add of two computed values whose output a LayerNormalization normalizes."""
    if not is_onnx_op(node, "Add") or len(node.inputs) != 2:
        return False
    if any(v is None or v.const_value is not None or v.is_graph_input() for v in node.inputs):
        return False
    return any(is_onnx_op(u.node, "LayerNormalization") and u.idx == 0
               for u in node.outputs[0].uses())


def has_residual_sums(model: ir.Model) -> bool:
    """Whether `model` has a `Sum` feeding a LayerNormalization (`residual-sum` ran on it)."""
    return any(is_onnx_op(n, "Sum") and any(is_onnx_op(u.node, "LayerNormalization")
                                            for u in n.outputs[0].uses()) for n in model.graph)


@register_pass("residual-sum", exact=True)
class ResidualSumPass(SlimgraphPass):
    """The residual `Add(a, b)` in front of a LayerNormalization becomes `Sum(a, b)`; exact.

    Same arithmetic, different op type: onnxruntime's graph optimizer rewrites Add (+ bias Add)
    + LayerNormalization into its SkipLayerNormalization at session creation, and in onnxruntime
    1.32 that CPU kernel is slower than the plain ops. On the 6x384 BERT-style encoder after
    dynamic int8, blocking the fusion this way (`disabled_optimizers=["SkipLayerNormFusion"]`
    gave the same) cut CPU time per run to 0.84x at batch 8 and 0.83x at batch 1 (one thread).
    Quantization keeps it: `quantize` re-applies it when its input had such Sums.
    """

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> TransformerFusionResult:
        graph = model.graph
        count = 0
        for node in [n for n in graph if _residual_add(n)]:
            total = ir.node("Sum", list(node.inputs), name=node.name, doc_string=node.doc_string)
            total.metadata_props.update(node.metadata_props)
            total.outputs[0].type = node.outputs[0].type
            total.outputs[0].shape = node.outputs[0].shape
            graph.insert_before(node, total)
            replace_output(node.outputs[0], total.outputs[0])
            graph.remove(node, safe=True)
            count += 1
        fused = {"residual_sum": count} if count else {}
        return TransformerFusionResult(model, bool(count), fused=fused)
