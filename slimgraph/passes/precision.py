"""fp16 conversion: float32 weights and internal values to float16, float32 where fp16 fails.

Approximate pass (seed 003, "precision formats, mixed precision"): every float32 initializer and
intermediate value becomes float16 (half the file size) except where half precision overflows or
loses too much. The rules:

- Model inputs and outputs stay float32 (`keep_io_types`, default): Casts at the boundaries.
- Ops in `keep_ops` run in float32 with Casts around them. The defaults (DEFAULT_KEEP_OPS) are the
  ops whose fp16 results overflow or drift: Pow (x^2 > 65504 once |x| > 256, e.g. a decomposed
  variance), Exp (overflows for x > 11), ReduceMean / ReduceSum / ReduceSumSquare / ReduceL2 /
  ReduceLogSumExp (sums over large axes leave fp16's range or lose the low bits) and
  Softmax/LogSoftmax (they exponentiate). The elementwise chain from a kept op to the Sqrt that
  brings its range back (the `+ eps` of a variance) stays float32 with it. LayerNormalization is
  converted: its statistics are float32 by the spec (`stash_type` = 1).
  Measured in true fp16 arithmetic (onnx's reference evaluator; onnxruntime's CPU provider casts
  most fp16 ops to float32 and hides the difference) on the BERT-style encoder, 1 - cosine vs
  fp32: 3.0e-7 with the defaults, 4.1e-7 with nothing kept, 3.9e-7 without Softmax, 2.8e-7 with
  LayerNormalization added; on the CNNs and the MLP the list makes no difference (no such ops).
  On a decomposed LayerNorm with |x| ~ 1000, nothing kept overflows (tests/passes/quantize).
- Nodes computing shapes (anything feeding a Reshape/Expand/Slice/Tile/ConstantOfShape/Range/
  Resize shape-like input, back to Shape/Size) keep their dtypes, and so do Range, Resize's roi
  and scales, and ops from other domains or with subgraphs.
- Constants are converted at build time, not by Casts at run time (out-of-range values are
  clipped to +-65504; a Cast of a constant is folded), and Casts to float32 inside the fp16
  region become Casts to float16.

onnxruntime's CPU provider runs fp16 only for a few ops and casts around the rest itself, so
on this CPU fp16 shrinks files but does not speed models up (docs/architecture.md, "Runtime").
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import ModelLike, as_model, copy_model, layer_name, metadata
from slimgraph.ir.analysis import check_finite_weights
from slimgraph.passes._kit import Names, add_initializer, constant_node_array
from slimgraph.passes.base import Skipped, SlimgraphPass, SlimgraphPassResult
from slimgraph.passes.registry import register_pass

__all__ = ["DEFAULT_KEEP_OPS", "Fp16Result", "Fp16Pass", "convert_fp16", "store_weights_fp16"]

logger = logging.getLogger(__name__)

DEFAULT_KEEP_OPS: tuple[str, ...] = (
    "Pow",
    "Exp",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "Softmax",
    "LogSoftmax",
)

_FP16_MAX = float(np.finfo(np.float16).max)

# store_weights_fp16 leaves smaller constants (biases, scales) float32: a Cast node costs about
# as many bytes as halving them saves.
_MIN_STORED_ELEMENTS = 64

# Ops that always keep their dtypes (float32-only kernels or value ranges fp16 cannot index).
_ALWAYS_FLOAT = frozenset(
    {"Range", "DynamicQuantizeLinear", "NonMaxSuppression", "RandomNormal", "RandomUniform",
     "RandomNormalLike", "RandomUniformLike", "Multinomial", "If", "Loop", "Scan"}
)

# Input positions that must keep their dtype even in fp16 nodes (float32-only by the spec).
_KEEP_POSITIONS: dict[str, frozenset[int]] = {
    "Resize": frozenset({1, 2}),
    "Upsample": frozenset({1}),
}

# Inputs that are shapes, sizes, indices or axes: what computes them is shape arithmetic.
_SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "ConstantOfShape": (0,),
    "Slice": (1, 2, 3, 4),
    "Tile": (1,),
    "Range": (0, 1, 2),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Pad": (1, 3),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "TopK": (1,),
    "OneHot": (1,),
    "Split": (1,),
    "ReduceMean": (1,),
    "ReduceSum": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceL2": (1,),
    "ReduceSumSquare": (1,),
}
# Shape sources: shape arithmetic stops here (their data input is not part of it).
_SHAPE_SOURCES = frozenset({"Shape", "Size"})


@dataclass
class Fp16Result(SlimgraphPassResult):
    """What `Fp16Pass` converted: node and initializer counts, Casts inserted, clipped values."""

    converted_nodes: int = 0
    kept_nodes: list[str] = field(default_factory=list)
    converted_initializers: int = 0
    casts_inserted: int = 0
    clipped_values: int = 0


@register_pass("fp16", exact=False)
class Fp16Pass(SlimgraphPass):
    """Convert float32 to float16 except I/O and `keep_ops` (approximate: `exact = False`).

    Args:
        keep_io_types: keep float32 model inputs and outputs (Casts at the boundaries).
        keep_ops: op types that run in float32 (default DEFAULT_KEEP_OPS).
    """

    exact = False

    def __init__(
        self, *, keep_io_types: bool = True, keep_ops: Sequence[str] = DEFAULT_KEEP_OPS
    ) -> None:
        super().__init__()
        if isinstance(keep_ops, str):
            keep_ops = (keep_ops,)
        self.keep_io_types = keep_io_types
        self.keep_ops = frozenset(keep_ops)

    def requires(self, model: ir.Model) -> None:
        bad = [op for op in self.keep_ops if not op or not op[0].isupper() or not op.isalnum()]
        if bad:
            raise BadOptionError(f"keep_ops takes ONNX op types such as Softmax (got {bad[0]!r})")
        if not any(
            v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT
            for v in model.graph.initializers.values()
        ) and not any(v.dtype == ir.DataType.FLOAT for n in model.graph for v in n.outputs):
            raise UnsupportedModelError(
                "nothing to convert to fp16: the model has no float32 values"
            )

    def call(self, model: ir.Model) -> Fp16Result:
        check_finite_weights(model)  # NaN/Inf weights: refused, naming the tensor
        return _Converter(model, self.keep_io_types, self.keep_ops).run()


def convert_fp16(
    model: ModelLike,
    *,
    keep_io_types: bool = True,
    keep_ops: Sequence[str] = DEFAULT_KEEP_OPS,
) -> ir.Model:
    """A float16 copy of `model` (the input is left untouched). Approximate.

    Every float32 weight and intermediate value becomes float16 (the file about halves), except:
    model inputs and outputs stay float32 (Casts at the boundaries) unless `keep_io_types` is
    False; ops in `keep_ops` run in float32 (by default the ops whose fp16 results overflow or
    drift: Pow, Exp, the Reduce sums and means, Softmax/LogSoftmax); shape computations keep
    their dtypes. Weights beyond fp16's range are clipped to +-65504. onnxruntime's CPU provider
    runs few ops in fp16, so on CPU this shrinks the file without speeding the model up. Method:
    mixed precision as in seed 003 (precision formats).

    Args:
        model: an `onnx_ir.Model` or the path of an `.onnx` file.
        keep_io_types: keep float32 model inputs and outputs.
        keep_ops: ONNX op types that stay float32 (default `DEFAULT_KEEP_OPS`).

    Returns:
        The float16 model (float32 inputs and outputs by default).

    Raises:
        BadOptionError: `keep_ops` holds something that is not an op type, or `model` is neither
            a model nor a path.
        UnsupportedModelError: the model has no float32 values.
        ModelLoadError: `model` is a path that cannot be loaded.

    Example:
        >>> half = convert_fp16(model)  # doctest: +SKIP
    """
    model = as_model(model)
    return Fp16Pass(keep_io_types=keep_io_types, keep_ops=keep_ops)(copy_model(model)).model


class _Converter:
    def __init__(self, model: ir.Model, keep_io_types: bool, keep_ops: frozenset[str]) -> None:
        self.model = model
        self.graph = model.graph
        self.keep_io_types = keep_io_types
        self.keep_ops = keep_ops
        self.half: set[int] = set()  # ids of values this pass turned float16
        self.to_half: dict[int, ir.Value] = {}
        self.to_float: dict[int, ir.Value] = {}
        self.names = Names(self.graph)
        self.result = Fp16Result(model, modified=False)

    def _name(self, base: str) -> str:
        return self.names.fresh(base)

    def run(self) -> Fp16Result:
        graph = self.graph
        _infer_types(self.model)
        shape_nodes = _shape_nodes(graph)
        self.range_nodes = _paths_to_sqrt(graph, self.keep_ops)
        for value in graph.inputs:  # weights listed as inputs too (opset < 9 style): weights
            if value.const_value is not None and value.dtype == ir.DataType.FLOAT:
                value.const_value = self._half_tensor(value.const_value.numpy(), value.name or "w")
                value.type = ir.TensorType(ir.DataType.FLOAT16)
                self.half.add(id(value))
                self.result.converted_initializers += 1
        if not self.keep_io_types:
            for value in graph.inputs:
                if value.dtype == ir.DataType.FLOAT and id(value) not in self.half:
                    value.type = ir.TensorType(ir.DataType.FLOAT16)
                    self.half.add(id(value))
        for node in list(graph):
            reason = self._float_reason(node, shape_nodes)
            if reason is None:
                self._convert(node)
            else:
                self._keep(node, reason)
        self._fix_outputs()
        self._fix_subgraph_reads()
        self._shape_readers_to_half()
        onnx_ir.passes.common.RemoveUnusedNodesPass()(self.model)
        self.result.modified = bool(self.half)
        return self.result

    def _float_reason(self, node: ir.Node, shape_nodes: set[int]) -> str | None:
        if node.domain not in ("", "ai.onnx"):
            return f"domain {node.domain}"
        if node.op_type in self.keep_ops:
            return "kept in float32 (keep_ops)"
        if node.op_type in _ALWAYS_FLOAT or any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        ):
            return "float32-only op or subgraph"
        if id(node) in shape_nodes:
            return "computes a shape"
        if id(node) in self.range_nodes:
            return "kept in float32 (between a kept op and its Sqrt)"
        return None

    def _keep(self, node: ir.Node, reason: str) -> None:
        touches_float = False
        for index, value in enumerate(node.inputs):
            if value is not None and id(value) in self.half:
                node.replace_input_with(index, self._float_version(value, node))
                touches_float = True
        if touches_float or any(v.dtype == ir.DataType.FLOAT for v in node.outputs):
            self.result.kept_nodes.append(node.name or node.op_type)
            if reason.startswith("kept"):
                self.result.skipped.append(Skipped(node.name or "", node.op_type, reason))

    def _convert(self, node: ir.Node) -> None:
        keep = _KEEP_POSITIONS.get(node.op_type, frozenset())
        changed = False
        if node.op_type == "Cast":
            if node.attributes.get_int("to") == ir.DataType.FLOAT:
                node.attributes["to"] = ir.Attr("to", ir.AttributeType.INT, ir.DataType.FLOAT16)
                changed = True
        elif node.op_type == "Constant":
            changed = self._convert_constant_node(node)
        else:
            for index, value in enumerate(node.inputs):
                if value is None or index in keep or id(value) in self.half:
                    continue
                if value.dtype == ir.DataType.FLOAT:
                    node.replace_input_with(index, self._half_version(value, node))
                    changed = True
            if node.op_type == "ConstantOfShape" and (attr := node.attributes.get("value")):
                tensor = attr.as_tensor()
                if tensor.dtype == ir.DataType.FLOAT:
                    node.attributes["value"] = ir.Attr(
                        "value", ir.AttributeType.TENSOR, self._half_tensor(tensor.numpy(), "value")
                    )
        for value in node.outputs:
            if value.dtype == ir.DataType.FLOAT:
                value.type = ir.TensorType(ir.DataType.FLOAT16)
                self.half.add(id(value))
                changed = True
        if changed:
            self.result.converted_nodes += 1
        if node.op_type == "Cast" and changed:
            self._fold_cast(node)

    def _convert_constant_node(self, node: ir.Node) -> bool:
        value = node.outputs[0]
        if value.dtype != ir.DataType.FLOAT:
            return False
        array = constant_node_array(node)
        if array is None:
            return False
        for name in list(node.attributes):
            del node.attributes[name]
        node.attributes["value"] = ir.Attr(
            "value", ir.AttributeType.TENSOR, self._half_tensor(array, value.name or "c")
        )
        return True

    def _fold_cast(self, node: ir.Node) -> None:
        """Cast(constant) to float16 becomes a float16 initializer."""
        source = node.inputs[0]
        if source is None or source.const_value is None:
            return
        out = node.outputs[0]
        initializer = self._initializer(source.const_value.numpy(), out.name or "cast")
        ir.convenience.replace_all_uses_with(out, initializer, replace_graph_outputs=False)
        if not out.is_graph_output():
            self.graph.remove(node, safe=True)

    def _half_tensor(self, array: np.ndarray, name: str) -> ir.TensorProtocol:
        tensor, clipped = _half_tensor(array, name)
        self.result.clipped_values += clipped
        return tensor

    def _initializer(self, array: np.ndarray, base: str) -> ir.Value:
        name = self._name(f"{base}_fp16")
        value = add_initializer(self.graph, name, self._half_tensor(array, name))
        self.half.add(id(value))
        self.result.converted_initializers += 1
        return value

    def _half_version(self, value: ir.Value, consumer: ir.Node) -> ir.Value:
        key = id(value)
        if key not in self.to_half:
            if value.const_value is not None:
                self.to_half[key] = self._initializer(value.const_value.numpy(), value.name or "w")
            else:
                self.to_half[key] = self._cast(value, ir.DataType.FLOAT16, consumer)
                self.half.add(id(self.to_half[key]))
        return self.to_half[key]

    def _float_version(self, value: ir.Value, consumer: ir.Node) -> ir.Value:
        key = id(value)
        if key not in self.to_float:
            self.to_float[key] = self._cast(value, ir.DataType.FLOAT, consumer)
        return self.to_float[key]

    def _cast(self, value: ir.Value, dtype: ir.DataType, before: ir.Node) -> ir.Value:
        suffix = "fp16" if dtype == ir.DataType.FLOAT16 else "fp32"
        props = {metadata.LAYER: layer_name(before)} if layer_name(before) else None
        cast = ir.node(
            "Cast", [value], {"to": dtype}, name=self._name(f"{value.name or 'v'}_to_{suffix}"),
            metadata_props=props,
        )
        out = cast.outputs[0]
        out.name = self._name(f"{value.name or 'v'}_{suffix}")
        out.type = ir.TensorType(dtype)
        out.shape = value.shape
        producer = value.producer()
        if producer is not None and producer.graph is self.graph:
            self.graph.insert_after(producer, cast)
        elif before.graph is self.graph:
            self.graph.insert_before(before, cast)
        else:  # an outer input read by a subgraph: cast it first thing
            self.graph.insert_before(next(iter(self.graph)), cast)
        self.result.casts_inserted += 1
        return out

    def _fix_subgraph_reads(self) -> None:
        """Subgraphs (If/Loop/Scan bodies, left float32) that read an outer value turned float16
        get a float32 Cast of it."""
        values = [*self.graph.inputs, *self.graph.initializers.values()]
        values += [v for node in self.graph for v in node.outputs]
        for value in values:
            if id(value) not in self.half:
                continue
            for use in list(value.uses()):
                if use.node.graph is not self.graph:
                    use.node.replace_input_with(use.idx, self._float_version(value, use.node))

    def _shape_readers_to_half(self) -> None:
        """Shape/Size of a float32 weight read its float16 copy, so the float32 one can go."""
        for node in self.graph:
            if node.op_type in _SHAPE_SOURCES and node.inputs and node.inputs[0] is not None:
                half = self.to_half.get(id(node.inputs[0]))
                if half is not None and node.inputs[0].const_value is not None:
                    node.replace_input_with(0, half)

    def _fix_outputs(self) -> None:
        """float16 graph outputs get a Cast back to float32 that takes over their name."""
        if not self.keep_io_types:
            return
        for index, value in enumerate(self.graph.outputs):
            if id(value) not in self.half:
                continue
            name = value.name
            value.name = self._name(f"{name}_fp16")
            cast = ir.node(
                "Cast", [value], {"to": ir.DataType.FLOAT}, name=self._name(f"{name}_to_fp32")
            )
            out = cast.outputs[0]
            out.name = name
            out.type = ir.TensorType(ir.DataType.FLOAT)
            out.shape = value.shape
            self.graph.append(cast)
            self.graph.outputs[index] = out
            self.result.casts_inserted += 1


def store_weights_fp16(model: ir.Model, nodes: Collection[str]) -> Fp16Result:
    """In place: the float32 constant weights of `nodes` stored as float16, computed in float32.

    Each float32 initializer of at least 64 elements that only the named nodes read becomes a
    float16 initializer read through a `Cast` to float32: the file holds half the bytes, the
    nodes still compute in float32 (onnxruntime's CPU provider has no float16 Conv or Gemm
    kernel, and folds the Cast of a constant when it builds a session, so the model runs as
    before). Values beyond float16's range are clipped to +-65504 (counted). Approximate: each
    weight is rounded to float16 (relative error at most 2^-11).

    Args:
        model: changed in place.
        nodes: the names of the nodes whose weights are stored in float16 (names not in the
            graph are ignored).

    Returns:
        An `Fp16Result`: `converted_initializers`, `casts_inserted`, `clipped_values`; `modified`
        when a weight was converted.
    """
    graph = model.graph
    chosen = [node for node in graph if node.name in set(nodes)]
    names = {id(node) for node in chosen}
    fresh = Names(graph)
    result = Fp16Result(model, modified=False)
    for node in chosen:
        for value in node.inputs:
            if (value is None or value.const_value is None or value.name not in
                    graph.initializers or value.const_value.dtype != ir.DataType.FLOAT
                    or value.const_value.size < _MIN_STORED_ELEMENTS or value.is_graph_input()
                    or value.is_graph_output()
                    or any(id(use.node) not in names for use in value.uses())):
                continue
            name = value.name or "w"
            half_name = fresh.fresh(f"{name}_fp16")
            tensor, clipped = _half_tensor(value.const_value.numpy(), half_name)
            half = add_initializer(graph, half_name, tensor)
            props = {metadata.LAYER: layer_name(node)} if layer_name(node) else None
            cast = ir.node("Cast", [half], {"to": ir.DataType.FLOAT},
                           name=fresh.fresh(f"{name}_to_fp32"), metadata_props=props)
            out = cast.outputs[0]
            out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), value.shape
            graph.insert_before(node, cast)
            ir.convenience.replace_all_uses_with(value, out)
            graph.initializers.pop(name)
            out.name = name  # the weight keeps its name: node names and layers stay as they were
            result.converted_initializers += 1
            result.casts_inserted += 1
            result.clipped_values += clipped
    result.modified = result.converted_initializers > 0
    return result


def _half_tensor(array: np.ndarray, name: str) -> tuple[ir.TensorProtocol, int]:
    """`array` as a float16 tensor, values beyond float16's range clipped; the count clipped."""
    array = np.asarray(array, np.float32)
    clipped = np.isfinite(array) & (np.abs(array) > _FP16_MAX)
    array = np.where(clipped, np.clip(array, -_FP16_MAX, _FP16_MAX), array)
    return ir.tensor(array.astype(np.float16), name=name), int(clipped.sum())


def _infer_types(model: ir.Model) -> None:
    """Fill in value types the exporter left out (a float value without a type would be missed)."""
    try:
        onnx_ir.passes.common.ShapeInferencePass()(model)
    except Exception as error:  # inference is a help here, not a requirement
        logger.warning("type inference failed before fp16 conversion: %s", error)
    untyped = [n.name for n in model.graph for v in n.outputs if v.type is None]
    if untyped:
        logger.warning("%d node outputs have no type after inference (e.g. %s); they keep "
                       "their dtype", len(untyped), untyped[0])


_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div"})
_RANGE_RESTORING = frozenset({"Sqrt", "Reciprocal"})


def _paths_to_sqrt(graph: ir.Graph, keep_ops: frozenset[str]) -> set[int]:
    """Ids of elementwise nodes between a kept op and the Sqrt that brings its range back.

    In a decomposed normalization, Pow -> ReduceMean -> Add(eps) -> Sqrt, the variance exceeds
    fp16's range long before the Sqrt: the Add (and the Sqrt) must stay float32 too. Follows
    single-consumer chains of Add/Sub/Mul/Div for up to 4 nodes; no Sqrt, nothing is marked.
    """
    marked: set[int] = set()
    for node in graph:
        if node.op_type not in keep_ops or not node.outputs:
            continue
        path: list[ir.Node] = []
        value = node.outputs[0]
        for _ in range(4):
            uses = list(value.uses())
            if len(uses) != 1:
                break
            successor = uses[0].node
            if successor.op_type in keep_ops:
                value = successor.outputs[0]
                continue
            if successor.op_type not in _ELEMENTWISE | _RANGE_RESTORING:
                break
            path.append(successor)
            if successor.op_type in _RANGE_RESTORING:
                marked.update(id(n) for n in path)
                break
            value = successor.outputs[0]
    return marked


def _shape_nodes(graph: ir.Graph) -> set[int]:
    """Ids of nodes whose results only feed shape-like inputs (walking back to Shape/Size)."""
    marked: set[int] = set()
    stack: list[ir.Value] = []
    for node in graph:
        for index in _SHAPE_INPUTS.get(node.op_type, ()):
            if index < len(node.inputs) and node.inputs[index] is not None:
                stack.append(node.inputs[index])  # type: ignore[arg-type]
    while stack:
        value = stack.pop()
        producer = value.producer()
        if producer is None or id(producer) in marked or producer.graph is not graph:
            continue
        marked.add(id(producer))
        if producer.op_type in _SHAPE_SOURCES:
            continue
        stack.extend(v for v in producer.inputs if v is not None)
    return marked
