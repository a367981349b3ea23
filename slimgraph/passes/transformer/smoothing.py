"""SmoothQuant's rewrite on transformer blocks: where the outliers are, and moving them.

The targets are normalization outputs read by MatMuls with constant [K, N] weights (the Q/K/V
projections and the FFN's first layer): LayerNormalization (last axis, constant gain and bias),
`com.microsoft.SkipLayerNormalization` (output 0) and onnxruntime's
SimplifiedLayerNormalization (RMSNorm, as `fuse-rms-norm` writes it). For each channel j,

    s_j = max|X_j| ** alpha / max|W_j, :| ** (1 - alpha)

and X / s, s * W compute the same product. The division folds into the normalization's gain
(and bias) when the MatMuls are X's only readers (pre-norm blocks: GPT, Llama); otherwise
(post-norm BERT, where X is also the residual) a `Mul(X, 1/s)` is inserted in front of the
MatMuls only. Exact in float (tested at rtol 1e-4); `slimgraph.passes.quantize.smoothquant`
measures max|X_j| on calibration data, searches alpha and quantizes.

Source: Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from slimgraph.ir import copy_model
from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes._kit import Names, add_initializer, constant_array

__all__ = [
    "SmoothTarget", "smooth_targets", "apply_smoothing", "smooth", "norm_params", "S_RANGE",
]

S_RANGE = (1e-5, 1e5)


@dataclasses.dataclass
class SmoothTarget:
    """An activation to smooth: its name, the LayerNorm making it, the MatMuls reading it.

    `gain_index`/`bias_index`: the LayerNorm's gain and bias inputs (None when not foldable);
    `foldable`: the MatMuls are the activation's only readers.
    """

    value: str
    norm: ir.Node
    matmuls: list[ir.Node]
    foldable: bool
    gain_index: int
    bias_index: int | None


def _norm_params(node: ir.Node) -> tuple[int, int | None] | None:
    if is_onnx_op(node, "LayerNormalization"):
        if node.attributes.get_int("axis", -1) not in (-1,):
            rank = len(node.inputs[0].shape) if node.inputs[0] and node.inputs[0].shape else None
            if rank is None or node.attributes.get_int("axis", -1) != rank - 1:
                return None
        return 1, (2 if len(node.inputs) > 2 and node.inputs[2] is not None else None)
    if node.domain == "com.microsoft" and node.op_type == "SkipLayerNormalization":
        return 2, (3 if len(node.inputs) > 3 and node.inputs[3] is not None else None)
    if node.op_type == "SimplifiedLayerNormalization" and node.domain in ("", "com.microsoft"):
        if node.attributes.get_int("axis", -1) != -1:
            return None
        return 1, None
    return None


def norm_params(node: ir.Node) -> tuple[int, int | None] | None:
    """The (gain, bias) input indices of a normalization over the last axis whose output
    channels a per-channel factor can be folded into (bias None when it has none), else None."""
    return _norm_params(node)


def smooth_targets(model: ir.Model) -> list[SmoothTarget]:
    """The LayerNorm outputs read by MatMuls with a constant [K, N] weight (see module doc)."""
    targets = []
    for node in model.graph:
        params = _norm_params(node)
        if params is None:
            continue
        gain = constant_array(node.inputs[params[0]])
        if gain is None or gain.ndim != 1:
            continue
        out = node.outputs[0]
        matmuls, others = [], 0
        for use in out.uses():
            reader = use.node
            weight = constant_array(reader.inputs[1]) if is_onnx_op(reader, "MatMul") else None
            if use.idx == 0 and weight is not None and weight.ndim == 2 and (
                weight.shape[0] == gain.shape[0]
            ):
                matmuls.append(reader)
            else:
                others += 1
        if not matmuls or out.name is None:
            continue
        bias_ok = params[1] is None or constant_array(node.inputs[params[1]]) is not None
        foldable = others == 0 and not out.is_graph_output() and bias_ok
        targets.append(SmoothTarget(out.name, node, matmuls, foldable, params[0], params[1]))
    return targets


def _factors(target: SmoothTarget, absmax: np.ndarray, alpha: float) -> np.ndarray:
    weights = [constant_array(m.inputs[1]) for m in target.matmuls]
    w_max = np.max([np.abs(w).max(axis=1) for w in weights if w is not None], axis=0)
    x_max = absmax.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(x_max, alpha) / np.power(w_max.astype(np.float64), 1.0 - alpha)
    s = np.where((x_max > 0) & (w_max > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, *S_RANGE).astype(np.float32)


def apply_smoothing(model: ir.Model, absmax: Mapping[str, np.ndarray],
                    alpha: float) -> ir.Model:
    """A copy of `model` with every smooth target rewritten for `alpha` (exact in float)."""
    return smooth(model, absmax, alpha)[0]


def smooth(
    model: ir.Model, absmax: Mapping[str, np.ndarray], alpha: float
) -> tuple[ir.Model, dict[str, tuple[str, np.ndarray]]]:
    """`apply_smoothing`, also returning what became X / s: smoothed value -> (the target value
    X, the factors s). The smoothed value is X itself where the division folds into the
    normalization, else the inserted Mul's output."""
    divided: dict[str, tuple[str, np.ndarray]] = {}
    smoothed = copy_model(model)
    graph = smoothed.graph
    names = Names(graph)
    for target in smooth_targets(smoothed):
        if target.value not in absmax:
            continue
        s = _factors(target, absmax[target.value], alpha)
        for matmul in target.matmuls:
            weight = constant_array(matmul.inputs[1])
            assert weight is not None
            hint = names.fresh(f"{matmul.inputs[1].name or 'weight'}_smooth")  # type: ignore[union-attr]
            matmul.replace_input_with(1, add_initializer(graph, hint, weight * s[:, None]))
        norm = target.norm
        if target.foldable:
            indices = [target.gain_index] + ([target.bias_index] if target.bias_index else [])
            for index in indices:
                array = constant_array(norm.inputs[index])
                assert array is not None
                hint = names.fresh(f"{norm.inputs[index].name or 'norm'}_smooth")  # type: ignore[union-attr]
                norm.replace_input_with(index, add_initializer(graph, hint, (array / s).astype(
                    array.dtype)))
            divided[target.value] = (target.value, s)
        else:
            inverse = add_initializer(graph, names.fresh(f"{target.value}_smooth_inv"),
                                      (1.0 / s).astype(np.float32))
            mul = ir.node("Mul", [norm.outputs[0], inverse], name=names.fresh(
                f"{norm.name or 'norm'}_smooth"))
            smoothed_name = names.fresh(f"{target.value}_smoothed")
            mul.outputs[0].name = smoothed_name
            if norm.outputs[0].dtype is not None:
                mul.outputs[0].dtype = norm.outputs[0].dtype
            mul.outputs[0].shape = norm.outputs[0].shape
            mul.metadata_props.update(norm.metadata_props)
            graph.insert_after(norm, mul)
            for matmul in target.matmuls:
                matmul.replace_input_with(0, mul.outputs[0])
            divided[smoothed_name] = (target.value, s)
    return smoothed, divided


