"""The shared graph-editing kit: weight layouts, constants, names, initializers, weight folding.

Every pass family (fuse, quantize, prune, factorize, precision) edits weights the same way; this
module is the one home of that mechanics:

- `OpLayout`, `LAYOUTS`, `layout(node)`: where an op's weight and bias are and which weight axes
  hold its channels (the table itself lives in `slimgraph.ir.layout`, which `ir` reads too);
- `constant_array(value)`: the array of an initializer or folded constant;
  `traced_constant(value)`: the same through short chains of data-movement ops over constants;
- `Names(graph).fresh(base)`: the one fresh-name allocator (defined in `_names`, a leaf the
  rewiring helpers import too);
- `add_initializer(graph, base, array)`: a new initializer under a fresh name;
  `set_constant(node, index, array)`: a new constant for one input, copy-on-share;
- `PrepareWeightsPass(scope=...)`: exact; folds the run-time computation of weights (Transpose,
  Cast, DequantizeLinear, Reshape, ConstantOfShape... of constants) into initializers.

Importing this module imports no onnxruntime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from slimgraph.ir.layout import LAYOUTS, OpLayout, layout
from slimgraph.passes._names import Names
from slimgraph.passes.base import SlimgraphPass, SlimgraphPassResult

__all__ = [
    "OpLayout",
    "LAYOUTS",
    "layout",
    "constant_array",
    "constant_node_array",
    "traced_constant",
    "CONSTANT_OPS",
    "Names",
    "add_initializer",
    "set_constant",
    "Scope",
    "PrepareWeightsResult",
    "PrepareWeightsPass",
]

logger = logging.getLogger(__name__)

_ONNX_DOMAINS = ("", "ai.onnx")

# ---------------------------------------------------------------------------------- constants


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant input (initializer or folded constant), else None.

    None too for a graph input with a default (the user may override it) and for a tensor that
    cannot be read (missing external data, a data type numpy lacks).
    """
    if value is None or value.const_value is None:
        return None
    if value.is_graph_input():  # a default the user may override: not a constant
        return None
    try:
        return value.const_value.numpy()
    except Exception:  # noqa: BLE001 - unreadable external data, unsupported dtype
        return None


def constant_node_array(node: ir.Node) -> np.ndarray | None:
    """The value of a Constant node, read without touching the node (models may share tensors)."""
    for name, attr in node.attributes.items():
        if name == "value":
            return attr.as_tensor().numpy()
        if name in ("value_float", "value_floats"):
            return np.asarray(attr.value, np.float32)
        if name in ("value_int", "value_ints"):
            return np.asarray(attr.value, np.int64)
    return None


# Ops through which `traced_constant` follows a constant (all their inputs constant). A dynamo
# export reads a Linear's weight through `Transpose(initializer)` and reorders LSTM gates with
# Slice/Concat.
CONSTANT_OPS: frozenset[str] = frozenset(
    {"Constant", "Identity", "Transpose", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape",
     "Split", "Gather", "Cast", "Flatten", "Expand", "Shape", "Mul", "Add", "Sub", "Div"}
)
_MAX_CHAIN = 8


def traced_constant(
    value: ir.Value | None, *, through: Collection[str] = CONSTANT_OPS, _depth: int = 0
) -> np.ndarray | None:
    """The numpy value of `value` if it is computed from constants only, else None.

    Follows initializers, Constant nodes and chains of up to 8 ops of `through` over them
    (default `CONSTANT_OPS`: Transpose, Identity, Slice, Concat, Cast, Reshape, ...; pass a set
    with "DequantizeLinear" to read a QDQ weight as floats), evaluated with onnx's reference
    implementation. The graph is not changed.

    Args:
        value: the value to trace (None gives None).
        through: the op types that may compute the constant.

    Returns:
        The array as the consumer sees it, or None when some input is not a constant (or an
        overridable graph input) or an op cannot be evaluated.
    """
    if value is None or _depth > _MAX_CHAIN:
        return None
    if value.const_value is not None:
        return constant_array(value)  # None for an overridable graph input's default
    node = value.producer()
    if node is None or node.domain not in _ONNX_DOMAINS or node.op_type not in through:
        return None
    if node.op_type == "Constant":
        return constant_node_array(node)
    if node.op_type == "Shape" and node.inputs[0] is not None:
        shape = node.inputs[0].shape
        if shape is not None and shape.is_static():
            dims = np.asarray(shape.numpy(), np.int64)
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", len(dims))
            return dims[start:end]
    arrays = [
        traced_constant(v, through=through, _depth=_depth + 1) if v is not None else None
        for v in node.inputs
    ]
    if any(a is None for a, v in zip(arrays, node.inputs, strict=True) if v is not None):
        return None
    first = arrays[0]
    if node.op_type == "Identity":
        return first
    if node.op_type == "Transpose" and first is not None:
        return np.transpose(first, node.attributes.get_ints("perm"))
    return _evaluate(node, arrays, value)


def _evaluate(node: ir.Node, arrays: list[np.ndarray | None], value: ir.Value) -> np.ndarray | None:
    from onnx.reference import ReferenceEvaluator

    names = [f"i{k}" if a is not None else "" for k, a in enumerate(arrays)]
    proto = onnx.helper.make_node(
        node.op_type, names, [f"o{k}" for k in range(len(node.outputs))],
        **{name: attr.value for name, attr in node.attributes.items()},
    )
    try:
        outputs = ReferenceEvaluator(proto).run(
            None, {n: a for n, a in zip(names, arrays, strict=True) if n}
        )
    except Exception:  # noqa: BLE001 - an op the reference cannot evaluate: not a constant
        return None
    index = value.index()
    if index is None or not isinstance(outputs, list | tuple):  # run(None, ...) gives a list
        return None
    return np.asarray(outputs[index])


# -------------------------------------------------------------------------- names, initializers


def add_initializer(
    graph: ir.Graph,
    base: str,
    array: np.ndarray | ir.TensorProtocol,
    *,
    names: Names | None = None,
) -> ir.Value:
    """Register `array` as a new initializer of `graph` under a fresh name derived from `base`.

    Args:
        graph: the graph to add to.
        base: the wanted name; `base_1`, `base_2`, ... when it is taken.
        array: the data (copied into a contiguous tensor), or a tensor (shared, not copied).
        names: the allocator to draw from (a pass creating many values keeps one). Without
            it the name is only kept apart from the graph's initializers (cheap, for a `base`
            that already came from an allocator); pass `Names(graph, node_names=False)` to keep
            it apart from every value name.

    Returns:
        The new initializer value, with its shape and type set.

    Raises:
        ValueError: (from onnx_ir) `names` handed out the name of an existing initializer (an
            allocator made before that initializer was added elsewhere).
    """
    if names is not None:
        name = names.fresh(base)
    else:
        name, index = base, 0
        while name in graph.initializers:
            index += 1
            name = f"{base}_{index}"
    if isinstance(array, np.ndarray):
        tensor: ir.TensorProtocol = ir.tensor(np.require(array, requirements="C"), name=name)
    else:
        tensor = array
    value = ir.Value(
        name=name, shape=ir.Shape(tensor.shape.numpy()), type=ir.TensorType(tensor.dtype),
        const_value=tensor,
    )
    graph.register_initializer(value)
    return value


def set_constant(
    node: ir.Node,
    index: int,
    array: np.ndarray,
    *,
    base: str | None = None,
    names: Names | None = None,
) -> ir.Value:
    """Give input `index` of `node` the constant `array`, copy-on-share.

    When the input is an initializer that only this node reads (not a graph input or output), it
    is written in place; otherwise this node gets a new initializer and the old value is left to
    its other readers (or, as a graph input or output, to the user).

    Args:
        node: a node of a graph.
        index: which input.
        array: the new value.
        base: the name wanted for a new initializer (default: the old value's name).
        names: the allocator for that name (see `add_initializer`).

    Returns:
        The value `node.inputs[index]` now reads.

    Raises:
        ValueError: `node` is not in a graph, or has no input `index`.
    """
    graph = node.graph
    if graph is None or index >= len(node.inputs):
        raise ValueError(f"set_constant: node {node.name!r} has no input {index} in a graph")
    value = node.inputs[index]
    if (
        value is not None
        and value.is_initializer()
        and len(value.uses()) == 1
        and not value.is_graph_output()
        and not value.is_graph_input()
    ):
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        value.type = ir.TensorType(value.const_value.dtype)
        return value
    default = value.name if value is not None and value.name else f"{node.name or 'node'}_{index}"
    new = add_initializer(graph, base or default, array, names=names)
    node.replace_input_with(index, new)
    return new


# ----------------------------------------------------------------------------- weight folding

Scope = Literal["all"] | Collection[str] | Callable[[ir.Node], bool]

# Ops whose results are not fixed by their inputs' values: never folded.
_NEVER_FOLD = frozenset({"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike"})
_FOLD_LIMIT = 2**62  # onnxscript's folder skips tensors above its limits; weights have no limit


@dataclass
class PrepareWeightsResult(SlimgraphPassResult):
    """`PassResult` plus how many parameter inputs (weights, biases) became constants."""

    folded: int = 0


class PrepareWeightsPass(SlimgraphPass):
    """Fold the run-time computation of weights into initializers; exact.

    torch exports read Linear weights through a Transpose and compute zero Conv biases from the
    weight's Shape; old zoo files build weights with ConstantOfShape; QDQ models read weights
    through DequantizeLinear. The compression passes need those weights as initializers.

    `scope` says what is folded:

    - `"all"`: every constant subgraph of the graph, with onnxscript's folder's default rules
      (QuantizeLinear/DequantizeLinear stay; ConstantOfShape is folded), Constant nodes lifted
      to initializers, and no initializer listed as a graph input any more (pruning needs
      weights, Reshape shapes and axes as initializers).
    - op types (e.g. `("Conv", "Gemm", "MatMul")`) or a node predicate: only the constant
      subgraphs computing the parameter inputs (`OpLayout.params`) of the selected nodes,
      DequantizeLinear and ConstantOfShape included; initializers feeding them stop being graph
      inputs (a weight that can be overridden at run time is not a constant). Other nodes are
      not folded (onnxscript's exact op-level simplifications may still apply elsewhere).

    The IR version is not changed: a caller folding an IR-3 model (initializers must be inputs
    there) raises it to 4 first. Shapes are not inferred.

    Args:
        scope: `"all"`, a collection of op types, or a predicate on nodes.
    """

    exact: ClassVar[bool] = True

    def __init__(self, *, scope: Scope = "all") -> None:
        super().__init__()
        if isinstance(scope, str) and scope != "all":
            raise ValueError(f"scope must be 'all', op types or a predicate, not {scope!r}")
        self.scope = scope

    def _selects(self, node: ir.Node) -> bool:
        if self.scope == "all":
            return True
        if callable(self.scope):
            return bool(self.scope(node))
        return node.op_type in self.scope and node.domain in _ONNX_DOMAINS

    def call(self, model: ir.Model) -> PrepareWeightsResult:
        graph = model.graph
        waiting = [
            (node, index)
            for node in graph
            if self._selects(node) and (found := layout(node)) is not None
            for index in found.params
            if index < len(node.inputs)
            and (value := node.inputs[index]) is not None
            and value.const_value is None
        ]
        if self.scope == "all":
            modified = self._fold_all(model)
        else:
            modified = self._fold_cone(model, [node.inputs[index] for node, index in waiting])
        folded = sum(
            1
            for node, index in waiting
            if node.graph is graph and (value := node.inputs[index]) is not None
            and value.const_value is not None
        )
        if folded:
            logger.info("folded %d weight and bias inputs to constants", folded)
        return PrepareWeightsResult(model, modified, folded=folded)

    @staticmethod
    def _fold_all(model: ir.Model) -> bool:
        modified = ir_common.RemoveInitializersFromInputsPass()(model).modified
        import onnxscript.optimizer

        result = onnxscript.optimizer.fold_constants(
            model,
            input_size_limit=_FOLD_LIMIT,
            output_size_limit=_FOLD_LIMIT,
            should_fold=_fold_constant_of_shape,
        )
        modified |= result.modified
        lift = ir_common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)
        modified |= lift(model).modified
        modified |= fold_constant_splits(model.graph, _FOLD_LIMIT) > 0
        modified |= ir_common.RemoveUnusedNodesPass()(model).modified
        return modified

    @staticmethod
    def _fold_cone(model: ir.Model, targets: Sequence[ir.Value | None]) -> bool:
        graph = model.graph
        static = _static_nodes(graph)
        # The cone is kept by output names: onnxscript replaces some nodes while folding
        # (CastLike becomes a new Cast) and the replacements keep their outputs' names.
        cone: set[str] = set()
        cone_inputs: set[int] = set()
        stack = list(targets)
        while stack:
            value = stack.pop()
            source = value.producer() if value is not None else None
            if source is None:
                if value is not None:
                    cone_inputs.add(id(value))
                continue
            assert value is not None
            if value.name in cone or id(source) not in static:
                continue
            cone.update(output.name for output in source.outputs if output.name)
            stack.extend(source.inputs)
        if not cone:
            return False
        modified = False
        for value in list(graph.inputs):
            if id(value) in cone_inputs and value.is_initializer():
                graph.inputs.remove(value)
                modified = True
        import onnxscript.optimizer

        result = onnxscript.optimizer.fold_constants(
            model,
            input_size_limit=_FOLD_LIMIT,
            output_size_limit=_FOLD_LIMIT,
            should_fold=lambda node: any(output.name in cone for output in node.outputs),
        )
        modified |= result.modified
        return ir_common.RemoveUnusedNodesPass()(model).modified or modified


def _static_nodes(graph: ir.Graph) -> set[int]:
    """Ids of the nodes computed from initializers alone (initializer graph inputs count)."""
    static: set[int] = set()
    for node in graph:
        if node.op_type in _NEVER_FOLD or any(
            attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for attr in node.attributes.values()
        ):
            continue
        # CastLike reads only the type of its second input (torch exports use it on zero biases)
        inputs = node.inputs[:1] if node.op_type == "CastLike" else node.inputs
        if all(
            value is None
            or value.const_value is not None
            or ((producer := value.producer()) is not None and id(producer) in static)
            for value in inputs
        ):
            static.add(id(node))
    return static


def _fold_constant_of_shape(node: ir.Node) -> bool | None:
    """onnxscript keeps ConstantOfShape by default; compression passes need those weights.
    Nodes of several outputs it cannot fold (and warns on each): `fold_constant_splits`."""
    if len(node.outputs) > 1:
        return False
    return True if node.op_type == "ConstantOfShape" and node.domain in _ONNX_DOMAINS else None


def fold_constant_splits(graph: ir.Graph, size_limit: int) -> int:
    """Replace every Split of a constant by one initializer per part; returns how many.

    `nn.MultiheadAttention` as torch exports it for cross-attention cuts its packed
    in-projection weight and bias into the query part and the key-value part with a Split;
    onnxscript's folder leaves every node of several outputs, so the projections had no
    constant weight or bias and head pruning passed them by. The parts together are the input's
    size: an input above `size_limit` elements is split only when nothing else reads it (it is
    then dropped). Splits in subgraphs and with a non-constant `split` input stay. Exact.
    """
    from onnxscript.optimizer._constant_folding import _reference_evaluator

    version = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 1))
    folded = 0
    for node in list(graph):
        if node.op_type != "Split" or node.domain not in _ONNX_DOMAINS or not node.inputs:
            continue
        source = node.inputs[0]
        if source is None or source.const_value is None or source.is_graph_input():
            continue
        if any(v is not None and v.const_value is None for v in node.inputs[1:]):
            continue
        if source.const_value.size > size_limit and len(source.uses()) > 1:
            continue
        if any(output.is_graph_output() for output in node.outputs):
            continue
        arrays = [constant_array(v) if v is not None else None for v in node.inputs]
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        parts = _reference_evaluator.evaluate(node.domain, node.op_type, version, *arrays,
                                              **attributes)  # fmt: skip
        if not isinstance(parts, (list, tuple)) or len(parts) != len(node.outputs):
            continue
        for output, part in zip(node.outputs, parts, strict=True):
            name = output.name
            output.name = None  # the initializer takes the name
            tensor = ir.tensor(np.ascontiguousarray(part), name=name)
            value = ir.Value(name=name, type=ir.TensorType(tensor.dtype),
                             shape=ir.Shape(part.shape), const_value=tensor)  # fmt: skip
            graph.register_initializer(value)
            output.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        if not source.uses() and source.name and source.name in graph.initializers:
            graph.initializers.pop(source.name)
        folded += 1
    return folded

