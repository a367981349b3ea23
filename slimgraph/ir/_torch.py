"""The torch frontend: dynamo export to `onnx_ir`, keeping each node's torch module path."""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from slimgraph._optional import require_torch
from slimgraph.errors import UnsupportedModelError, first_line, message_line
from slimgraph.ir.metadata import EXAMPLE_DIMS
from slimgraph.ir.names import annotate_layers

__all__ = ["from_torch"]

logger = logging.getLogger(__name__)

def from_torch(
    module: Any,
    args: Sequence[Any],
    dynamic_shapes: Mapping[str, Any] | Sequence[Any] | None = None,
    *,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset_version: int | None = None,
) -> ir.Model:
    """Export a `torch.nn.Module` with `torch.onnx.export(dynamo=True, optimize=False)`.

    The leading (batch) dimension is exported as symbolic by default, named `batch`, when the
    model allows it: every tensor argument's axis 0 is marked `torch.export.Dim.AUTO`, which
    torch keeps dynamic unless the model's code fixes it (then it stays the example's size, as
    it does when the dynamic export fails or its outputs do not carry the batch: the export is
    then retried static, with a logged note).
    So a model exported from a batch-1 example runs at any batch. Opt out with
    `dynamic_batch=False` (every dimension as in the example), or give `dynamic_shapes`
    yourself (then nothing is added).

    The exporter's optimizer is off on purpose: it folds BatchNormalization into Conv and the fused
    node then carries the BatchNorm's scope; slimgraph's own passes do that fusion, verified.
    Every node gets its torch module path in metadata `pkg.slimgraph.layer` (see `layer_name`).

    Args:
        module: the model, in eval mode for inference export.
        args: example inputs (a tuple, as for `torch.onnx.export`; a single tensor is taken as
            the only input).
        dynamic_shapes: as for `torch.export` (e.g. `{"x": {0: torch.export.Dim("batch")}}`);
            replaces the default dynamic batch.
        dynamic_batch: export axis 0 of every tensor argument as symbolic `batch` (default)
            when `dynamic_shapes` is None; False exports the example's shapes as they are.
        input_names, output_names, opset_version: passed to the exporter.

    Returns:
        The model as an `onnx_ir.Model`, inputs and outputs `[batch, ...]` by default.

    Raises:
        MissingExtraError: torch is not installed ("torch is not installed: pip install
            'slimgraph[torch]'").
        UnsupportedModelError: `module` is not a `torch.nn.Module`, or torch cannot export it
            (the cause is quoted: the first line of the innermost exception, colour codes
            stripped).

    Example:
        >>> model = from_torch(net.eval(), (torch.randn(1, 3, 32, 32),))  # doctest: +SKIP
        >>> [str(d) for d in model.graph.inputs[0].shape]  # doctest: +SKIP
        ['batch', '3', '32', '32']
        >>> fixed = from_torch(net.eval(), (torch.randn(1, 3, 32, 32),), dynamic_batch=False)
        ... # doctest: +SKIP
    """
    require_torch()
    import torch

    if not isinstance(module, torch.nn.Module):
        raise UnsupportedModelError(
            f"from_torch needs a torch.nn.Module, got {type(module).__name__}"
        )
    if isinstance(args, torch.Tensor):
        args = (args,)  # tuple(tensor) would split the batch into separate arguments
    auto_batch = None
    if dynamic_shapes is None and dynamic_batch:
        auto_batch = tuple(
            {0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.ndim >= 1 else None
            for a in args
        )
        if all(spec is None for spec in auto_batch):
            auto_batch = None
    if auto_batch is not None:
        try:
            model = _export(module, args, auto_batch, input_names, output_names, opset_version)
        except UnsupportedModelError as error:
            logger.warning(
                "note: exporting %s with a dynamic batch failed (%s); exported with the "
                "example's batch instead", type(module).__name__, error,
            )  # fmt: skip
        else:
            if _name_batch_dim(model):
                return _record_example_dims(model, args)
            logger.warning(
                "note: %s does not keep the batch dimension symbolic (its outputs do not carry "
                "it); exported with the example's batch", type(module).__name__,
            )  # fmt: skip
    model = _export(module, args, dynamic_shapes, input_names, output_names, opset_version)
    return _record_example_dims(model, args)


def _record_example_dims(model: ir.Model, args: Sequence[Any]) -> ir.Model:
    """Record the size the example gave each symbolic input dimension, by name, in the model's
    `metadata.EXAMPLE_DIMS` (sample inputs for verification take them); returns `model`."""
    import torch

    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    inputs = list(model.graph.inputs)
    sizes: dict[str, int] = {}
    if len(tensors) == len(inputs):
        for value, tensor in zip(inputs, tensors, strict=True):
            if value.shape is None or len(value.shape) != tensor.ndim:
                continue
            for dim, size in zip(value.shape, tensor.shape, strict=True):
                if not isinstance(dim, int) and dim.value:
                    sizes.setdefault(dim.value, int(size))
    if sizes:
        model.metadata_props[EXAMPLE_DIMS] = json.dumps(sizes)
    return model


def _name_batch_dim(model: ir.Model) -> bool:
    """Rename the exporter's symbol for axis 0 of the inputs (`s31`) to `batch` everywhere.

    Returns False when the export is not batch-dynamic after all: no single input symbol, or no
    graph output carrying it (torch kept the input symbolic but baked the example's batch into
    the graph, as RNN exports over a time-first axis do).
    """
    symbols = {
        str(v.shape[0]) for v in model.graph.inputs
        if v.shape is not None and len(v.shape) and not isinstance(v.shape[0], int)
    }  # fmt: skip
    if len(symbols) != 1:
        return False
    (symbol,) = symbols
    if not any(
        v.shape is not None and any(str(d) == symbol for d in v.shape)
        for v in model.graph.outputs
    ):
        return False
    # the symbol alone or inside a product the exporter wrote as text (`4*s31`: DeBERTa's
    # batch-times-heads axis), so every shape names the same batch
    word = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(symbol)}(?![A-Za-z0-9_])")
    values = list(model.graph.inputs) + [o for n in model.graph.all_nodes() for o in n.outputs]
    for value in values:
        if value.shape is None or not any(
                not isinstance(d, int) and word.search(str(d)) for d in value.shape):
            continue
        dims = [d if isinstance(d, int) or d.value is None else word.sub("batch", str(d))
                for d in value.shape]
        value.shape = ir.Shape(dims)
    return True


def _export(
    module: Any,
    args: Sequence[Any],
    dynamic_shapes: Any,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    opset_version: int | None,
) -> ir.Model:
    import torch

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
            cause = _cause(error)
            raise UnsupportedModelError(
                f"torch.onnx.export could not export {type(module).__name__}: {cause}"
                f"{_CACHE_HINT if any(m in cause for m in _CACHE_MARKS) else ''}"
            ) from error
        finally:
            registration_log.setLevel(previous_level)
    if program is None:  # only when given a file to write to, which this call never is
        raise UnsupportedModelError(
            f"torch.onnx.export returned no program for {type(module).__name__}"
        )
    model = program.model
    annotate_layers(model)
    return model


# A Hugging Face model exported with its key/value cache on, or given the mask where its second
# positional argument is the cache (GPT-2, BLOOM, GPT-BigCode): what torch then says, and how to
# export it instead.
_CACHE_MARKS = ("get_seq_length", "DynamicCache")
_CACHE_HINT = (" (a Hugging Face model: export a wrapper module whose forward returns "
               "net(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state)")


def _cause(error: BaseException) -> str:
    """The first line of the innermost exception that says something, as one clean line
    (`errors.first_line`: colour codes stripped).

    The exporter wraps the real failure (torch.export's "Could not guard on data-dependent
    expression ...") in an error whose first line is its own banner, with terminal colour codes
    ("Failed to export the model with torch.export. \\x1b[96mThis is step 1/3\\x1b[0m ...").
    """
    chain: list[BaseException] = []
    found: BaseException | None = error
    while found is not None and found not in chain:
        chain.append(found)
        found = found.__cause__ or found.__context__
    inner = next((e for e in reversed(chain) if message_line(str(e))), chain[-1])
    return first_line(inner)
