"""Opset conversion as a verified pass, and whether a new node is legal in a model's opset.

`ConvertOpsetPass` runs onnx's version converter as a pass (so pipelines verify it like any);
`legalize` checks a node a pass writes against the model's opset.

Exact: the converter rewrites ops to their definitions in the target opset, which compute the same
function. The model goes through a protobuf (the converter works on protos), weights included;
node metadata, which the converter drops, is carried over by node name.

`legalize` is what a pass that writes new nodes checks them with: a node must have the form its
op has in the model's opset (rewriters written for the newest opset write Unsqueeze/Squeeze/Split
and the reductions with `axes`/`split` as inputs, the opset-13/18 form, which an opset-11/12 model
cannot hold: onnxruntime refuses to load it). A constant `axes`/`split` input moves into the
attribute the older form takes; anything else the opset does not define is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnx.defs
import onnx.version_converter
import onnx_ir as ir

from slimgraph.errors import BadOptionError, UnsupportedModelError, first_line
from slimgraph.ir import copy_model
from slimgraph.passes._graph_utils import opset_version
from slimgraph.passes.base import SlimgraphFunctionalPass
from slimgraph.passes.registry import register_pass

__all__ = ["ConvertOpsetPass", "MIN_OPSET", "MAX_OPSET", "legalize"]

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
        if current == 0:  # no default-domain op to convert (an ai.onnx.ml model, say)
            result = copy_model(model)
            result.opset_imports[""] = self.opset
            return ir.passes.PassResult(result, True)
        proto = ir.to_proto(model)
        try:
            converted = onnx.version_converter.convert_version(proto, self.opset)
        except Exception as error:  # the converter raises RuntimeError/ValueError/C++ errors
            raise UnsupportedModelError(
                f"onnx's version converter cannot convert opset {current} to {self.opset}: "
                f"{first_line(error)}"
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


# Inputs that older opsets took as attributes: op type -> (input index, attribute name). The
# input form arrived in opset 13 (Unsqueeze, Squeeze, Split, ReduceSum) and 18 (the other
# reductions); `legalize` asks the opset's schema which form applies.
_INPUT_ATTRIBUTES: dict[str, tuple[int, str]] = {
    "Unsqueeze": (1, "axes"),
    "Squeeze": (1, "axes"),
    "Split": (1, "split"),
    **{
        op: (1, "axes")
        for op in (
            "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
            "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
        )
    },
}


def legalize(
    node: ir.Node, opset_imports: Mapping[str, int], constants: Mapping[int, np.ndarray]
) -> bool:
    """Make a new default-domain `node` take the form its op has in `opset_imports`, in place.

    An `axes`/`split` input of an op whose schema in that opset takes an attribute instead
    moves into the attribute when its value is known (`constants`, by input index); a node the
    opset cannot express (an op that does not exist yet, an input or attribute it does not
    take) is refused. Other domains are left as they are.

    Args:
        node: a node not yet in a graph (its inputs may still be changed).
        opset_imports: the model's opsets by domain.
        constants: the known values of the node's inputs, by input index.

    Returns:
        True when the node is valid in the opset (possibly after moving an input), False when
        the caller must not write it.
    """
    if node.domain not in ("", "ai.onnx"):
        return True
    version = opset_imports.get("", opset_imports.get("ai.onnx"))
    if version is None:
        return False
    try:
        schema = onnx.defs.get_schema(node.op_type, version, "")
    except onnx.defs.SchemaError:
        return False
    variadic = bool(schema.inputs) and (
        schema.inputs[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic
    )
    moved = _INPUT_ATTRIBUTES.get(node.op_type)
    if moved is not None and not variadic and len(node.inputs) > len(schema.inputs):
        index, attribute = moved
        value = constants.get(index)
        if index != len(node.inputs) - 1 or attribute not in schema.attributes or value is None:
            return False
        node.attributes[attribute] = ir.AttrInt64s(
            attribute, [int(v) for v in np.asarray(value).reshape(-1)]
        )
        node.resize_inputs(index)
    if not variadic and len(node.inputs) > len(schema.inputs):
        return False
    return all(name in schema.attributes for name in node.attributes)
