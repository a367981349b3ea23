"""Atomic saving: a temp folder beside the target, then renames; never over the input model."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir

from slimgraph.errors import OutputPathError
from slimgraph.ir._tensors import tensor_sites
from slimgraph.ir.metadata import SOURCE_FILES, SOURCE_PATH

__all__ = [
    "save",
    "tensor_bytes",
    "inlined_external_data",
    "without_initializer_value_info",
    "size_on_disk",
    "EXTERNAL_DATA_THRESHOLD",
]

logger = logging.getLogger(__name__)

# Protobuf cannot hold more than 2 GiB; stay clearly below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def tensor_bytes(model: ir.Model) -> int:
    """Bytes held by the initializers of the main graph and its subgraphs."""
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def save(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> Path:
    """Write `model` to `path` atomically.

    The model goes to a temp folder inside the target folder and is renamed into place only when
    fully written, so a failure leaves nothing behind and an existing file is replaced whole.

    Args:
        model: the model to write; it is not changed.
        path: the target `.onnx` file.
        external_data: store weights in `<file name>.data` beside the model (tensors of 256
            bytes or less stay inline; no file when none is larger). `None` (default) does so
            only when the weights exceed what one protobuf can hold (2 GB).

    Returns:
        The path written.

    Raises:
        OutputPathError: `path` is the file the model (or its external data) was loaded from,
            its folder does not exist, or the folder is not writable.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(f"{target}: the folder '{folder}' does not exist")
    if target.exists() and target.is_dir():
        raise OutputPathError(f"{target}: is a folder, not a file")
    data_name = f"{target.name}.data"
    _refuse_sources(model, target.resolve(), (folder / data_name).resolve())
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    try:
        staging = Path(tempfile.mkdtemp(prefix=".slimgraph-", dir=folder))
    except OSError as error:
        raise OutputPathError(f"{target}: cannot write in '{folder}' ({error.strerror})") from None
    try:
        staged_model = staging / target.name
        # Tensors still in the input's external-data file are read (memory-mapped) and written
        # anew: their location strings are relative to the input's folder and never reused.
        with inlined_external_data(model), without_initializer_value_info(model):
            ir.save(model, staged_model, external_data=data_name if external_data else None)
        staged_data = staging / data_name
        if staged_data.exists() and staged_data.stat().st_size > 0:  # all tensors may be tiny
            os.replace(staged_data, folder / data_name)
        os.replace(staged_model, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("saved %s%s", target, " with external data" if external_data else "")
    return target


def size_on_disk(path: str | os.PathLike[str], model: ir.Model | None = None) -> int:
    """Bytes of a model file plus its external data: the data files `load` recorded when `model`
    was read from `path`, else `<file name>.data` beside it, as `save` writes it."""
    file = Path(path).resolve()
    if model is not None and model.meta.get(SOURCE_PATH) == str(file):
        data = [Path(f) for f in model.meta.get(SOURCE_FILES, [])]
    else:
        data = [f for f in (file.parent / f"{file.name}.data",) if f.is_file()]
    return sum(f.stat().st_size for f in (file, *data))


def _refuse_sources(model: ir.Model, target: Path, data_target: Path) -> None:
    sources = [model.meta.get(SOURCE_PATH), *model.meta.get(SOURCE_FILES, [])]
    for source in filter(None, sources):
        for candidate in (target, data_target):
            if candidate == Path(source) or (
                candidate.exists() and Path(source).exists() and os.path.samefile(candidate, source)
            ):
                raise OutputPathError(
                    f"{candidate}: refusing to write over the model's own input file '{source}'"
                )


@contextlib.contextmanager
def inlined_external_data(model: ir.Model) -> Iterator[ir.Model]:
    """Temporarily replace every external tensor of `model` by an in-memory one.

    Covers initializers and attribute tensors (Constant values), in subgraphs and functions too.
    The data is memory-mapped, not copied, and the original tensors come back on exit, so the
    model is unchanged afterwards. Used to serialize a model that stands alone.
    """
    values: list[tuple[ir.Value, ir.TensorProtocol | None]] = []
    attributes: list[tuple[ir.Node, str, ir.Attr]] = []
    try:
        for site in tensor_sites(model):
            if not any(isinstance(t, ir.ExternalTensor) for t in site.tensors):
                continue
            inline = [_in_memory(t) for t in site.tensors]
            if site.value is not None:
                values.append((site.value, site.value.const_value))
                site.value.const_value = inline[0]
            elif site.node is not None and site.key is not None:
                attr = site.node.attributes[site.key]
                attributes.append((site.node, site.key, attr))
                site.node.attributes[site.key] = (
                    ir.AttrTensor(site.key, inline[0]) if attr.type == ir.AttributeType.TENSOR
                    else ir.AttrTensors(site.key, inline)
                )  # fmt: skip
        yield model
    finally:
        for value, tensor in reversed(values):
            value.const_value = tensor
        for node, key, attr in reversed(attributes):
            node.attributes[key] = attr


@contextlib.contextmanager
def without_initializer_value_info(model: ir.Model) -> Iterator[ir.Model]:
    """Temporarily clear the type and shape of initializers that only repeat their tensor's.

    onnx_ir writes a `value_info` entry for every typed initializer, although the tensor itself
    carries its dtype and dims: pure repetition (about 40 bytes per weight, scale and bias,
    which adds up on a quantized model). Graph inputs and values with a doc string or metadata
    keep theirs. The model is unchanged afterwards.
    """
    restore: list[tuple[ir.Value, ir.TypeProtocol | None, ir.Shape | None]] = []
    try:
        for graph in model.graphs():
            inputs = set(graph.inputs)
            for value in graph.initializers.values():
                tensor = value.const_value
                if (
                    tensor is None or value in inputs or value.doc_string or value.metadata_props
                    or value.dtype != tensor.dtype or value.shape != tensor.shape
                ):
                    continue
                restore.append((value, value.type, value.shape))
                value.type, value.shape = None, None
        yield model
    finally:
        for value, type_, shape in restore:
            value.type, value.shape = type_, shape


def _in_memory(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    if not isinstance(tensor, ir.ExternalTensor):
        return tensor
    return ir.Tensor(
        tensor.numpy(), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string
    )
