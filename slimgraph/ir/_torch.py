"""The torch frontend: dynamo export to `onnx_ir`, keeping each node's torch module path."""

from __future__ import annotations

import ast
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from slimgraph.errors import UnsupportedModelError
from slimgraph.ir import metadata

__all__ = ["from_torch", "layer_name"]

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".weight", ".bias", ".running_mean", ".running_var", ".in_proj_weight")


def from_torch(
    module: Any,
    args: Sequence[Any],
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset_version: int | None = None,
) -> ir.Model:
    """Export a `torch.nn.Module` with `torch.onnx.export(dynamo=True, optimize=False)`.

    The exporter's optimizer is off on purpose: it folds BatchNormalization into Conv and the fused
    node then carries the BatchNorm's scope; slimgraph's own passes do that fusion, verified.
    Every node gets its torch module path in metadata `pkg.slimgraph.layer` (see `layer_name`).

    Args:
        module: the model, in eval mode for inference export.
        args: example inputs (a tuple, as for `torch.onnx.export`; a single tensor is taken as
            the only input).
        dynamic_shapes: as for `torch.export` (e.g. `{"x": {0: "batch"}}`).
        input_names, output_names, opset_version: passed to the exporter.

    Example:
        >>> model = from_torch(net.eval(), (torch.randn(1, 3, 32, 32),))  # doctest: +SKIP
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise UnsupportedModelError(
            f"from_torch needs a torch.nn.Module, got {type(module).__name__}"
        )
    if isinstance(args, torch.Tensor):
        args = (args,)  # tuple(tensor) would split the batch into separate arguments
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous_level = registration_log.level
    registration_log.setLevel(logging.ERROR)  # "torchvision is not installed" is noise here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                tuple(args),
                dynamo=True,
                optimize=False,
                verbose=False,
                dynamic_shapes=dynamic_shapes,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset_version,
            )
        except Exception as error:  # the exporter raises many types; name the cause once
            raise UnsupportedModelError(
                f"torch.onnx.export could not export {type(module).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
            ) from error
        finally:
            registration_log.setLevel(previous_level)
    model = program.model
    annotate_layers(model)
    return model


def annotate_layers(model: ir.Model) -> None:
    """Write each node's torch module path into metadata `pkg.slimgraph.layer`."""
    for node in model.graph.all_nodes():
        layer = layer_name(node)
        if layer:
            node.metadata_props[metadata.LAYER] = layer


def layer_name(node: ir.Node) -> str:
    """The torch module path a node came from, or '' when unknown.

    Weights decide first: a node reading initializer `layer1.0.conv1.weight` belongs to
    `layer1.0.conv1`. Otherwise the exporter's name scopes decide: the last module path before
    the FX node's own name (`['', 'layer1', 'layer1.0', 'add']` gives `layer1.0`).
    """
    if stored := node.metadata_props.get(metadata.LAYER):
        return stored
    for value in node.inputs:
        if value is not None and value.is_initializer() and value.name:
            for suffix in _WEIGHT_SUFFIXES:
                if value.name.endswith(suffix):
                    return value.name[: -len(suffix)]
    scopes_text = node.metadata_props.get(metadata.TORCH_NAME_SCOPES)
    if not scopes_text:
        return ""
    try:
        scopes = ast.literal_eval(scopes_text)
    except (ValueError, SyntaxError):
        return ""
    if not isinstance(scopes, list) or len(scopes) < 2:
        return ""
    return str(scopes[-2])
