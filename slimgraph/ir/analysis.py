"""Read-only analysis of an `onnx_ir` graph: dataflow view, producers/consumers, weights, MACs."""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx
import onnx_ir as ir

from slimgraph.errors import BadInputError, InvalidModelError
from slimgraph.ir.attention_macs import ATTENTION_OPS, attention_macs
from slimgraph.ir.contrib_shapes import has_contrib_ops, infer_shapes
from slimgraph.ir.layout import layout

__all__ = [
    "dataflow_graph",
    "producer",
    "consumers",
    "NodeWeights",
    "node_weights",
    "parameter_count",
    "static_shape",
    "with_static_shapes",
    "NegativeSizeError",
    "node_macs",
    "MAC_OPS",
    "QUANTIZED_MAC_FORMS",
    "ATTENTION_OPS",
    "counts_macs",
    "macs_by_node",
    "model_macs",
    "check_finite_weights",
]

logger = logging.getLogger(__name__)


def dataflow_graph(graph: ir.Graph) -> nx.MultiDiGraph:
    """A frozen networkx view of the dataflow: nodes are `ir.Node` objects, one edge per value use.

    Each edge `(producer, consumer)` carries `value` (the `ir.Value`) and `index` (which input of
    the consumer it feeds). Graph inputs and initializers have no producer and so no edge; use
    `consumers` for them.
    """
    view = nx.MultiDiGraph()
    view.add_nodes_from(graph)
    for node in graph:
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            source = value.producer()
            if source is not None and source.graph is graph:
                view.add_edge(source, node, value=value, index=index)
    return nx.freeze(view)


def producer(value: ir.Value) -> ir.Node | None:
    """The node that computes `value`, or None for graph inputs and initializers."""
    return value.producer()


def consumers(value: ir.Value) -> list[ir.Node]:
    """Nodes that read `value`, each once, in graph order of first use."""
    seen: dict[int, ir.Node] = {}
    for use in value.uses():
        seen.setdefault(id(use.node), use.node)
    return list(seen.values())


@dataclass(frozen=True)
class NodeWeights:
    """The constant weight and bias inputs of one node (None where absent or not constant)."""

    node: ir.Node
    weight: ir.Value | None
    bias: ir.Value | None


def _constant(value: ir.Value | None) -> ir.Value | None:
    if value is None or value.const_value is None:
        return None
    return value


def node_weights(graph: ir.Graph) -> dict[ir.Node, NodeWeights]:
    """Which initializers are the weight and bias of which node, for ops with learned parameters.

    Only inputs backed by a constant (an initializer or a folded constant) count.
    """
    found: dict[ir.Node, NodeWeights] = {}
    for node in graph:
        found_layout = layout(node)
        if found_layout is None:
            continue
        weight_index, bias_index = found_layout.weight, found_layout.bias
        inputs = list(node.inputs)
        weight = _constant(inputs[weight_index]) if weight_index < len(inputs) else None
        if weight is None and node.op_type == "MatMul":
            weight = _constant(inputs[0])  # constant on the left: W @ x
        bias = None
        if bias_index is not None and bias_index < len(inputs):
            bias = _constant(inputs[bias_index])
        if weight is not None:
            found[node] = NodeWeights(node, weight, bias)
    return found


def parameter_count(model: ir.Model, *, constant_nodes: bool = False) -> int:
    """Elements in all numeric (float, int, bool) initializers of the model and its subgraphs.

    With `constant_nodes`, the tensors of Constant nodes count too: what the file stores, however
    it stores it (old zoo files keep their weights in Constant nodes; a rewrite that lifts them
    to initializers then stores no more).
    """
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.dtype == ir.DataType.STRING:
                continue
            total += math.prod(tensor.shape.numpy())
        if constant_nodes:
            total += sum(_constant_node_size(n) for n in graph if n.op_type == "Constant")
    return total


def _constant_node_size(node: ir.Node) -> int:
    """Elements of a Constant node's numeric value (0 for strings, sparse tensors, other ops)."""
    if node.domain not in ("", "ai.onnx") or not node.attributes:
        return 0
    attr = next(iter(node.attributes.values()))
    if attr.name in ("value_float", "value_int"):
        return 1
    if attr.name in ("value_floats", "value_ints"):
        return len(attr.value)
    tensor = attr.value if attr.name == "value" else None
    if tensor is None or tensor.dtype == ir.DataType.STRING:
        return 0
    return math.prod(tensor.shape.numpy())


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape if every dimension is a known integer, else None."""
    if value is None or value.shape is None:
        return None
    dims = [d for d in value.shape if isinstance(d, int)]
    return tuple(dims) if len(dims) == len(value.shape) else None


class NegativeSizeError(BadInputError):
    """Symbolic dimension sizes too small for the model: some value would get a negative size
    (an audio model's convolutions at a sample count of 1, say). `node` and `shape` name the
    first value found."""

    def __init__(
        self, dims: Mapping[str, int], node: str, op: str, shape: list[int | str]
    ) -> None:
        self.dims, self.node, self.op, self.shape = dict(dims), node, op, shape
        given = ", ".join(f"{k}={v}" for k, v in dims.items())
        super().__init__(
            f"symbolic dimension sizes too small for this model ({given or 'all'}"
            f"{', other symbolic dims 1' if given else ' 1'}): node '{node}' ({op}) would "
            f"have shape {shape}"
        )


class _Negative(ValueError):
    """Raised inside onnxscript's folder to skip a node's inference (it catches and goes on)."""


@contextlib.contextmanager
def _negative_sizes_refused(found: list[tuple[str, str, list[int | str]]]) -> Iterator[None]:
    """While the folder runs, record the first node whose inferred output has a negative size
    and infer nothing downstream of one: onnx's Slice inference aborts the process (a C++
    assertion, not an exception) on an input of negative size."""
    original = onnx.shape_inference.infer_node_outputs

    def guarded(schema, node, input_types, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        for name, value in input_types.items():
            if any(d.HasField("dim_value") and d.dim_value < 0
                   for d in value.tensor_type.shape.dim):  # fmt: skip
                raise _Negative(name)
        outputs = original(schema, node, input_types, *args, **kwargs)
        for value in outputs.values():
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
                    for d in value.tensor_type.shape.dim]  # fmt: skip
            if any(isinstance(d, int) and d < 0 for d in dims):
                found.append((node.name, node.op_type, dims))
                raise _Negative(node.name)
        return outputs

    onnx.shape_inference.infer_node_outputs = guarded  # type: ignore[assignment]
    try:
        yield
    finally:
        onnx.shape_inference.infer_node_outputs = original  # type: ignore[assignment]


def with_static_shapes(model: ir.Model, dim_values: Mapping[str, int] | None = None) -> ir.Model:
    """A structural copy of `model` with symbolic input dimensions fixed and shapes inferred.

    Symbolic dimensions take their value from `dim_values` (by name), else 1. Weight bytes are
    neither read nor copied: initializers stored externally or larger than 1 KiB become typed
    graph inputs of the copy (shape inference needs their shapes, not their values), so the copy
    is for analysis only. Small initializers (Reshape shapes, axes) stay for onnx's data
    propagation.

    Raises:
        NegativeSizeError: the sizes give some value a negative size (too small for the model).
    """
    dim_values = dict(dim_values or {})
    proto = _proto_without_weights(model)
    fixed: dict[str, int] = {}
    for value in proto.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                fixed[dim.dim_param] = _dim_size(dim.dim_param, dim_values)
                dim.dim_value = fixed[dim.dim_param]
    # Symbolic dims recorded on other values (exporters write e.g. [batch, 64]) would survive
    # inference: give the input names their values and forget the rest, so inference fills them.
    # A symbol no input carries (`unk__3` after a rewrite re-inferred shapes), or a dimension
    # with neither size nor name, would survive too: such a value's recorded shape is dropped
    # whole, so inference computes it again.
    for value in (*proto.graph.value_info, *proto.graph.output):
        tensor_type = value.type.tensor_type
        names = [d.dim_param for d in tensor_type.shape.dim if d.HasField("dim_param")]
        unnamed = any(not d.HasField("dim_value") and not d.HasField("dim_param")
                      for d in tensor_type.shape.dim)  # fmt: skip
        if unnamed or any(name not in fixed and name not in dim_values for name in names):
            tensor_type.ClearField("shape")
            continue
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_value = fixed.get(dim.dim_param, dim_values.get(dim.dim_param, 1))
    negative: list[tuple[str, str, list[int | str]]] = []
    proto = _fold_shape_arithmetic(proto, negative)
    if negative:
        name, op, shape = negative[0]
        raise NegativeSizeError({k: v for k, v in fixed.items() if k in dim_values}, name, op,
                                shape)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as error:  # onnx raises several types; analysis goes on with fewer shapes
        logger.warning("shape inference failed (%s); MACs may be incomplete", error)
    shaped = ir.from_proto(proto)
    if has_contrib_ops(shaped):
        infer_shapes(shaped)  # through onnxruntime's fused ops, which onnx does not know
    return shaped


def _dim_size(name: str, dim_values: Mapping[str, int]) -> int:
    """The size of a symbolic dimension: its value in `dim_values`, else a sum of products of
    named dimensions and integers evaluated from them (exporters name a decoder's mask length
    `past_sequence + sequence`), else 1."""
    if name in dim_values:
        return dim_values[name]
    if not re.fullmatch(r"[\w\s.+*]+", name) or not re.search(r"[+*]", name):
        return 1
    total = 0
    for term in name.split("+"):
        product = 1
        for factor in term.split("*"):
            factor = factor.strip()
            product *= int(factor) if factor.isdigit() else dim_values.get(factor, 1)
        total += product
    return total


def _fold_shape_arithmetic(
    proto: onnx.ModelProto, negative: list[tuple[str, str, list[int | str]]]
) -> onnx.ModelProto:
    """Fold Shape -> Gather -> Mul -> Concat chains now that the input dims are fixed.

    Exporters compute Reshape targets from the symbolic batch (`x.view(b * h, ...)`); onnx's data
    propagation gives up on the arithmetic, the Reshape's output shape stays unknown and every
    MatMul after it would be left out of the MACs. onnxscript's constant folding evaluates those
    chains (the copy's weights are graph inputs, so no weight is read).
    The folded graph has fewer nodes; only its inferred shapes come back, as `value_info` of the
    unfolded copy (callers pair nodes of the copy with the model's by position).
    A node whose inferred output has a negative size is appended to `negative` (name, op,
    shape) and the unfolded copy comes back.
    """
    import onnxscript.optimizer

    # the copy's weights are inputs: a node the folder cannot evaluate is expected, not news
    folder_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folder_log.level
    folder_log.setLevel(logging.ERROR)
    try:
        model = ir.from_proto(proto)
        with _negative_sizes_refused(negative):
            onnxscript.optimizer.fold_constants(model, onnx_shape_inference=True)
        if negative:
            return proto
        folded = onnx.shape_inference.infer_shapes(
            ir.to_proto(model), strict_mode=False, data_prop=True
        )
    except Exception as error:  # folding is an aid: analysis goes on with the unfolded copy
        logger.debug("constant folding for shape analysis failed (%s)", error)
        return proto
    finally:
        folder_log.setLevel(level)

    def static(info: onnx.ValueInfoProto) -> bool:
        shape = info.type.tensor_type.shape
        return info.type.tensor_type.HasField("shape") and all(
            d.HasField("dim_value") for d in shape.dim
        )

    found = {info.name: info for info in folded.graph.value_info if static(info)}
    for info in proto.graph.value_info:
        if not static(info) and info.name in found:
            info.CopyFrom(found.pop(info.name))
    inputs = {v.name for v in proto.graph.input}
    for info in proto.graph.value_info:
        found.pop(info.name, None)
    proto.graph.value_info.extend(v for k, v in found.items() if k not in inputs)
    return proto


# Initializers above this many bytes leave the analysis copy (shape inference needs their shapes,
# not their values); smaller ones (Reshape shapes, axes) stay for onnx's data propagation.
_SMALL_TENSOR_BYTES = 1024


def _proto_without_weights(model: ir.Model) -> onnx.ModelProto:
    """`model` as a protobuf whose external or large initializers are typed graph inputs instead.

    Done on the IR, so the weight bytes are never copied into the protobuf (as onnx_ir's own
    shape inference pass does); the model is restored exactly, even when serializing fails.
    """
    graph = model.graph
    inputs = list(graph.inputs)
    initializers = list(graph.initializers.values())
    types = [(value, value.type, value.shape) for value in initializers]
    try:
        for value in initializers:
            tensor = value.const_value
            small = (
                tensor is not None
                and not isinstance(tensor, ir.ExternalTensor)
                and (tensor.nbytes <= _SMALL_TENSOR_BYTES)
            )
            if small:
                continue
            if tensor is not None:
                value.type = ir.TensorType(tensor.dtype)
                value.shape = ir.Shape(tensor.shape.numpy())
            graph.initializers.pop(_name(value))
            if value not in inputs:
                graph.inputs.append(value)
        return ir.to_proto(model)
    finally:
        graph.inputs.clear()
        graph.inputs.extend(inputs)
        for value in list(graph.initializers.values()):
            graph.initializers.pop(_name(value))
        for value, type_, shape in types:
            value.type, value.shape = type_, shape
            graph.initializers.add(value)


def _name(initializer: ir.Value) -> str:
    """An initializer's name (onnx_ir requires one to register it)."""
    assert initializer.name is not None
    return initializer.name


def node_macs(node: ir.Node) -> int | None:
    """Multiply-accumulates of one Conv, ConvTranspose, Gemm or MatMul with static shapes, of
    their quantized forms (`QUANTIZED_MAC_FORMS`) and of fused attention (`ATTENTION_OPS`: the
    MatMuls it replaces, `slimgraph.ir.attention_macs`).

    Returns None for other ops and when a needed shape is unknown.
    """
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        weight = static_shape(node.inputs[1])
        if weight is None or len(weight) < 3:
            return None
        kernel = math.prod(weight[2:])
        if op == "Conv":
            out = static_shape(node.outputs[0])
            if out is None:
                return None
            # weight: (C_out, C_in / group, k...); each output element costs C_in/group * k MACs
            return math.prod(out) * weight[1] * kernel
        source = static_shape(node.inputs[0])
        if source is None:
            return None
        # ConvTranspose weight: (C_in, C_out / group, k...); each input element scatters to
        # C_out/group * k outputs
        return math.prod(source) * weight[1] * kernel
    if op == "Gemm":
        a = static_shape(node.inputs[0])
        b = static_shape(node.inputs[1])
        if a is None or b is None:
            return None
        trans_a = node.attributes.get_int("transA", 0)
        m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
        gemm = layout(node)
        n = gemm.out_channels(b) if gemm is not None else None  # B' = B^T with transB
        return None if n is None else m * k * n
    if op == "MatMul":
        a = static_shape(node.inputs[0])
        b = static_shape(node.inputs[1])
        out = static_shape(node.outputs[0])
        if a is None or b is None or out is None:
            return None
        k = a[-1] if len(a) >= 1 else 1
        return math.prod(out) * k
    if (node.domain if node.domain != "ai.onnx" else "", op) in ATTENTION_OPS:
        return attention_macs(node)
    return _quantized_macs(node)


def _quantized_macs(node: ir.Node) -> int | None:
    """MACs of a quantized form (`QUANTIZED_MAC_FORMS`), counted as the float op it replaces:
    a convolution from its weight and output shapes, a product as M x K x N (the rows of the
    activation, K and N from MatMulNBits' attributes or the [K, N] weight; the output's shape
    when it is known, so batched weights count too)."""
    form = QUANTIZED_MAC_FORMS.get((node.domain or "", node.op_type))
    if form is None:
        return None
    kind, weight_index = form
    a = static_shape(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    out = static_shape(node.outputs[0])
    if kind == "Conv":
        weight = static_shape(node.inputs[weight_index]) if len(node.inputs) > weight_index \
            else None
        if weight is None or len(weight) < 3 or out is None:
            return None
        return math.prod(out) * weight[1] * math.prod(weight[2:])
    if a is None or not a:
        return None
    if node.op_type == "MatMulNBits":
        k, n = node.attributes.get_int("K", 0), node.attributes.get_int("N", 0)
        return math.prod(a[:-1]) * k * n if k and n else None
    b = static_shape(node.inputs[weight_index]) if len(node.inputs) > weight_index else None
    if out is not None:
        return math.prod(out) * a[-1]
    if b is None or len(b) != 2:
        return None
    return math.prod(a[:-1]) * b[0] * b[1]


# Ops whose multiply-accumulates `node_macs` counts (default domain).
MAC_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Quantized forms `node_macs` counts as the float op they replace: (domain, op type) ->
# (that op, the input holding the weight). MatMulNBits reads K and N from its attributes.
QUANTIZED_MAC_FORMS: dict[tuple[str, str], tuple[str, int]] = {
    ("", "MatMulInteger"): ("MatMul", 1),
    ("", "QLinearMatMul"): ("MatMul", 3),
    ("", "ConvInteger"): ("Conv", 1),
    ("", "QLinearConv"): ("Conv", 3),
    ("com.microsoft", "MatMulIntegerToFloat"): ("MatMul", 1),
    ("com.microsoft", "DynamicQuantizeMatMul"): ("MatMul", 1),
    ("com.microsoft", "MatMulNBits"): ("MatMul", 1),
}


def counts_macs(node: ir.Node) -> bool:
    """Whether `node_macs` counts `node`: a float Conv, ConvTranspose, Gemm or MatMul, one of
    their quantized forms (`QUANTIZED_MAC_FORMS`) or a fused attention (`ATTENTION_OPS`)."""
    domain = node.domain or ""
    if domain == "ai.onnx":
        domain = ""
    return (domain == "" and node.op_type in MAC_OPS) or (
        (domain, node.op_type) in QUANTIZED_MAC_FORMS) or (domain, node.op_type) in ATTENTION_OPS


def macs_by_node(
    model: ir.Model, dim_values: Mapping[str, int] | None = None
) -> tuple[dict[ir.Node, int], int]:
    """MACs of each Conv, ConvTranspose, Gemm and MatMul of `model`'s main graph (and of their
    quantized forms and fused attention, as the ops they replace: `QUANTIZED_MAC_FORMS`,
    `ATTENTION_OPS`), and how many of them
    stayed without static shapes (left out). The one MAC count: `inspect`, `prune` and
    `factorize` all report it.

    Symbolic dimensions take their value from `dim_values` (by name), else 1; shapes come from
    `with_static_shapes`, a structural copy with the same nodes in the same order, so nodes pair
    by position (names may repeat or be empty).
    """
    counted = [node for node in model.graph if counts_macs(node)]
    if not counted:
        return {}, 0
    shaped = with_static_shapes(model, dim_values)
    found: dict[ir.Node, int] = {}
    unknown = 0
    for original, copy in zip(model.graph, shaped.graph, strict=True):
        if not counts_macs(original):
            continue
        macs = node_macs(copy)
        if macs is None:
            unknown += 1
        else:
            found[original] = int(macs)
    if unknown:
        logger.info("%d MAC-counting nodes have unknown shapes and are left out", unknown)
    return found, unknown


def model_macs(model: ir.Model, dim_values: Mapping[str, int] | None = None) -> dict[str, int]:
    """MACs per node name (Conv, ConvTranspose, Gemm, MatMul), as `macs_by_node` counts them.

    Nodes whose shapes stay unknown after inference are left out. Unnamed nodes, and a name
    already used by an earlier node, are keyed `<name or op type>#<node index>`, so no node's
    MACs overwrite another's.
    """
    found, _ = macs_by_node(model, dim_values)
    result: dict[str, int] = {}
    for index, node in enumerate(model.graph):
        if node in found:
            key = node.name if node.name and node.name not in result else None
            result[key or f"{node.name or node.op_type}#{index}"] = found[node]
    return result


# Elements checked at a time for NaN/Inf (bounds the temporary boolean array: 16 MiB).
_FINITE_CHUNK = 1 << 24


def _first_nonfinite(array: np.ndarray, *, inf_too: bool) -> tuple[int, int] | None:
    """(count, first flat index) of NaN (and Inf when `inf_too`) in `array`, chunk by chunk so a
    memory-mapped multi-GB weight is never copied whole; None when there is none."""
    flat = array.reshape(-1)
    count, first = 0, -1
    for start in range(0, flat.size, _FINITE_CHUNK):
        chunk = flat[start : start + _FINITE_CHUNK]
        bad = ~np.isfinite(chunk) if inf_too else np.isnan(chunk)
        hits = int(np.count_nonzero(bad))
        if hits:
            if first < 0:
                first = start + int(np.argmax(bad))
            count += hits
    return (count, first) if count else None


def check_finite_weights(model: ir.Model) -> None:
    """Refuse a model whose weights hold NaN or Inf, naming the tensor.

    Every float initializer is checked for NaN (never a meaningful weight); the weights and
    biases of layers with learned parameters (`slimgraph.ir.layout.LAYOUTS`) also for ±Inf.
    Other constants may hold ±Inf on purpose (attention masks). Compressing such a model would
    hide the fault: quantization turns NaN into a finite integer, so the result answers where the
    model gives NaN.

    Raises:
        InvalidModelError: one line naming the tensor, the count and the first bad index.
    """
    graphs = (model.graph, *model.graph.subgraphs())
    weights: set[int] = set()
    for graph in graphs:
        for entry in node_weights(graph).values():
            weights.update(id(v) for v in (entry.weight, entry.bias) if v is not None)
    for graph in graphs:
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None or not tensor.dtype.is_floating_point():
                continue
            try:
                array = tensor.numpy()
            except Exception:  # noqa: BLE001 - unreadable data is the loader's to report
                continue
            if array.dtype.kind != "f":
                continue  # bfloat16/float8 come back as ml_dtypes: NaN checks need a cast
            found = _first_nonfinite(array, inf_too=id(value) in weights)
            if found is None:
                continue
            count, first = found
            index = tuple(int(i) for i in np.unravel_index(first, array.shape))
            what = "NaN" if np.isnan(array.reshape(-1)[first]) else "Inf"
            raise InvalidModelError(
                f"weight '{name}' holds {count} NaN/Inf value(s) of {array.size} (first: {what} "
                f"at index {list(index)}): fix the model before compressing it"
            )
