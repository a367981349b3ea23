"""Unstructured magnitude pruning: zero the smallest weights; shapes and the file size stay."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from slimgraph.errors import UnsupportedModelError
from slimgraph.ir import analysis as ir_analysis
from slimgraph.ir import display_name
from slimgraph.passes._kit import Names
from slimgraph.passes.prune._report import LayerSparsity
from slimgraph.passes.prune._surgery import replace_constant
from slimgraph.passes.prune.channels import LAYER_OPS

__all__ = ["zero_smallest_weights"]


def zero_smallest_weights(
    model: ir.Model, ratio: float, scope: str, excluded: Callable[[ir.Node], bool]
) -> list[LayerSparsity]:
    """Zero the `ratio` smallest-magnitude weights of every Conv, ConvTranspose, Gemm and MatMul
    not `excluded` (in place): per layer (`scope="local"`) or below one global threshold.

    Returns:
        Elements and zeros of each weight after.

    Raises:
        UnsupportedModelError: no such layer has a constant weight.
    """
    graph = model.graph
    weights = []
    for node, found in ir_analysis.node_weights(graph).items():
        if node.op_type in LAYER_OPS and not excluded(node) and found.weight is not None:
            assert found.weight.const_value is not None
            index = list(node.inputs).index(found.weight)
            weights.append((node, index, found.weight.const_value.numpy()))
    if not weights:
        raise UnsupportedModelError(
            "nothing to prune: no Conv, Gemm or MatMul with constant weights"
        )
    threshold = None
    if scope == "global":
        magnitudes = np.concatenate([np.abs(w).ravel() for _, _, w in weights])
        count = int(magnitudes.size * ratio)
        threshold = np.partition(magnitudes, count - 1)[count - 1] if count else -1.0
    report = []
    names = Names(graph)
    for node, index, array in weights:
        magnitude = np.abs(array)
        if threshold is not None:
            mask = magnitude <= threshold
        else:
            count = int(array.size * ratio)
            mask = np.zeros(array.size, bool)
            mask[np.argsort(magnitude.ravel(), kind="stable")[:count]] = True
            mask = mask.reshape(array.shape)
        pruned = np.where(mask, np.zeros_like(array), array)
        replace_constant(node, index, pruned, names)
        zeros = int((pruned == 0).sum())
        report.append(LayerSparsity(display_name(node), node.op_type, int(array.size), zeros))
    return report
