"""Graph cleanup: exact passes that remove work without changing what the model computes.

Most of this exists already and is reused: onnx_ir's common passes (dead nodes and initializers,
identity elimination, CSE, initializer deduplication, shape inference, topological sort) and
onnxscript's constant folder and reshape/transpose rewrite rules. This module adds what they lack
for real exports: weights built by `ConstantOfShape` (the old ONNX zoo files), initializers listed
as graph inputs (IR version < 4, which blocks folding), and Dropout in inference graphs. `cleanup`
runs them to a fixed point, like onnxscript's optimizer.

Every pass here is exact (registered with `exact=True`). onnx_ir's passes whose contract is
slimgraph's (inlining, topological sort) are registered as they are; those that may move a graph
output run inside `SlimgraphPass`'s output guard, as `Guarded<upstream name>`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import _constant_folding
from onnxscript.rewriter import RewritePass
from onnxscript.rewriter.rules import common as rules

from slimgraph.ir import metadata
from slimgraph.passes._graph_utils import bypass, is_onnx_op, opset_version
from slimgraph.passes._kit import (
    LAYOUTS,
    add_initializer,
    constant_array,
    constant_node_array,
    fold_constant_splits,
)
from slimgraph.passes.base import Skipped, SlimgraphPass, SlimgraphPassResult
from slimgraph.passes.opset import legalize
from slimgraph.passes.registry import register_pass

__all__ = [
    "InitializerInputsPass",
    "MaterializeConstantOfShapePass",
    "CompactConstantsPass",
    "FoldAndLiftConstantsPass",
    "RemoveDropoutPass",
    "SimplifyShapeChainsPass",
    "EliminateIdentityPass",
    "GuardedCommonSubexpressionEliminationPass",
    "GuardedDeduplicateInitializersPass",
    "GuardedShapeInferencePass",
    "RemoveUnusedPass",
    "StripDebugMetadataPass",
    "CleanupResult",
    "CleanupPass",
]

logger = logging.getLogger(__name__)


@register_pass("initializer-inputs", exact=True)
class InitializerInputsPass(SlimgraphPass):
    """Stop listing initializers as graph inputs (IR version < 4 style); exact.

    Old exporters list every weight as an optional graph input, which makes each weight
    overridable and so blocks constant folding and fusion. The inputs go; the initializers stay,
    and the IR version rises to 4 (the first that allows initializers outside the inputs).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = common.RemoveInitializersFromInputsPass()(model)
        if result.modified and (model.ir_version or 0) < 4:
            model.ir_version = 4
        return ir.passes.PassResult(model, result.modified)


# The layers the fusion, quantization, pruning and low-rank passes rewrite: a ConstantOfShape
# feeding one of their parameter inputs (`OpLayout.params`) is a weight those passes need as an
# initializer.
_WEIGHT_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization")

# Defaults of `MaterializeConstantOfShapePass` (elements).
SMALL_CONSTANT_ELEMENTS = 1 << 16
WEIGHT_CONSTANT_ELEMENTS = 1 << 26


def _feeds_weight_slot(value: ir.Value) -> bool:
    for use in value.uses():
        node, index = use.node, use.idx
        if (
            node.domain in ("", "ai.onnx")
            and node.op_type in _WEIGHT_LAYERS
            and index in LAYOUTS[node.op_type].params
        ):
            return True
    return False


def _declared_size(shape: np.ndarray) -> int | None:
    """Elements of a tensor of `shape` (Python ints: no overflow), None for a negative dim."""
    dims = [int(d) for d in shape.reshape(-1)]
    if any(d < 0 for d in dims):
        return None
    size = 1
    for d in dims:
        size *= d
    return size


@register_pass("constant-of-shape", exact=True)
class MaterializeConstantOfShapePass(SlimgraphPass):
    """Replace `ConstantOfShape(constant shape)` by an initializer holding the filled tensor; exact.

    onnxscript's folder keeps ConstantOfShape on purpose (to keep files small), but old exports
    (the ONNX zoo's `light_*` models) build every weight that way, so no fusion could see them.
    Only small tensors (`size_limit`) and weights of Conv/Gemm/MatMul/BatchNormalization
    (`weight_limit`, logged) are materialized: a run-time-cheap fill of an activation-sized tensor
    stays a node, so the file does not grow (`compact-constants` stores uniform weights back).

    Args:
        size_limit: largest tensor (elements) to materialize; None for no limit.
        weight_limit: largest weight (elements) to materialize; None for `size_limit`.
    """

    def __init__(
        self,
        *,
        size_limit: int | None = SMALL_CONSTANT_ELEMENTS,
        weight_limit: int | None = WEIGHT_CONSTANT_ELEMENTS,
    ) -> None:
        super().__init__()
        for name, limit in (("size_limit", size_limit), ("weight_limit", weight_limit)):
            if limit is not None and limit < 0:
                raise ValueError(f"{name} must be >= 0, got {limit}")
        self.size_limit = size_limit
        self.weight_limit = size_limit if weight_limit is None else weight_limit

    def call(self, model: ir.Model) -> SlimgraphPassResult:
        skipped: list[Skipped] = []
        count = 0
        for node in list(model.graph):
            if not is_onnx_op(node, "ConstantOfShape"):
                continue
            shape = constant_array(node.inputs[0])
            if shape is None:
                continue
            size = _declared_size(shape)
            if size is None:
                skipped.append(Skipped(node.name or "", node.op_type, "negative dimension"))
                continue
            output = node.outputs[0]
            weight = _feeds_weight_slot(output)
            limit = self.weight_limit if weight else self.size_limit
            if limit is not None and size > limit:
                skipped.append(Skipped(node.name or "", node.op_type, f"{size} elements"))
                continue
            if weight and self.size_limit is not None and size > self.size_limit:
                logger.info(
                    "materializing the weight %s (%d elements) built by ConstantOfShape: the "
                    "fusion and compression passes need it as an initializer",
                    output.name, size,
                )
            attr = node.attributes.get("value")
            fill = attr.as_tensor().numpy() if attr is not None else np.zeros(1, np.float32)
            array = np.full(tuple(int(d) for d in shape), fill.reshape(-1)[0], dtype=fill.dtype)
            hint = output.name or f"{node.name}_value"
            if output.is_graph_output():  # the output keeps its name (an Identity carries it)
                hint = f"{hint}_value"
            else:
                output.name = None  # the initializer takes it over
            value = add_initializer(model.graph, hint, array)
            bypass(node, value)
            count += 1
        if count:  # `compact-constants` may add back as many nodes
            done = int(model.meta.get(metadata.MATERIALIZED, 0))
            model.meta[metadata.MATERIALIZED] = done + count
        return SlimgraphPassResult(model, bool(count), skipped=skipped)


@register_pass("compact-constants", exact=True)
class CompactConstantsPass(SlimgraphPass):
    """Store large initializers whose elements are all equal as `ConstantOfShape`, and those
    whose rows are (one value per output channel) as `Expand` of the row values; exact (the
    same bits come back: no arithmetic).

    The counterpart of `constant-of-shape` for the file: weights an old export built with
    ConstantOfShape, materialized so fusions could rewrite them, are written back the compact way
    (onnxruntime folds them again when it loads the model), so a lossless run never inflates a
    file. It never adds more nodes than `constant-of-shape` removed from the same model
    (`metadata.MATERIALIZED`, counted in the model's `.meta`): a model that came in with its
    tensors expanded keeps them expanded, and its node count. Only initializers whose compact
    form saves at least `min_bytes` are stored again, the largest savings first. Initializers
    that are graph inputs or graph outputs stay.

    Args:
        min_elements: smallest initializer (elements) worth replacing.
        min_bytes: smallest saving (bytes of the tensor minus those of the compact form) worth
            a node.
        max_new_nodes: how many nodes the pass may add; None for as many as `constant-of-shape`
            removed.
    """

    def __init__(
        self, *, min_elements: int = 16, min_bytes: int = 1024, max_new_nodes: int | None = None
    ) -> None:
        super().__init__()
        if min_elements < 1:
            raise ValueError(f"min_elements must be >= 1, got {min_elements}")
        if min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, got {min_bytes}")
        if max_new_nodes is not None and max_new_nodes < 0:
            raise ValueError(f"max_new_nodes must be >= 0, got {max_new_nodes}")
        self.min_elements = min_elements
        self.min_bytes = min_bytes
        self.max_new_nodes = max_new_nodes

    def call(self, model: ir.Model) -> SlimgraphPassResult:
        graph = model.graph
        if opset_version(model) < 9:  # ConstantOfShape is opset 9
            return SlimgraphPassResult(model, False)
        budget = self.max_new_nodes
        if budget is None:
            budget = int(model.meta.get(metadata.MATERIALIZED, 0))
        if budget <= 0:
            return SlimgraphPassResult(model, False)
        candidates: list[tuple[int, str, np.ndarray, np.ndarray]] = []
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if (
                tensor is None
                or value.is_graph_input()
                or value.is_graph_output()
                or not value.uses()
                or tensor.size < self.min_elements
            ):
                continue
            try:
                array = tensor.numpy()
            except Exception:  # noqa: BLE001 - unreadable external data: leave it
                continue
            if array.dtype.kind not in "fiub" or array.dtype.kind == "f" and np.isnan(array).any():
                continue
            rows = _uniform_rows(array)
            if rows is None:
                continue
            saving = array.nbytes - (rows.nbytes if rows.size > 1 else 0) - 8 * array.ndim
            if saving >= self.min_bytes:
                candidates.append((saving, name, array, rows))
        candidates.sort(key=lambda item: -item[0])
        chosen = candidates[:budget]
        for _, name, array, rows in chosen:
            value = graph.initializers[name]
            shape = add_initializer(
                graph, f"{name}_shape", np.array(array.shape, dtype=np.int64)
            )
            if rows.size == 1:
                fill = ir.tensor(rows.reshape(1))
                node = ir.node("ConstantOfShape", [shape], attributes={"value": fill})
            else:  # one value per output channel (a uniform weight times a folded BN scale)
                values = add_initializer(graph, f"{name}_rows", rows)
                node = ir.node("Expand", [values, shape])
            graph.insert_before(graph[0], node)  # it has readers, so the graph has nodes
            out = node.outputs[0]
            out.type, out.shape = value.type, value.shape
            value.replace_all_uses_with(out)
            graph.initializers.pop(name)
            out.name = name
        if chosen and self.max_new_nodes is None:
            model.meta[metadata.MATERIALIZED] = budget - len(chosen)
        return SlimgraphPassResult(model, bool(chosen))


def _uniform_rows(array: np.ndarray) -> np.ndarray | None:
    """The one value of a uniform array (shape [1]), or the values of an array uniform along
    every axis but the first (shape [rows, 1, ..., 1]); None otherwise. Bitwise equality."""
    flat = array.reshape(-1)
    if (flat == flat[0]).all():
        return flat[:1].copy()
    if array.ndim < 2 or array.shape[0] * 8 > array.size:
        return None
    by_row = array.reshape(array.shape[0], -1)
    if (by_row == by_row[:, :1]).all():
        return by_row[:, :1].reshape((array.shape[0],) + (1,) * (array.ndim - 1)).copy()
    return None


@register_pass("fold-constants", exact=True)
class FoldAndLiftConstantsPass(SlimgraphPass):
    """Evaluate nodes whose inputs are all constant and store the results as initializers; exact.

    onnxscript's constant folder (`onnxscript.optimizer.FoldConstantsPass`, with per-node shape
    inference, so later passes see shapes), then every `Constant` node lifted to an initializer
    (`onnx_ir.passes.common.LiftConstantsToInitializersPass`) and every Split of a constant
    folded to one initializer per part (`fold_constant_splits`; onnxscript's folder leaves nodes
    of several outputs). Q/DQ nodes are never folded
    (onnxscript's rule). Three guards make the folder safe on any model (`_SafeFolder`): a node
    whose rewrite raises is left as it is (and reported as skipped), a rewrite is written only in
    the form the model's opset defines (`passes.opset.legalize`), and the ops whose onnx
    reference implementation computes something else than the operator in inference
    (`_REFERENCE_DIFFERS`) are not evaluated.

    Args:
        input_size_limit, output_size_limit: onnxscript's limits (elements); outputs larger than the
            inputs they replace are not stored beyond `output_size_limit`.
    """

    def __init__(
        self,
        *,
        input_size_limit: int = 1 << 20,
        output_size_limit: int = _constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
    ) -> None:
        super().__init__()
        self.input_size_limit = input_size_limit
        self.output_size_limit = output_size_limit

    def call(self, model: ir.Model) -> SlimgraphPassResult:
        folder = _SafeFolder(
            input_size_limit=self.input_size_limit, output_size_limit=self.output_size_limit
        )
        folded = folder(model)
        lifted = common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(
            model
        )
        split = fold_constant_splits(model.graph, self.input_size_limit) > 0
        return SlimgraphPassResult(
            model, folded.modified or lifted.modified or split, skipped=list(folder.skipped)
        )


def _batchnorm_in_training(node: ir.Node, version: int) -> bool:
    """Whether onnx's reference BatchNormalization would compute `node` with batch statistics.

    Its opset-6 kernel (used up to opset 8) uses them unless `is_test`, its opset-9 kernel (up to
    13) whenever a `momentum` attribute is present, its opset-14 kernel when `training_mode`; the
    operator itself (and onnxruntime) is in inference up to opset 13 whatever `momentum` says.
    """
    if version >= 14:
        return bool(node.attributes.get_int("training_mode", 0))
    if version >= 9:
        return "momentum" in node.attributes
    return not node.attributes.get_int("is_test", 0)


# Ops whose onnx reference implementation (the folder's evaluator) may compute another function
# than the operator does in an inference graph: op type -> the test of a node it gets wrong.
_REFERENCE_DIFFERS: dict[str, Callable[[ir.Node, int], bool]] = {
    "BatchNormalization": _batchnorm_in_training,
}


class _SafeFolder(_constant_folding.FoldConstantsPass):
    """onnxscript's constant folder, one node at a time made safe for models nobody designed.

    - A node whose partial evaluator raises (onnxscript's SplitToSequence rewrite on a scalar
      split, say) is skipped and recorded in `skipped`; the rest of the graph is still folded.
    - A rewrite is written only when every new node has the form the model's opset defines
      (`passes.opset.legalize`: Unsqueeze/Split with constant `axes`/`split` inputs move them into
      attributes for opsets < 13); otherwise the node stays.
    - The ops of `_REFERENCE_DIFFERS` are not evaluated where onnx's reference implementation
      would compute them another way than onnxruntime does.
    """

    def __init__(self, *, input_size_limit: int, output_size_limit: int) -> None:
        super().__init__(
            shape_inference=True,
            input_size_limit=input_size_limit,
            output_size_limit=output_size_limit,
            should_fold=self._should_fold,
        )
        self.skipped: list[Skipped] = []

    def _should_fold(self, node: ir.Node) -> bool | None:
        # onnxscript folds one output to one initializer and warns on every other node (a
        # sequence is no initializer either); Split is folded after it (`fold_constant_splits`)
        if len(node.outputs) > 1 or is_onnx_op(node, "SequenceConstruct"):
            return False
        differs = _REFERENCE_DIFFERS.get(node.op_type)
        if differs is not None and node.domain in ("", "ai.onnx"):
            version = self._opset_imports.get("", self._opset_imports.get("ai.onnx", 1))
            if differs(node, version):
                self._skip(node, "onnx's reference implementation computes it in training mode")
                return False
        return None

    def _skip(self, node: ir.Node, reason: str) -> None:
        self.skipped.append(Skipped(node.name or "", node.op_type, reason))

    def process_node(
        self, node: ir.Node, is_function: bool
    ) -> _constant_folding.Replacement | None:
        try:
            replacement = super().process_node(node, is_function)
        except RuntimeError as error:  # the evaluator of this one op failed: leave the node
            cause = error.__cause__ if error.__cause__ is not None else error
            why = f"{type(cause).__name__}: {cause}"
            self._skip(node, f"not folded: the folder failed on it ({why})")
            return None
        if replacement is None or not replacement.new_nodes:
            return replacement
        if not _legal_nodes(replacement, self._opset_imports):
            self._skip(node, "not rewritten: the rewrite needs a newer opset than the model's")
            return None
        return replacement


def _legal_nodes(
    replacement: _constant_folding.Replacement, opset_imports: Mapping[str, int]
) -> bool:
    """Legalize the new nodes of `replacement` for `opset_imports` in place (`legalize`); drop
    the Constant nodes nothing reads any more. False when one cannot be expressed."""
    nodes = list(replacement.new_nodes)
    made = {id(output): n for n in nodes for output in n.outputs}
    imports = dict(opset_imports)
    for node in nodes:
        if is_onnx_op(node, "Constant"):
            continue
        constants = {}
        for index, value in enumerate(node.inputs):
            producer = made.get(id(value)) if value is not None else None
            if producer is not None and is_onnx_op(producer, "Constant"):
                array = constant_node_array(producer)
            else:
                array = constant_array(value)
            if array is not None:
                constants[index] = array
        if not legalize(node, imports, constants):
            return False
    outputs = {id(v) for v in replacement.new_outputs}
    kept = [
        n for n in nodes
        if not is_onnx_op(n, "Constant") or n.outputs[0].uses() or id(n.outputs[0]) in outputs
    ]  # fmt: skip
    if len(kept) != len(nodes):
        replacement.new_nodes = kept  # type: ignore[misc]
    return all(legalize(n, imports, {}) for n in kept if is_onnx_op(n, "Constant"))


@register_pass("remove-dropout", exact=True)
class RemoveDropoutPass(SlimgraphPass):
    """Remove inference-mode Dropout (an identity at inference); exact.

    A Dropout goes when it cannot be in training mode: no `training_mode` input or a constant
    false one (opset 12+), and `is_test` not 0 (opset < 7). One whose mask output is read stays
    and is reported as skipped.
    """

    def call(self, model: ir.Model) -> SlimgraphPassResult:
        opset = opset_version(model)
        skipped: list[Skipped] = []
        count = 0
        for node in list(model.graph):
            if not is_onnx_op(node, "Dropout"):
                continue
            label = node.name or ""
            if len(node.outputs) > 1 and (
                node.outputs[1].uses() or node.outputs[1].is_graph_output()
            ):
                skipped.append(Skipped(label, node.op_type, "its mask output is used"))
                continue
            if opset < 7 and node.attributes.get_int("is_test", 0) == 0:
                skipped.append(Skipped(label, node.op_type, "is_test=0 (training mode)"))
                continue
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                training = constant_array(node.inputs[2])
                if training is None or bool(training.reshape(-1)[0]):
                    skipped.append(Skipped(label, node.op_type, "training_mode may be true"))
                    continue
            data = node.inputs[0]
            if data is None:  # not a valid Dropout: leave it to the checker
                skipped.append(Skipped(label, node.op_type, "no data input"))
                continue
            bypass(node, data)
            count += 1
        return SlimgraphPassResult(model, bool(count), skipped=skipped)


@register_pass("simplify-reshape-transpose", exact=True)
class SimplifyShapeChainsPass(SlimgraphPass):
    """Collapse Reshape(Reshape(x)) into one Reshape and Transpose(Transpose(x)) into one or none.

    onnxscript's rules (`reshape_reshape_rule`, `transpose_transpose_rule`, identity-permutation
    Transpose removal); the matcher only rewrites when the inner value has no other reader and is
    not a graph output. Exact: both only move data.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rewrite = RewritePass(
            [rules.reshape_reshape_rule, rules.transpose_transpose_rule, rules.no_op_transpose_rule]
        )
        result = rewrite(model)
        identities = EliminateIdentityPass()(model)
        return ir.passes.PassResult(model, result.modified or identities.modified)


class _GuardedPass(SlimgraphPass):
    """One of onnx_ir's common passes (`upstream`), run with its defaults inside
    `SlimgraphPass`'s guard: the graph's output names, types and symbolic dimension names come
    back as they were (an upstream rewrite may leave one value behind two outputs, or a graph
    input as an output). `Guarded` + the upstream name: it is not the upstream class."""

    upstream: ClassVar[type[ir.passes.PassBase]]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, self.upstream()(model).modified)


def _guarded(name: str, upstream: type[ir.passes.PassBase], doc: str) -> type[_GuardedPass]:
    """Register `Guarded<upstream name>`, `upstream` inside the guard, as the exact pass `name`."""
    cls = type(f"Guarded{upstream.__name__}", (_GuardedPass,),
               {"__doc__": doc, "upstream": upstream, "__module__": __name__})
    return register_pass(name, exact=True)(cls)


@register_pass("eliminate-identity", exact=True)
class EliminateIdentityPass(SlimgraphPass):
    """Remove Identity nodes in every graph, subgraphs and functions included; exact.

    onnx_ir's `IdentityEliminationPass` rules (`y = Identity(x)`: readers of y read x; when y is
    a graph output x takes its name), with one rule more, for Scan/Loop/If bodies: an Identity
    whose output is an output of its graph stays unless its input is made by a node of that same
    graph and is not already one of its outputs. Removing it otherwise would leave one value
    behind two outputs of a body (onnxruntime then fills one of them and leaves the other
    uninitialised: `test_scan9_sum`), list a body input as a body output, or rename a value of
    the enclosing graph.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
        modified = False
        for root in graphs:
            for node in list(ir.traversal.RecursiveGraphIterator(root)):
                modified = _eliminate_identity(node) or modified
        return ir.passes.PassResult(model, modified)


def _merged_shape(known: ir.Shape | None, other: ir.Shape | None) -> ir.Shape | None:
    """`known` with each unknown dimension taken from `other` where it states one (both shapes
    describe the same tensor: an Identity's input and output)."""
    if known is None or other is None or len(known) != len(other):
        return known if known is not None else other
    dims = [b if (a is None or (isinstance(a, ir.SymbolicDim) and a.value is None)) else a
            for a, b in zip(known.dims, other.dims, strict=True)]
    return ir.Shape(dims)


def _eliminate_identity(node: ir.Node) -> bool:
    if not is_onnx_op(node, "Identity") or len(node.inputs) != 1 or len(node.outputs) != 1:
        return False
    source, output = node.inputs[0], node.outputs[0]
    graph = node.graph
    if source is None or graph is None:
        return False
    if output.is_graph_output():
        producer = source.producer()
        if producer is None or producer.graph is not graph or source.is_graph_output():
            return False  # a body input, an initializer, an outer value, or a second output
    source.shape = _merged_shape(source.shape, output.shape)
    if source.type is None:
        source.type = output.type
    name = output.name
    was_output = output.is_graph_output()
    output.replace_all_uses_with(source, replace_graph_outputs=True)
    if was_output:
        output.name = None
        source.name = name
    graph.remove(node, safe=True)
    return True

GuardedCommonSubexpressionEliminationPass = _guarded(
    "cse",
    common.CommonSubexpressionEliminationPass,
    "Merge nodes computing the same thing from the same inputs (onnx_ir's CSE); exact.",
)
GuardedDeduplicateInitializersPass = _guarded(
    "dedupe-initializers",
    common.DeduplicateInitializersPass,
    "Merge initializers with equal dtype, shape and bytes (onnx_ir); exact.",
)
GuardedShapeInferencePass = _guarded(
    "shape-inference",
    common.ShapeInferencePass,
    "Annotate values with onnx's inferred types and shapes; exact (computation untouched).",
)
# Upstream passes whose contract is slimgraph's (outputs untouched), registered as they are.
register_pass("inline-functions", exact=True)(common.InlinePass)
register_pass("topological-sort", exact=True)(common.TopologicalSortPass)


@register_pass("strip-debug-metadata", exact=True)
class StripDebugMetadataPass(SlimgraphPass):
    """Drop the exporter's debug metadata on nodes (`metadata.EXPORTER_DEBUG_KEYS`) and values
    (`metadata.EXPORTER_DEBUG_VALUE_PREFIXES`), and the torch name scopes of nodes that already
    carry the layer name derived from them.

    Exact: only `metadata_props` change; layer names stay for reports.

    Args:
        working_marks: also drop slimgraph's own working annotations (`metadata.UNIT`), which
            only later passes of the same run read: for a finished, deployed model.
    """

    def __init__(self, *, working_marks: bool = False) -> None:
        super().__init__()
        self.working_marks = working_marks

    def call(self, model: ir.Model) -> SlimgraphPassResult:
        modified = False
        for node in model.graph.all_nodes():
            props = node.metadata_props
            keys = list(metadata.EXPORTER_DEBUG_KEYS)
            if props.get(metadata.LAYER):
                keys.append(metadata.TORCH_NAME_SCOPES)
            if self.working_marks:
                keys.append(metadata.UNIT)
            for key in keys:
                if props.pop(key, None) is not None:
                    modified = True
        for value in _all_values(model):
            for key in [k for k in value.metadata_props
                        if k.startswith(metadata.EXPORTER_DEBUG_VALUE_PREFIXES)]:
                del value.metadata_props[key]
                modified = True
        return SlimgraphPassResult(model, modified)


def _all_values(model: ir.Model) -> Iterator[ir.Value]:
    """Every value of every graph: inputs, initializers, node outputs (outputs are among them)."""
    for graph in model.graphs():
        yield from graph.inputs
        yield from graph.initializers.values()
        for node in graph:
            yield from node.outputs


@register_pass("remove-unused", exact=True)
class RemoveUnusedPass(SlimgraphPass):
    """Remove dead nodes, unused initializers, functions and opset imports (onnx_ir); exact."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for inner in (
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ):
            modified = inner(model).modified or modified
        return ir.passes.PassResult(model, modified)


@dataclasses.dataclass
class CleanupResult(SlimgraphPassResult):
    """Which inner passes changed the model, and how many rounds the fixed point took."""

    changed_by: dict[str, int] = dataclasses.field(default_factory=dict)
    rounds: int = 0


@register_pass("cleanup", exact=True)
class CleanupPass(SlimgraphPass):
    """All cleanup passes, repeated until nothing changes (at most `max_rounds`); exact.

    Order: model-local functions inlined, initializers out of the inputs (unless
    `keep_initializer_inputs`), then rounds of
    ConstantOfShape materialization, constant folding, Dropout removal, reshape/transpose chains,
    identity elimination and dead-code removal; finally CSE, initializer deduplication, dead-code
    removal and a topological sort.
    """

    def __init__(self, *, max_rounds: int = 4, keep_initializer_inputs: bool = False) -> None:
        super().__init__()
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        self.max_rounds = max_rounds
        self.keep_initializer_inputs = keep_initializer_inputs

    def call(self, model: ir.Model) -> CleanupResult:
        changed: dict[str, int] = {}
        skipped: list[Skipped] = []

        def apply(name: str, pass_: ir.passes.PassBase) -> bool:
            result = pass_(model)
            skipped.extend(getattr(result, "skipped", []))
            if result.modified:
                changed[name] = changed.get(name, 0) + 1
            return bool(result.modified)

        apply("inline-functions", common.InlinePass())
        if not self.keep_initializer_inputs:
            apply("initializer-inputs", InitializerInputsPass())
        rounds = 0
        each_round: tuple[tuple[str, ir.passes.PassBase], ...] = (
            ("constant-of-shape", MaterializeConstantOfShapePass()),
            ("fold-constants", FoldAndLiftConstantsPass()),
            ("remove-dropout", RemoveDropoutPass()),
            ("simplify-reshape-transpose", SimplifyShapeChainsPass()),
            ("eliminate-identity", EliminateIdentityPass()),
            ("remove-unused", RemoveUnusedPass()),
        )
        finally_: tuple[tuple[str, ir.passes.PassBase], ...] = (
            ("cse", GuardedCommonSubexpressionEliminationPass()),
            ("dedupe-initializers", GuardedDeduplicateInitializersPass()),
            ("remove-unused", RemoveUnusedPass()),
            ("topological-sort", common.TopologicalSortPass()),
        )
        for rounds in range(1, self.max_rounds + 1):  # noqa: B007
            skipped.clear()
            modified = False
            for name, pass_ in each_round:
                modified = apply(name, pass_) or modified
            if not modified:
                break
        for name, pass_ in finally_:
            apply(name, pass_)
        changed.pop("topological-sort", None)  # reordering alone is not a change worth verifying
        return CleanupResult(
            model, bool(changed), skipped=skipped, changed_by=changed, rounds=rounds
        )
