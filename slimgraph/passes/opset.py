"""Opset conversion with onnx's version converter, as a pass (so pipelines verify it like any).

Exact: the converter rewrites ops to their definitions in the target opset, which compute the same
function. The model goes through a protobuf (the converter works on protos), weights included;
node metadata, which the converter drops, is carried over by node name.
"""

from __future__ import annotations

import logging

import onnx
import onnx.version_converter
import onnx_ir as ir

from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import copy_model
from slimgraph.passes._graph_utils import opset_version
from slimgraph.passes.base import SlimgraphFunctionalPass
from slimgraph.passes.registry import register_pass

__all__ = ["ConvertOpsetPass", "MIN_OPSET", "MAX_OPSET"]

logger = logging.getLogger(__name__)

MIN_OPSET = 7
MAX_OPSET = onnx.defs.onnx_opset_version()


@register_pass("convert-opset", exact=True)
class ConvertOpsetPass(SlimgraphFunctionalPass):
    """Convert the default-domain opset to `opset` with `onnx.version_converter`; exact.

    Args:
        opset: the target opset (7 to the newest this onnx knows).

    Raises:
        BadOptionError: `opset` is out of range.
        UnsupportedModelError: the converter cannot convert one of the model's ops.
    """

    def __init__(self, *, opset: int) -> None:
        super().__init__()
        if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
            raise BadOptionError(
                f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, got {opset!r}"
            )
        self.opset = opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = opset_version(model, default=0)
        if current == self.opset:
            return ir.passes.PassResult(copy_model(model), False)
        proto = ir.to_proto(model)
        try:
            converted = onnx.version_converter.convert_version(proto, self.opset)
        except Exception as error:  # the converter raises RuntimeError/ValueError/C++ errors
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise UnsupportedModelError(
                f"onnx's version converter cannot convert opset {current} to {self.opset}: {first}"
            ) from error
        if converted.ir_version < proto.ir_version:
            converted.ir_version = proto.ir_version
        result = ir.from_proto(converted)
        result.meta.update(model.meta)
        _carry_node_metadata(model, result)
        return ir.passes.PassResult(result, True)


def _carry_node_metadata(source: ir.Model, target: ir.Model) -> None:
    """The converter drops every node's `metadata_props` (layer names, marks): copy them back
    by node name, so exclusions by layer still match after a conversion."""
    props = {node.name: node.metadata_props for node in source.graph.all_nodes() if node.name}
    for node in target.graph.all_nodes():
        for key, text in props.get(node.name or "", {}).items():
            node.metadata_props.setdefault(key, text)
