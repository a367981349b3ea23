"""Preparation for pruning: weights, shapes and axes as initializers, static shapes inferred."""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from slimgraph.ir import copy_model
from slimgraph.ir._dims import example_dims, io_shapes, restore_dim_names
from slimgraph.ir.contrib_shapes import infer_shapes
from slimgraph.passes._kit import PrepareWeightsPass
from slimgraph.passes.prune._shapes import annotate_static_shapes, forget_static_shapes

__all__ = ["prepare_for_pruning", "reinfer_shapes"]


def prepare_for_pruning(
    model: ir.Model, dim_values: Mapping[str, int] | None = None
) -> ir.Model:
    """A copy of `model` with constants folded and lifted to initializers and shapes inferred.

    Exact: common subexpressions merged first (the exporter transposes a weight shared across
    layers once per use; merged, it folds to one shared initializer, not one copy per use), then
    only constant subgraphs are evaluated (`PrepareWeightsPass(scope="all")`: every constant
    subgraph, ConstantOfShape included, no initializer left as a graph input). Pruning needs
    weights, Reshape shapes and axes as initializers, and static channel counts. Every value's
    shape at fixed symbolic sizes is recorded for the channel tracing
    (`_shapes.annotate_static_shapes`): views computed from the symbolic batch have
    no static shape of their own. The sizes are `dim_values` by name, else the export's example
    sizes (`slimgraph.ir._dims.example_dims`, recorded by `from_torch`), else 1: an audio model's
    sample count of 1 would make its convolutions' outputs negative.
    """
    prepared = copy_model(model)
    ir_common.CommonSubexpressionEliminationPass()(prepared)
    for _ in range(2):  # again once shapes are known: `Reshape(x, Shape(y))` of equal shapes
        PrepareWeightsPass(scope="all")(prepared)  # (GroupNorm as exported) becomes Identity
        ir_common.ShapeInferencePass(strict_mode=False)(prepared)
    sizes = {**example_dims(model), **(dim_values or {})}
    annotate_static_shapes(prepared, sizes)
    return prepared


def reinfer_shapes(model: ir.Model) -> None:
    """Drop unused nodes and infer every node output's shape again (after channels changed).

    onnx_ir's shape inference only writes the shapes it finds: the stale ones are cleared first.
    onnxruntime's fused ops (a transformer-preset graph) get theirs from their own rules
    (`contrib_shapes.infer_shapes`), so the values after them are shaped too.
    """
    forget_static_shapes(model.graph)
    before = io_shapes(model)  # the user's dimension names, restored after inference
    for node in model.graph:
        for value in node.outputs:
            value.shape = None
    ir_common.RemoveUnusedNodesPass()(model)
    infer_shapes(model)
    restore_dim_names(model, before)
