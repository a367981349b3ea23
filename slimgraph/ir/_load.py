"""Safe loading of untrusted ONNX files.

The protobuf is parsed without its external data; every external-data reference (initializers,
attribute tensors, sparse tensors, subgraphs, functions) is checked against the file system with
`stat` only (the target is never opened, so a FIFO or a device cannot hang the loader); the graph
structure is checked (cycles, dangling inputs, duplicate value names, opset imports, UTF-8 names).
Only then is the model turned into an `onnx_ir.Model`, whose external tensors stay lazy
(memory-mapped on first use), so loading and inspecting read no weight bytes. Sparse tensors become
dense (onnx_ir cannot hold them) and graphs out of topological order are sorted.

Known limit: the external-data checks run at load time; a file swapped for a symlink between load
and the first read of the tensor is not caught (onnx_ir opens the path without O_NOFOLLOW).
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import numpy as np
import onnx
import onnx_ir as ir

from slimgraph.errors import (
    BadOptionError,
    InvalidModelError,
    ModelLoadError,
    UnsafeModelError,
    first_line,
)
from slimgraph.ir._tensors import tensor_sites
from slimgraph.ir.metadata import SOURCE_FILES, SOURCE_PATH

__all__ = ["ModelLike", "as_model", "load", "load_proto"]

# What public functions accept as a model: the IR object or the path of an .onnx file.
ModelLike = Union[ir.Model, str, "os.PathLike[str]"]

logger = logging.getLogger(__name__)

_MAX_DEFAULT_OPSET = onnx.defs.onnx_opset_version()
_DEFAULT_DOMAINS = ("", "ai.onnx")


def as_model(model: ModelLike) -> ir.Model:
    """`model` itself, or the model loaded (safely, by `load`) from a path.

    Every public function that takes a model accepts either form through this one helper.

    Args:
        model: an `onnx_ir.Model`, or the path of an `.onnx` file.

    Returns:
        The `onnx_ir.Model` (the same object when one was given).

    Raises:
        BadOptionError: `model` is neither a model nor a path.
        ModelLoadError, UnsafeModelError, InvalidModelError: as `load` raises them for a path.

    Example:
        >>> model = as_model("model.onnx")  # doctest: +SKIP
    """
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load(model)
    raise BadOptionError(
        f"expected an onnx_ir.Model or the path of an .onnx file, got {type(model).__name__}"
    )


def load(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX file after checking that it is safe and well formed.

    Args:
        path: the `.onnx` file. External data, if any, must lie in the same folder or below it.

    Returns:
        The model as an `onnx_ir.Model`; external tensors are read lazily.

    Raises:
        ModelLoadError: the file is missing, empty, truncated or not ONNX.
        UnsafeModelError: an external-data reference escapes the model's folder or does not match.
        InvalidModelError: the graph has a cycle, a dangling input, a duplicate name or a bad opset.

    Example:
        >>> model = load("resnet50.onnx")  # doctest: +SKIP
    """
    file = Path(path)
    proto = load_proto(file)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as error:  # onnx_ir raises many types on malformed protos; name it once
        raise InvalidModelError(
            f"{path}: not a valid ONNX model ({first_line(error, named=True)})"
        ) from None
    # ONNX requires topological order; passes and the checker rely on it. onnx_ir's sort is
    # stable (a sorted graph keeps its order) and sorts subgraphs too.
    model.graph.sort()
    folder = file.resolve().parent
    data_files = set()
    for tensor in _external_tensors(model):
        tensor.base_dir = str(folder)
        data_files.add(str(folder / tensor.location))
    model.meta[SOURCE_PATH] = str(file.resolve())
    model.meta[SOURCE_FILES] = sorted(data_files)
    return model


def _external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Every external tensor of the model: initializers and attribute tensors, also those in
    subgraphs and functions."""
    for site in tensor_sites(model):
        yield from (t for t in site.tensors if isinstance(t, ir.ExternalTensor))


def load_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse and validate an ONNX file without reading its external data (see `load`).

    Sparse tensors (sparse initializers, Constant `sparse_value`) come back dense: `onnx_ir`
    cannot hold them, and the dense form computes the same.
    """
    file = Path(path)
    label = str(path)
    data = _read_file(file, label)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as error:  # DecodeError, or RuntimeError/ValueError from other backends
        raise ModelLoadError(
            f"{label}: not a readable ONNX model (truncated or not a protobuf: "
            f"{first_line(error)})"
        ) from None
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise ModelLoadError(f"{label}: not an ONNX model (no graph or no IR version)")
    if proto.ir_version > onnx.IR_VERSION:
        raise InvalidModelError(
            f"{label}: IR version {proto.ir_version} is newer than this onnx ({onnx.IR_VERSION})"
        )
    _check_utf8(proto, label)
    base_dir = file.resolve().parent
    try:
        for where, tensor in _iter_tensors(proto):
            _check_tensor(tensor, where, base_dir, label)
        _check_opsets(proto, label)
        if not proto.graph.output:
            raise InvalidModelError(f"{label}: invalid model: the graph has no outputs")
        _check_value_infos(proto.graph, label)
        _check_graph(proto.graph, frozenset(), label, "graph")
        for function in proto.functions:
            _check_function(function, label)
        _check_function_calls(proto, label)
        _densify_sparse(proto, base_dir, label)
    except UnicodeDecodeError:  # protobuf checks UTF-8 only when a string field is read
        raise ModelLoadError(
            f"{label}: not a valid ONNX model (a name or text field is not valid UTF-8)"
        ) from None
    return proto


def _check_utf8(proto: onnx.ModelProto, label: str) -> None:
    """Every string field must be UTF-8 (protobuf hands back invalid ones as bytes, silently)."""
    string_type = onnx.NodeProto.DESCRIPTOR.fields_by_name["name"].type
    message_type = onnx.NodeProto.DESCRIPTOR.fields_by_name["attribute"].type
    stack: list[object] = [proto]
    while stack:
        message = stack.pop()
        for field, value in message.ListFields():  # type: ignore[attr-defined]
            if field.type not in (string_type, message_type):
                continue
            items = value if field.is_repeated else [value]
            if field.type == message_type:
                stack.extend(items)
                continue
            for item in items:
                if isinstance(item, bytes):
                    raise ModelLoadError(
                        f"{label}: not a valid ONNX model (the {field.name} {item!r} is not "
                        "valid UTF-8)"
                    )


def _read_file(file: Path, label: str) -> bytes:
    try:
        info = file.stat()
    except FileNotFoundError:
        raise ModelLoadError(f"{label}: no such file") from None
    except OSError as error:
        raise ModelLoadError(f"{label}: cannot read ({error.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{label}: not a regular file")
    if info.st_size == 0:
        raise ModelLoadError(f"{label}: empty file, not an ONNX model")
    try:
        return file.read_bytes()
    except OSError as error:
        raise ModelLoadError(f"{label}: cannot read ({error.strerror})") from None


# ---------------------------------------------------------------- tensors and external data


def _iter_tensors(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every TensorProto in the model, with a description of where it sits."""
    yield from _graph_tensors(proto.graph, "")
    for function in proto.functions:
        for node in function.node:
            yield from _node_tensors(node, f" in function '{function.name}'")


def _graph_tensors(graph: onnx.GraphProto, where: str) -> Iterator[tuple[str, onnx.TensorProto]]:
    """`where` is "" for the main graph, else " in subgraph of node ..." (appended to names)."""
    for tensor in graph.initializer:
        yield f"initializer '{tensor.name}'{where}", tensor
    for sparse in graph.sparse_initializer:
        yield f"sparse initializer '{sparse.values.name}'{where}", sparse.values
        yield f"sparse initializer '{sparse.values.name}'{where} (indices)", sparse.indices
    for node in graph.node:
        yield from _node_tensors(node, where)


def _node_tensors(node: onnx.NodeProto, where: str) -> Iterator[tuple[str, onnx.TensorProto]]:
    who = f"{_node_label(node)}{where} attribute"
    for attr in node.attribute:
        if attr.HasField("t"):
            yield f"{who} '{attr.name}'", attr.t
        for tensor in attr.tensors:
            yield f"{who} '{attr.name}'", tensor
        sparses = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(
            attr.sparse_tensors
        )
        for sparse in sparses:
            yield f"{who} '{attr.name}'", sparse.values
            yield f"{who} '{attr.name}' (indices)", sparse.indices
        inner = f" in subgraph of {_node_label(node)}{where}"
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            yield from _graph_tensors(graph, inner)


def _external_fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _bits(tensor: onnx.TensorProto, where: str, label: str) -> int | None:
    """Bits per element, or None for strings and undefined types."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError):
        raise InvalidModelError(
            f"{label}: {where} has an unknown data type {tensor.data_type}"
        ) from None


# Which typed field holds the inline values of each data type (all others: int32_data).
_TYPED_FIELDS: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float_data",
    onnx.TensorProto.COMPLEX64: "float_data",
    onnx.TensorProto.DOUBLE: "double_data",
    onnx.TensorProto.COMPLEX128: "double_data",
    onnx.TensorProto.INT64: "int64_data",
    onnx.TensorProto.UINT32: "uint64_data",
    onnx.TensorProto.UINT64: "uint64_data",
    onnx.TensorProto.STRING: "string_data",
}
_COMPLEX = (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)


def _check_tensor(tensor: onnx.TensorProto, where: str, base_dir: Path, label: str) -> None:
    """Shape against data: inline bytes or values, or the external file (checked by stat only)."""
    if any(d < 0 for d in tensor.dims):
        raise InvalidModelError(f"{label}: {where} has a negative dimension {list(tensor.dims)}")
    bits = _bits(tensor, where, label)
    elements = math.prod(tensor.dims)
    expected = None if bits is None else math.ceil(elements * bits / 8)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        _check_external(tensor, where, base_dir, label, expected)
        return
    if tensor.HasField("raw_data"):
        if expected is not None and len(tensor.raw_data) != expected:
            raise InvalidModelError(
                f"{label}: {where} holds {len(tensor.raw_data)} bytes, but its shape "
                f"{list(tensor.dims)} needs {expected}"
            )
        return
    if bits is not None and bits < 8:
        return  # 4-bit and 2-bit types pack several values per int32 entry
    field = _TYPED_FIELDS.get(tensor.data_type, "int32_data")
    count = len(getattr(tensor, field))
    needed = elements * (2 if tensor.data_type in _COMPLEX else 1)
    if count != needed:
        raise InvalidModelError(
            f"{label}: {where} holds {count} values, but its shape {list(tensor.dims)} "
            f"needs {needed}"
        )


# The external-data keys onnx defines; others are dropped on load (onnx would warn about each).
_EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})


def _check_external(
    tensor: onnx.TensorProto, where: str, base_dir: Path, label: str, expected: int | None
) -> None:
    """Validate an external-data reference with `lstat` only: the target is never opened.

    Keys onnx does not define are removed (logged), so no Python warning reaches the user.
    """
    unknown = [e.key for e in tensor.external_data if e.key not in _EXTERNAL_KEYS]
    if unknown:
        logger.info("%s: %s: ignoring unknown external-data keys %s", label, where, unknown)
        kept = [e for e in tensor.external_data if e.key in _EXTERNAL_KEYS]
        del tensor.external_data[:]
        tensor.external_data.extend(kept)
    fields = _external_fields(tensor)
    location = fields.get("location", "")
    prefix = f"{label}: {where} has external data '{location}'"
    if not location:
        raise UnsafeModelError(f"{label}: {where} has external data without a location")
    if expected is None:
        raise UnsafeModelError(f"{prefix}, but string tensors cannot be stored externally")
    if "\\" in location or "\x00" in location:
        raise UnsafeModelError(f"{prefix}: backslashes and NUL are not allowed in a location")
    if os.path.isabs(location) or location.startswith("/"):
        raise UnsafeModelError(f"{prefix}: absolute paths are not allowed")
    parts = Path(location).parts
    if ".." in parts:
        raise UnsafeModelError(f"{prefix}: '..' is not allowed (it leaves the model's folder)")
    candidate = base_dir
    for part in parts:  # every component, so a symlinked folder is caught too
        candidate = candidate / part
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            raise UnsafeModelError(f"{prefix}: the file does not exist") from None
        except OSError as error:
            raise UnsafeModelError(f"{prefix}: cannot stat ({error.strerror})") from None
        if stat.S_ISLNK(info.st_mode):
            raise UnsafeModelError(
                f"{prefix}: '{candidate.relative_to(base_dir)}' is a symlink (not allowed)"
            )
    if base_dir not in candidate.resolve().parents:
        raise UnsafeModelError(f"{prefix}: resolves outside the model's folder")
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeModelError(f"{prefix}: not a regular file")
    if info.st_nlink > 1:
        raise UnsafeModelError(f"{prefix}: hardlinked files are not allowed")
    offset = _non_negative_int(fields.get("offset", "0"), prefix, "offset")
    if offset > info.st_size:
        raise UnsafeModelError(
            f"{prefix}: offset {offset} is past the end of the file ({info.st_size} bytes)"
        )
    length = (
        _non_negative_int(fields["length"], prefix, "length")
        if "length" in fields
        else info.st_size - offset
    )
    if offset + length > info.st_size:
        raise UnsafeModelError(
            f"{prefix}: offset {offset} + length {length} is past the end of the file "
            f"({info.st_size} bytes)"
        )
    if length != expected:
        raise UnsafeModelError(
            f"{prefix}: length {length} does not match its shape {list(tensor.dims)} "
            f"({expected} bytes)"
        )
    on_disk = getattr(info, "st_blocks", None)
    if on_disk is not None and length > _SPARSE_FILE_MIN and on_disk * 512 < length // 2:
        raise UnsafeModelError(
            f"{prefix}: a sparse file ({info.st_size} bytes declared, {on_disk * 512} on disk): "
            "weights are never holes; refusing to read it"
        )


# External data larger than this whose file is mostly holes (st_blocks) is refused: a weight file
# is written in full, a sparse one is a way to make a tiny download claim terabytes.
_SPARSE_FILE_MIN = 1 << 26


def _non_negative_int(text: str, prefix: str, field: str) -> int:
    digits = text[1:] if text.startswith("-") else text
    if not (digits.isascii() and digits.isdigit()):  # "²".isdigit() is True, int("²") fails
        raise UnsafeModelError(f"{prefix}: {field} '{text}' is not an integer")
    value = int(text)
    if value < 0:
        raise UnsafeModelError(f"{prefix}: {field} {value} is negative")
    return value


# ---------------------------------------------------------------- sparse tensors


def _densify_sparse(proto: onnx.ModelProto, base_dir: Path, label: str) -> None:
    """Replace sparse initializers and Constant `sparse_value` by dense tensors, in place."""
    graphs = [proto.graph]
    nodes: list[onnx.NodeProto] = []
    while graphs:
        graph = graphs.pop()
        for sparse in graph.sparse_initializer:
            graph.initializer.append(_dense(sparse, base_dir, label))
        del graph.sparse_initializer[:]
        for node in graph.node:
            nodes.append(node)
            for attr in node.attribute:
                graphs.extend(([attr.g] if attr.HasField("g") else []) + list(attr.graphs))
    nodes.extend(node for function in proto.functions for node in function.node)
    for node in nodes:
        for index, attr in enumerate(node.attribute):
            if attr.type not in _SPARSE_ATTRS:
                continue
            if node.op_type != "Constant" or attr.type != onnx.AttributeProto.SPARSE_TENSOR:
                raise InvalidModelError(
                    f"{label}: {_node_label(node)} has a sparse tensor attribute "
                    f"'{attr.name}', which slimgraph cannot read (only Constant sparse_value)"
                )
            dense = _dense(attr.sparse_tensor, base_dir, label)
            node.attribute[index].CopyFrom(onnx.helper.make_attribute("value", dense))


# Sparse tensors are made dense on load; a tiny file must not allocate more than this (and a dense
# tensor must stay well below protobuf's 2 GiB message limit).
_MAX_DENSE_BYTES = 1 << 28

_SPARSE_ATTRS = (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS)


def _dense(sparse: onnx.SparseTensorProto, base_dir: Path, label: str) -> onnx.TensorProto:
    name = sparse.values.name
    try:
        values = onnx.numpy_helper.to_array(sparse.values, str(base_dir))
        indices = onnx.numpy_helper.to_array(sparse.indices, str(base_dir)).astype(np.int64)
    except Exception as error:  # onnx raises several types on malformed tensors
        raise InvalidModelError(
            f"{label}: sparse tensor '{name}' cannot be read ({first_line(error)})"
        ) from None
    dims = tuple(sparse.dims)
    size = math.prod(dims)
    if any(d < 0 for d in dims) or size * values.dtype.itemsize > _MAX_DENSE_BYTES:
        raise InvalidModelError(
            f"{label}: sparse tensor '{name}' has dims {list(dims)}: slimgraph makes sparse "
            f"tensors dense and does not do so above {_MAX_DENSE_BYTES} bytes"
        )
    if indices.ndim == 2 and indices.shape[1] == len(dims) and len(dims) > 0:
        if ((indices < 0) | (indices >= np.array(dims))).any():
            raise InvalidModelError(f"{label}: sparse tensor '{name}' has indices out of range")
        indices = np.asarray(np.ravel_multi_index(indices.T, dims), dtype=np.int64)
    if indices.ndim != 1 or values.ndim != 1 or indices.shape[0] != values.shape[0]:
        raise InvalidModelError(
            f"{label}: sparse tensor '{name}' has {values.size} values for indices of shape "
            f"{list(indices.shape)} (dims {list(dims)})"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= size):
        raise InvalidModelError(f"{label}: sparse tensor '{name}' has indices out of range")
    dense = np.zeros(size, dtype=values.dtype)
    dense[indices] = values
    return onnx.numpy_helper.from_array(dense.reshape(dims), name)


# ---------------------------------------------------------------- opsets and graph structure


def _check_opsets(proto: onnx.ModelProto, label: str) -> None:
    imports = {entry.domain: entry.version for entry in proto.opset_import}
    if not imports:
        raise InvalidModelError(f"{label}: the model imports no opset")
    for domain in _DEFAULT_DOMAINS:
        version = imports.get(domain)
        if version is not None and not 1 <= version <= _MAX_DEFAULT_OPSET:
            raise InvalidModelError(
                f"{label}: opset {version} of the default domain is unknown "
                f"(this onnx knows 1 to {_MAX_DEFAULT_OPSET})"
            )
    functions = {(f.domain, f.name) for f in proto.functions}
    for node in _iter_nodes(proto.graph):
        _check_node_domain(node, imports, functions, label)
    for function in proto.functions:
        function_imports = {entry.domain: entry.version for entry in function.opset_import}
        for node in function.node:
            _check_node_domain(node, function_imports or imports, functions, label)


def _check_node_domain(
    node: onnx.NodeProto,
    imports: dict[str, int],
    functions: set[tuple[str, str]],
    label: str,
) -> None:
    if (node.domain, node.op_type) in functions:
        return
    domain = node.domain
    known = domain in imports or (domain in _DEFAULT_DOMAINS and imports.keys() & {"", "ai.onnx"})
    if not known:
        raise InvalidModelError(
            f"{label}: {_node_label(node)} uses domain '{domain}', which the model does not import"
        )


def _iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _iter_nodes(attr.g)
            for sub in attr.graphs:
                yield from _iter_nodes(sub)


def _node_label(node: onnx.NodeProto, index: int | None = None) -> str:
    if node.name:
        return f"node '{node.name}' ({node.op_type})"
    if index is not None:
        return f"node #{index} ({node.op_type})"
    return f"a {node.op_type} node"


def _check_graph(
    graph: onnx.GraphProto, outer: frozenset[str], label: str, where: str
) -> None:
    """Duplicate names, dangling inputs, missing outputs and cycles, recursively."""
    defined: dict[str, str] = {}

    def define(name: str, what: str) -> None:
        if not name:
            return
        if name in defined:
            raise InvalidModelError(
                f"{label}: {where}: value name '{name}' is defined twice "
                f"({defined[name]} and {what})"
            )
        defined[name] = what

    input_names = {value.name for value in graph.input}
    for value in graph.input:
        define(value.name, "a graph input")
    initializer_names: set[str] = set()
    for tensor in graph.initializer:
        if tensor.name in initializer_names:
            raise InvalidModelError(
                f"{label}: {where}: initializer name '{tensor.name}' is used twice"
            )
        initializer_names.add(tensor.name)
        if tensor.name not in input_names:  # IR < 4 lists initializers as inputs too
            define(tensor.name, "an initializer")
    for sparse in graph.sparse_initializer:
        define(sparse.values.name, "a sparse initializer")
    producers: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        _check_names(node, label)
        for output in node.output:
            define(output, _node_label(node, index))
            if output:
                producers[output] = index
    visible = outer | defined.keys()
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in visible:
                raise InvalidModelError(
                    f"{label}: {where}: {_node_label(node, index)} reads '{name}', which no node, "
                    "initializer or graph input produces"
                )
        for attr in node.attribute:
            subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for sub in subgraphs:
                _check_graph(sub, frozenset(visible), label, f"subgraph of {_node_label(node)}")
    for value in graph.output:
        if value.name not in visible:
            raise InvalidModelError(
                f"{label}: {where}: output '{value.name}' is not produced by any node"
            )
    _check_acyclic(graph, producers, label, where)


def _check_acyclic(
    graph: onnx.GraphProto, producers: dict[str, int], label: str, where: str
) -> None:
    """Kahn's algorithm over node indices; subgraph reads of outer values count as edges."""
    count = len(graph.node)
    successors: list[list[int]] = [[] for _ in range(count)]
    indegree = [0] * count
    for index, node in enumerate(graph.node):
        sources = {producers[name] for name in _node_reads(node) if name in producers}
        for source in sources:
            successors[source].append(index)
            indegree[index] += 1
    ready = [i for i in range(count) if indegree[i] == 0]
    seen = 0
    while ready:
        current = ready.pop()
        seen += 1
        for nxt in successors[current]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
    if seen != count:
        stuck = next(i for i in range(count) if indegree[i] > 0)
        raise InvalidModelError(
            f"{label}: {where}: the graph has a cycle through "
            f"{_node_label(graph.node[stuck], stuck)}"
        )


def _node_reads(node: onnx.NodeProto) -> Iterator[str]:
    """Names a node reads, including those its subgraphs take from the outer scope."""
    yield from node.input
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in _iter_nodes(sub):
                yield from inner.input


def _check_value_infos(graph: onnx.GraphProto, label: str) -> None:
    """Declared shapes of the graph's inputs, outputs and value infos: no negative dimension."""
    for kind, values in (
        ("input", graph.input), ("output", graph.output), ("value", graph.value_info)
    ):
        for value in values:
            if not value.type.HasField("tensor_type"):
                continue
            tensor_type = value.type.tensor_type
            if not tensor_type.HasField("shape"):
                continue
            dims = [d.dim_value for d in tensor_type.shape.dim if d.HasField("dim_value")]
            if any(d < 0 for d in dims):
                raise InvalidModelError(
                    f"{label}: invalid model: graph {kind} '{_short(value.name)}' has a "
                    f"negative dimension {dims}"
                )


# Longest op type, domain or value/node name accepted (real exports stay far below).
_MAX_NAME = 4096


def _short(name: str) -> str:
    return name if len(name) <= 80 else f"{name[:40]}...({len(name)} characters)"


def _check_names(node: onnx.NodeProto, label: str) -> None:
    for what, text in (
        ("op type", node.op_type), ("domain", node.domain), ("name", node.name),
        *(("input", n) for n in node.input), *(("output", n) for n in node.output),
    ):
        if len(text) > _MAX_NAME:
            raise InvalidModelError(
                f"{label}: invalid model: the {what} of a {_short(node.op_type)} node is "
                f"{len(text)} characters long (limit {_MAX_NAME})"
            )


def _check_function_calls(proto: onnx.ModelProto, label: str) -> None:
    """Model-local functions must not call themselves, directly or through others (inlining
    and onnxruntime would recurse forever)."""
    functions = {(f.domain, f.name): f for f in proto.functions}
    calls = {
        key: {
            (n.domain, n.op_type) for n in _function_nodes(f) if (n.domain, n.op_type) in functions
        }
        for key, f in functions.items()
    }
    state: dict[tuple[str, str], int] = {}  # 1: on the current path, 2: done

    def visit(key: tuple[str, str], path: list[str]) -> None:
        state[key] = 1
        for callee in sorted(calls[key]):
            if state.get(callee) == 1:
                cycle = " -> ".join([*path, callee[1]])
                raise InvalidModelError(
                    f"{label}: invalid model: function '{callee[1]}' calls itself ({cycle})"
                )
            if callee not in state:
                visit(callee, [*path, callee[1]])
        state[key] = 2

    for key in sorted(functions):
        if key not in state:
            visit(key, [key[1]])


def _function_nodes(function: onnx.FunctionProto) -> Iterator[onnx.NodeProto]:
    for node in function.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _iter_nodes(sub)


def _check_function(function: onnx.FunctionProto, label: str) -> None:
    graph = onnx.GraphProto(node=function.node)
    graph.input.extend(onnx.ValueInfoProto(name=name) for name in function.input)
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in function.output)
    _check_graph(graph, frozenset(), label, f"function '{function.name}'")
