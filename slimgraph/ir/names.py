"""How reports name a node: its torch layer when known, else its node name.

`layer_name` is the torch module path a node came from; `display_name` is what reports show.
`from_torch` records each node's module path in metadata `pkg.slimgraph.layer`
(`annotate_layers`); a model exported elsewhere is named from its weights' names and the
exporter's name scopes. Every report, selection pattern and refusal names nodes through here.
"""

from __future__ import annotations

import ast

import onnx_ir as ir

from slimgraph.ir.metadata import LAYER, TORCH_NAME_SCOPES

__all__ = ["layer_name", "display_name", "annotate_layers"]

_WEIGHT_SUFFIXES = (".weight", ".bias", ".running_mean", ".running_var", ".in_proj_weight")
# What torch.export writes as the module stack of a node a pass created with no module to copy
# (torch/_export/passes/_node_metadata_hook.py): no module at all, not a layer.
_NO_MODULE = "_empty_nn_module_stack_from_metadata_hook"


def annotate_layers(model: ir.Model) -> None:
    """Write each node's torch module path into metadata `pkg.slimgraph.layer`."""
    for node in model.graph.all_nodes():
        layer = layer_name(node)
        if layer:
            node.metadata_props[LAYER] = layer


def display_name(node: ir.Node, index: int | None = None) -> str:
    """The name a report shows for `node`: its torch layer when known, else its node name,
    else its op type (`Conv#3` with `index`, the node's position, to keep unnamed nodes apart).
    """
    if found := layer_name(node) or node.name:
        return found
    return node.op_type if index is None else f"{node.op_type}#{index}"


def layer_name(node: ir.Node) -> str:
    """The torch module path a node came from, or '' when unknown.

    Weights decide first: a node reading initializer `layer1.0.conv1.weight` belongs to
    `layer1.0.conv1`. Otherwise the exporter's name scopes decide: the last module path before
    the FX node's own name (`['', 'layer1', 'layer1.0', 'add']` gives `layer1.0`). torch's
    placeholder for a node with no module (`_empty_nn_module_stack_from_metadata_hook`) is no
    layer: ''.
    """
    if stored := node.metadata_props.get(LAYER):
        return "" if _NO_MODULE in stored.split(".") else stored
    for value in node.inputs:
        if value is not None and value.is_initializer() and value.name:
            for suffix in _WEIGHT_SUFFIXES:
                if value.name.endswith(suffix):
                    return value.name[: -len(suffix)]
    scopes_text = node.metadata_props.get(TORCH_NAME_SCOPES)
    if not scopes_text:
        return ""
    try:
        scopes = ast.literal_eval(scopes_text)
    except (ValueError, SyntaxError):
        return ""
    if not isinstance(scopes, list) or len(scopes) < 2 or scopes[-2] == _NO_MODULE:
        return ""
    return str(scopes[-2])
