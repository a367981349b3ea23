"""Preparation for pruning: weights, shapes and axes as initializers, static shapes inferred."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from slimgraph.ir import copy_model
from slimgraph.passes._kit import PrepareWeightsPass

__all__ = ["prepare_for_pruning", "reinfer_shapes"]


def prepare_for_pruning(model: ir.Model) -> ir.Model:
    """A copy of `model` with constants folded and lifted to initializers and shapes inferred.

    Exact: only constant subgraphs are evaluated (`PrepareWeightsPass(scope="all")`: every
    constant subgraph, ConstantOfShape included, no initializer left as a graph input). Pruning
    needs weights, Reshape shapes and axes as initializers, and static channel counts.
    """
    prepared = copy_model(model)
    PrepareWeightsPass(scope="all")(prepared)
    ir_common.ShapeInferencePass(strict_mode=False)(prepared)
    return prepared


def reinfer_shapes(model: ir.Model) -> None:
    """Drop unused nodes and infer every node output's shape again (after channels changed).

    onnx_ir's shape inference only writes the shapes it finds: the stale ones are cleared first.
    """
    for node in model.graph:
        for value in node.outputs:
            value.shape = None
    ir_common.RemoveUnusedNodesPass()(model)
    ir_common.ShapeInferencePass(strict_mode=False)(model)
