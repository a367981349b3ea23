"""Preparation for pruning: weights, shapes and axes as initializers, static shapes inferred."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from slimgraph.ir import copy_model

__all__ = ["prepare_for_pruning", "reinfer_shapes"]

_FOLD_LIMIT = 1 << 40  # fold weights of any size (zoo models build theirs with ConstantOfShape)


def prepare_for_pruning(model: ir.Model) -> ir.Model:
    """A copy of `model` with constants folded and lifted to initializers and shapes inferred.

    Exact: only constant subgraphs are evaluated. Pruning needs weights, Reshape shapes and axes
    as initializers, and static channel counts.
    """
    import onnxscript.optimizer

    prepared = copy_model(model)
    ir_common.RemoveInitializersFromInputsPass()(prepared)
    onnxscript.optimizer.fold_constants(
        prepared,
        input_size_limit=_FOLD_LIMIT,
        output_size_limit=_FOLD_LIMIT,
        should_fold=_fold_constant_of_shape,
    )
    ir_common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(prepared)
    ir_common.RemoveUnusedNodesPass()(prepared)
    ir_common.ShapeInferencePass(strict_mode=False)(prepared)
    return prepared


def _fold_constant_of_shape(node: ir.Node) -> bool | None:
    """onnxscript keeps ConstantOfShape by default; pruning needs those weights as tensors."""
    return True if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx") else None


def reinfer_shapes(model: ir.Model) -> None:
    """Drop unused nodes and infer every node output's shape again (after channels changed).

    onnx_ir's shape inference only writes the shapes it finds: the stale ones are cleared first.
    """
    for node in model.graph:
        for value in node.outputs:
            value.shape = None
    ir_common.RemoveUnusedNodesPass()(model)
    ir_common.ShapeInferencePass(strict_mode=False)(model)
