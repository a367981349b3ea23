"""What a model is made of, without reading its weights: the data behind `inspect` and `diff`.

Everything here comes from the graph structure, tensor shapes and file sizes. External weight
files are measured with `stat` and never opened, so inspecting a multi-GB model is instant and
safe (the safe loader has already checked every external-data reference).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.ir import analysis, display_name, metadata, size_on_disk
from slimgraph.ir._dims import mac_dims

__all__ = [
    "IOSpec",
    "LayerMacs",
    "DtypeBytes",
    "InitializerSpec",
    "ModelSummary",
    "summarize",
    "parse_dims",
    "op_key",
    "MAC_OPS",
]

logger = logging.getLogger(__name__)

MAC_OPS = analysis.MAC_OPS  # ops whose MACs are counted

# How many layers the summary lists by MACs.
TOP_LAYERS = 10

Dim = int | str | None


@dataclass(frozen=True)
class IOSpec:
    """A graph input or output: name, dtype name ('float32') and shape (symbolic names kept)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None

    def to_dict(self) -> dict[str, object]:
        shape = None if self.shape is None else list(self.shape)
        return {"name": self.name, "dtype": self.dtype, "shape": shape}


@dataclass(frozen=True)
class LayerMacs:
    """MACs of one layer: the torch module path when known, else the node name."""

    layer: str
    ops: tuple[str, ...]
    macs: int
    share: float

    def to_dict(self) -> dict[str, object]:
        return {"layer": self.layer, "ops": list(self.ops), "macs": self.macs, "share": self.share}


@dataclass(frozen=True)
class DtypeBytes:
    """Initializers of one dtype: how many, how many elements, how many bytes."""

    dtype: str
    count: int
    elements: int
    bytes: int

    def to_dict(self) -> dict[str, object]:
        return {
            "dtype": self.dtype,
            "count": self.count,
            "elements": self.elements,
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class InitializerSpec:
    """One initializer's dtype and shape (for `diff`; values are never read)."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSummary:
    """The numbers `slimgraph inspect` prints.

    Attributes:
        path: the file the model came from, or None for an in-memory model.
        nodes: nodes of the main graph.
        ops: op type to count over the main graph, most frequent first (ops outside the
            default domain are keyed `domain::Op`).
        parameters: elements of all numeric initializers (`analysis.parameter_count`).
        size_bytes: the file plus its external-data files; for an in-memory model, its
            serialized size.
        macs: multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul nodes with symbolic
            dimensions set by `dims` (default: the export's example sizes, batch 1, else 1).
        macs_unknown: MAC-counting nodes whose shapes stayed unknown (left out of `macs`).
        dims: the symbolic dimension values the MACs were counted with.
        inputs, outputs: the graph's real inputs (initializers listed as inputs left out) and
            outputs.
        opset: domain ('' is the default ONNX domain) to version.
        top_layers: the layers with the most MACs, at most TOP_LAYERS.
        initializer_bytes: initializers grouped by dtype.
        initializers: name to dtype and shape, for `diff` (not in `to_dict`).
        external_data: names of the external-data files (relative to the model's folder).
    """

    path: str | None
    nodes: int
    ops: dict[str, int]
    parameters: int
    size_bytes: int
    macs: int
    macs_unknown: int
    dims: dict[str, int]
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    opset: dict[str, int]
    ir_version: int
    producer: str
    top_layers: tuple[LayerMacs, ...]
    initializer_bytes: tuple[DtypeBytes, ...]
    initializers: dict[str, InitializerSpec] = field(repr=False)
    external_data: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: every field but `initializers`."""
        return {
            "path": self.path,
            "nodes": self.nodes,
            "ops": dict(self.ops),
            "parameters": self.parameters,
            "size_bytes": self.size_bytes,
            "macs": self.macs,
            "macs_unknown": self.macs_unknown,
            "dims": dict(self.dims),
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "opset": dict(self.opset),
            "ir_version": self.ir_version,
            "producer": self.producer,
            "top_layers": [layer.to_dict() for layer in self.top_layers],
            "initializer_bytes": [group.to_dict() for group in self.initializer_bytes],
            "external_data": list(self.external_data),
        }


def summarize(
    model: ir.Model,
    path: str | os.PathLike[str] | None = None,
    *,
    dims: Mapping[str, int] | None = None,
) -> ModelSummary:
    """Summarize `model` from its structure and shapes; no weight bytes are read.

    Args:
        model: the model, e.g. from `slimgraph.ir.load`.
        path: the file it was loaded from; its size plus that of its external-data files
            (known when loaded with `slimgraph.ir.load`) is `size_bytes`. None: the size of
            the serialized model.
        dims: values for symbolic dimensions when counting MACs. Those not given take the
            export's example sizes (`from_torch` records them), the batch 1, else 1: an audio
            model's sample count of 1 would give its convolutions negative lengths.

    Raises:
        analysis.NegativeSizeError: the sizes are too small for the model (bad input).

    Example:
        >>> summary = summarize(load("model.onnx"), "model.onnx")  # doctest: +SKIP
        >>> summary.parameters, summary.macs  # doctest: +SKIP
    """
    dims = {**mac_dims(model), **(dims or {})}
    graph = model.graph
    ops = Counter(op_key(node) for node in graph)
    macs_by_node, unknown = analysis.macs_by_node(model, dims)
    total_macs = sum(macs_by_node.values())
    initializers = {
        name: InitializerSpec(_dtype_name(tensor.dtype), tuple(tensor.shape.numpy()))
        for name, value in _all_initializers(model)
        if (tensor := value.const_value) is not None
    }
    source = model.meta.get(metadata.SOURCE_PATH)
    return ModelSummary(
        path=None if path is None else str(path),
        nodes=len(graph),
        ops=dict(sorted(ops.items(), key=lambda item: (-item[1], item[0]))),
        parameters=int(analysis.parameter_count(model)),
        size_bytes=_size_bytes(model, path),
        macs=int(total_macs),
        macs_unknown=unknown,
        dims=dims,
        inputs=tuple(_io_spec(value) for value in graph.inputs if not value.is_initializer()),
        outputs=tuple(_io_spec(value) for value in graph.outputs),
        opset=dict(sorted(model.opset_imports.items())),
        ir_version=int(model.ir_version),
        producer=" ".join(filter(None, (model.producer_name, model.producer_version))),
        top_layers=_top_layers(graph, macs_by_node, total_macs),
        initializer_bytes=_dtype_groups(model),
        initializers=initializers,
        external_data=tuple(
            os.path.relpath(f, Path(source).parent) if source else f
            for f in model.meta.get(metadata.SOURCE_FILES, [])
        ),
    )


def parse_dims(items: Sequence[str] | None) -> dict[str, int]:
    """`["batch=8", "seq=128"]` -> {"batch": 8, "seq": 128}; BadOptionError on bad text."""
    dims: dict[str, int] = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        if not sep or not name or not text.strip().isdigit() or int(text) < 1:
            raise BadOptionError(f"--dim '{item}': expected NAME=VALUE with a positive integer")
        dims[name] = int(text)
    return dims


def op_key(node: ir.Node) -> str:
    """'Conv' for default-domain ops, 'com.microsoft::QLinearConv' for others."""
    if node.domain in ("", "ai.onnx"):
        return node.op_type
    return f"{node.domain}::{node.op_type}"


def _top_layers(
    graph: ir.Graph, macs_by_node: Mapping[ir.Node, int], total: int
) -> tuple[LayerMacs, ...]:
    """Layers by MACs: nodes of one torch module add up; other nodes stand alone by name."""
    layers: dict[str, list[ir.Node]] = {}
    for index, node in enumerate(graph):
        if node in macs_by_node:
            name = display_name(node, index)
            layers.setdefault(name, []).append(node)
    rows = []
    for name, nodes in layers.items():
        macs = sum(macs_by_node[node] for node in nodes)
        ops = tuple(sorted({node.op_type for node in nodes}))
        rows.append(LayerMacs(name, ops, macs, macs / total if total else 0.0))
    rows.sort(key=lambda row: (-row.macs, row.layer))
    return tuple(rows[:TOP_LAYERS])


def _all_initializers(model: ir.Model):  # noqa: ANN202 (an iterator of (name, value))
    for graph in (model.graph, *model.graph.subgraphs()):
        yield from graph.initializers.items()


def _dtype_groups(model: ir.Model) -> tuple[DtypeBytes, ...]:
    groups: dict[str, list[int]] = {}
    for _, value in _all_initializers(model):
        tensor = value.const_value
        if tensor is None:
            continue
        group = groups.setdefault(_dtype_name(tensor.dtype), [0, 0, 0])
        group[0] += 1
        group[1] += int(tensor.size)
        group[2] += int(tensor.nbytes)  # from dtype and shape; external data is not read
    rows = [DtypeBytes(dtype, *counts) for dtype, counts in groups.items()]
    return tuple(sorted(rows, key=lambda row: (-row.bytes, row.dtype)))


def _size_bytes(model: ir.Model, path: str | os.PathLike[str] | None) -> int:
    """The file plus its external-data files when `path` is given, else the serialized size."""
    if path is not None:
        return size_on_disk(path, model)
    proto = ir.to_proto(model)  # external tensors stay references: count their bytes apart
    external = sum(
        value.const_value.nbytes
        for _, value in _all_initializers(model)
        if isinstance(value.const_value, ir.ExternalTensor)
    )
    return proto.ByteSize() + external


def _io_spec(value: ir.Value) -> IOSpec:
    dtype = _dtype_name(value.dtype) if value.dtype is not None else "?"
    shape = None
    if value.shape is not None:
        shape = tuple(d if isinstance(d, int) else d.value for d in value.shape)
    return IOSpec(value.name or "", dtype, shape)


def _dtype_name(dtype: ir.DataType) -> str:
    """numpy-style names ('float32', 'int8'); ONNX names for types numpy lacks."""
    if dtype == ir.DataType.STRING:
        return "string"
    try:
        return dtype.numpy().name
    except (TypeError, ValueError, AttributeError):
        return dtype.name.lower()
