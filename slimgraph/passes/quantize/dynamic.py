"""Dynamic int8 quantization: int8 weights stored, activations quantized at run time.

Approximate pass (seed 000, "dynamic quantization"): weights become int8 initializers with
symmetric scales, per output channel by default (MatMul/Gemm weight [K, N]: one scale per column
N, max|W[:, n]| / 127); activations are quantized per tensor to uint8 by onnxruntime on every run,
so no calibration data is needed. What each op becomes:

- MatMul / Gemm with a constant weight: the standard-ONNX form DynamicQuantizeLinear ->
  MatMulInteger -> Cast -> Mul(activation scale x per-column weight scales), one
  DynamicQuantizeLinear shared by all MatMuls reading the same activation (Q, K, V); onnxruntime
  fuses it into its MatMulIntegerToFloat kernel. onnxruntime's `com.microsoft.DynamicQuantizeMatMul`
  (bias fused, each MatMul quantizes its own input) is available as `matmul_kernel="fused"`.
  Side by side on the BERT-style encoder (6 x 384, seq 128, 2 threads, fp32 latency = 1) the
  standard form was as fast or faster in three of four runs on this shared machine: batch 1
  0.27 vs 0.32, 0.28 vs 0.43, 0.48 vs 0.48, 0.57 vs 0.29 (2 rounds only); batch 8 0.43 vs 0.53,
  0.40 vs 0.54, 0.49 vs 0.47, 0.47 vs 0.35 (benchmarks/quantize_modes.py prints both). The
  portable standard form is the default: onnxruntime's optimizer turns it into the best of both
  (on the 6-layer encoder: 18 DynamicQuantizeMatMul where an activation feeds one MatMul, 18
  MatMulIntegerToFloat behind 6 shared DynamicQuantizeLinear for Q/K/V).
- Gather with a constant float table (embeddings): the table is stored as int8 codes with one
  scale per row and read by `com.microsoft.GatherBlockQuantized`, which dequantizes only the
  gathered rows.
- LSTM (forward/reverse/bidirectional, no peepholes): `com.microsoft.DynamicQuantizeLSTM` with
  W and R int8 per gate channel. GRU and RNN are skipped: onnxruntime has no int8 kernel for them.
- Conv -> ConvInteger only when asked (`op_types` containing "Conv"): on this CPU onnxruntime's
  ConvInteger runs slower than the float Conv it replaces (benchmarks/quantize_modes.py).

Activation-by-activation MatMuls (attention scores), masks and Where paths have no constant weight
and are left untouched. Nodes can be excluded by op type or by fnmatch patterns over the node's
torch layer name (`slimgraph.ir.layer_name`) and node name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

import slimgraph.passes.quantize._weights as _weights
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import layer_name
from slimgraph.ir.select import check_patterns, matching_pattern
from slimgraph.passes._graph_utils import opset_version
from slimgraph.passes._kit import traced_constant
from slimgraph.passes.base import Skipped
from slimgraph.passes.opset import ConvertOpsetPass
from slimgraph.passes.quantize._weights import (
    MS_DOMAIN,
    QuantizedNode,
    WeightPlan,
    WeightQuantizePass,
)
from slimgraph.passes.registry import register_pass
from slimgraph.passes.transformer import PackAttentionPass
from slimgraph.passes.transformer.standard import (
    STANDARD_ATTENTION_OPSET,
    StandardAttentionPass,
    standard_attention_candidates,
)
from slimgraph.runtime.quant_math import QuantSpec, quantize_tensor, weight_spec

__all__ = [
    "DEFAULT_OP_TYPES",
    "SUPPORTED_OP_TYPES",
    "MS_DOMAIN",
    "QuantizedNode",
    "DynamicQuantizeResult",
    "DynamicRewrite",
    "DynamicPlan",
    "plan_dynamic",
    "MATERIALIZERS",
    "ACTIVATION_SPEC",
    "DynamicQuantizePass",
    "quantize_dynamic",
]

logger = logging.getLogger(__name__)

DEFAULT_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm", "Gather", "LSTM", "GRU", "RNN")
SUPPORTED_OP_TYPES: tuple[str, ...] = (*DEFAULT_OP_TYPES, "Conv")

_MIN_OPSET = 11  # DynamicQuantizeLinear
_UPGRADE_OPSET = 13  # what quantize_dynamic upgrades older models to

MatMulKernel = Literal["fused", "integer"]


@dataclass
class DynamicQuantizeResult(_weights.WeightQuantizeResult):
    """What `DynamicQuantizePass` quantized (and, in `skipped`, what it left float and why)."""


@register_pass("quantize-dynamic", exact=False)
class DynamicQuantizePass(WeightQuantizePass["DynamicRewrite"]):
    """Dynamic int8 quantization of weights (approximate: `exact = False`).

    Args:
        per_channel: one scale per output channel (True) or one per tensor.
        exclude: fnmatch patterns over layer names and node names to leave in float.
        op_types: op types to quantize (default `DEFAULT_OP_TYPES`; add "Conv" for ConvInteger).
        matmul_kernel: "integer" (MatMulInteger, default) or "fused" (DynamicQuantizeMatMul).
        exclude_ops: op types to leave in float (recorded as skipped).
    """

    mode = "dynamic"

    def __init__(
        self,
        *,
        per_channel: bool = True,
        exclude: Sequence[str] = (),
        op_types: Sequence[str] | None = None,
        matmul_kernel: MatMulKernel = "integer",
        exclude_ops: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.per_channel = per_channel
        self.exclude = _weights.as_tuple(exclude)
        self.op_types = _weights.as_tuple(DEFAULT_OP_TYPES if op_types is None else op_types)
        self.matmul_kernel = matmul_kernel
        self.exclude_ops = _weights.as_tuple(exclude_ops)

    def requires(self, model: ir.Model) -> None:
        check_patterns(model.graph.all_nodes(), self.exclude)  # a typo is an error
        unknown = [op for op in self.op_types if op not in SUPPORTED_OP_TYPES]
        if unknown:
            raise BadOptionError(
                f"dynamic quantization cannot quantize op type(s) {', '.join(unknown)} "
                f"(supported: {', '.join(SUPPORTED_OP_TYPES)})"
            )
        if not self.op_types:
            raise BadOptionError("dynamic quantization needs at least one op type")
        if self.matmul_kernel not in ("fused", "integer"):
            raise BadOptionError(
                f"unknown matmul kernel '{self.matmul_kernel}' (choose fused or integer)"
            )
        opset = _weights.opset_version(model)
        if opset < _MIN_OPSET:
            raise UnsupportedModelError(
                f"dynamic quantization needs ONNX opset >= {_MIN_OPSET} (DynamicQuantizeLinear); "
                f"the model has opset {opset}; quantize_dynamic() upgrades it first"
            )

    def _plan(self, graph: ir.Graph) -> DynamicPlan:
        return plan_dynamic(graph, per_channel=self.per_channel, op_types=self.op_types,
                            exclude=self.exclude, exclude_ops=self.exclude_ops)

    def _nothing(self, plan: WeightPlan[DynamicRewrite], reasons: str) -> str:
        return (
            f"nothing to quantize dynamically: no {'/'.join(self.op_types)} node with a "
            f"constant float weight ({plan.candidates} candidate(s): "
            f"{reasons or 'no candidate ops'})"
        )

    def _materialize(
        self, graph: ir.Graph, plan: WeightPlan[DynamicRewrite]
    ) -> list[QuantizedNode]:
        builder = _Builder(graph, self.matmul_kernel)
        return [MATERIALIZERS[rewrite.kind](builder, rewrite) for rewrite in plan.rewrites]

    def _result(
        self, model: ir.Model, skipped: list[Skipped], quantized: list[QuantizedNode]
    ) -> DynamicQuantizeResult:
        return DynamicQuantizeResult(model, modified=True, skipped=skipped, quantized=quantized)


def quantize_dynamic(
    model: ir.Model,
    *,
    per_channel: bool = True,
    exclude: Sequence[str] = (),
    op_types: Sequence[str] | None = None,
    exclude_ops: Sequence[str] = (),
) -> ir.Model:
    """Dynamic int8 quantization of a copy of `model` (the input is left untouched).

    See `DynamicQuantizePass` for the options.

    Example:
        >>> q = quantize_dynamic(model, exclude=["layers.0.*"])  # doctest: +SKIP
    """
    copy = _weights.working_copy(model, _MIN_OPSET, _UPGRADE_OPSET)
    if not exclude and "MatMul" in (op_types or DEFAULT_OP_TYPES) and any(
        n.op_type == "MultiHeadAttention" and n.domain == MS_DOMAIN for n in copy.graph
    ):
        copy = _standard_attention(copy)
        # the rest: Q/K/V projections into one packed Attention, then QAttention (exact
        # rewrite; only when no layer is excluded, since the projections stop being separate
        # nodes)
        copy = PackAttentionPass(with_bias=False)(copy).model
    step = DynamicQuantizePass(
        per_channel=per_channel, exclude=exclude, op_types=op_types, exclude_ops=exclude_ops
    )
    return step(copy).model


def _standard_attention(model: ir.Model) -> ir.Model:
    """Encoder MultiHeadAttention (q, k, v and at most a key mask) as the standard opset-23
    `Attention`, its projections left as MatMuls (three int8 GEMMs behind one shared
    DynamicQuantizeLinear): faster on onnxruntime's CPU than QAttention, whose int8 GEMMs run
    one per head (`transformer/standard.py` has the figures). The model is converted to opset
    23 first when older; a model the converter cannot take keeps the QAttention path."""
    if not standard_attention_candidates(model):
        return model
    if opset_version(model, default=0) < STANDARD_ATTENTION_OPSET:
        try:
            model = ConvertOpsetPass(opset=STANDARD_ATTENTION_OPSET)(model).model
        except UnsupportedModelError as error:
            logger.info("standard attention skipped: %s", error)
            return model
    return StandardAttentionPass()(model).model


# --- policy: decide per node, without touching the graph ---------------------------------------

RewriteKind = Literal["matmul", "attention", "gather", "lstm", "conv"]

# DynamicQuantizeLinear: uint8, asymmetric, range measured on every run.
ACTIVATION_SPEC = QuantSpec(ir.DataType.UINT8, symmetric=False, dynamic=True)


@dataclass(frozen=True, eq=False)
class DynamicRewrite:
    """One planned rewrite: the node, what it becomes (`kind`, a key of `MATERIALIZERS`), its
    constant weight as the node reads it and how that weight and the activation are quantized.

    `weight_spec.axis` is the per-channel axis of `weight` (None: per tensor); for an LSTM, whose
    W and R are transposed to [dirs, in, 4 * hidden], 0 means one scale per direction and 1 one
    scale per direction and gate column.
    """

    node: ir.Node
    kind: RewriteKind
    weight: np.ndarray
    weight_spec: QuantSpec
    activation_spec: QuantSpec | None = ACTIVATION_SPEC
    source: ir.Value | None = None  # the weight's value (names the new initializers)
    bias: np.ndarray | ir.Value | None = None  # Gemm: C (times beta)
    bias_add: ir.Node | None = None  # MatMul: the Add of a constant bias after it
    recurrence: np.ndarray | None = None  # LSTM: R


@dataclass(frozen=True)
class DynamicPlan(WeightPlan[DynamicRewrite]):
    """What dynamic quantization will do to a graph: rewrites in graph order, nodes left float
    (with the reason) and how many candidate nodes were looked at."""


def plan_dynamic(
    graph: ir.Graph,
    *,
    per_channel: bool = True,
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
    exclude: Sequence[str] = (),
    exclude_ops: Sequence[str] = (),
) -> DynamicPlan:
    """The frozen plan of dynamic quantization for `graph` (not modified)."""
    skipped: list[Skipped] = []
    rewrites: list[DynamicRewrite] = []
    candidates = 0
    for node in list(graph):
        if node.domain == MS_DOMAIN and node.op_type == "Attention":
            if "MatMul" not in op_types:  # its weight is the Q/K/V projections'
                continue
            planner: _Planner = _plan_attention
        elif node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OP_TYPES:
            continue
        elif node.op_type not in op_types:
            continue
        else:
            planner = _PLANNERS[node.op_type]
        candidates += 1
        if node.op_type in exclude_ops:
            skipped.append(_skip(node, f"op type {node.op_type} excluded"))
            continue
        if (pattern := matching_pattern(node, exclude)) is not None:
            skipped.append(_skip(node, f"excluded by pattern '{pattern}'"))
            continue
        planned = planner(node, per_channel)
        if isinstance(planned, str):
            skipped.append(_skip(node, planned))
        else:
            rewrites.append(planned)
    return DynamicPlan(tuple(rewrites), tuple(skipped), candidates)


def _skip(node: ir.Node, reason: str) -> Skipped:
    return Skipped(node.name or "", node.op_type, reason)


def _int8(axis: int | None) -> QuantSpec:
    return weight_spec(8, axis=axis)


def _plan_matmul(node: ir.Node, per_channel: bool) -> DynamicRewrite | str:
    a, b = node.inputs[0], node.inputs[1]
    weight = traced_constant(b)
    if weight is None:
        if traced_constant(a) is not None:
            return "the constant is the left operand (W @ x); only x @ W is quantized"
        return "both inputs are activations (no constant weight)"
    if weight.ndim != 2:
        return f"weight has rank {weight.ndim}, not 2"
    if weight.dtype != np.float32 or not _weights.is_float32(a):
        return "not a float32 MatMul"
    fused_bias = _weights.bias_add_after(node, weight.shape[1])
    return DynamicRewrite(node, "matmul", weight, _int8(1 if per_channel else None), source=b,
                          bias_add=fused_bias)


def _plan_gemm(node: ir.Node, per_channel: bool) -> DynamicRewrite | str:
    attrs = node.attributes
    if attrs.get_int("transA", 0):
        return "Gemm with transA=1 is not quantized"
    weight = traced_constant(node.inputs[1])
    if weight is None:
        return "B is not constant"
    if weight.dtype != np.float32 or not _weights.is_float32(node.inputs[0]):
        return "not a float32 Gemm"
    if attrs.get_int("transB", 0):
        weight = weight.T
    weight = weight * np.float32(attrs.get_float("alpha", 1.0))
    bias: np.ndarray | ir.Value | None = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        c = traced_constant(node.inputs[2])
        beta = np.float32(attrs.get_float("beta", 1.0))
        if c is not None and c.size == weight.shape[1]:
            bias = (c.reshape(-1) * beta).astype(np.float32)
        elif c is not None:
            bias = np.ascontiguousarray(c * beta, dtype=np.float32)
        elif beta == 1.0:
            bias = node.inputs[2]
        else:
            return "Gemm with a non-constant C and beta != 1 is not quantized"
    return DynamicRewrite(node, "matmul", np.ascontiguousarray(weight),
                          _int8(1 if per_channel else None), source=node.inputs[1], bias=bias)


def _plan_gather(node: ir.Node, per_channel: bool) -> DynamicRewrite | str:
    del per_channel  # GatherBlockQuantized: one scale per row whatever the option says
    table = traced_constant(node.inputs[0])
    if table is None:
        return "data is not constant (Gather on activations stays float)"
    if table.dtype != np.float32:
        return f"table dtype {table.dtype} is not float32"
    if table.ndim != 2 or node.attributes.get_int("axis", 0) != 0:
        return "only 2-D tables gathered on axis 0 (embeddings) are quantized"
    return DynamicRewrite(node, "gather", table, _int8(0), activation_spec=None,
                          source=node.inputs[0])


def _plan_lstm(node: ir.Node, per_channel: bool) -> DynamicRewrite | str:
    inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
    w, r = traced_constant(inputs[1]), traced_constant(inputs[2])
    if w is None or r is None:
        return "W or R is not constant"
    if inputs[7] is not None:
        return "LSTM with peepholes (P) is not quantized"
    if node.attributes.get_int("layout", 0):
        return "LSTM with layout=1 is not quantized (DynamicQuantizeLSTM is seq-first)"
    if w.dtype != np.float32 or not _weights.is_float32(node.inputs[0]):
        return "not a float32 LSTM"
    return DynamicRewrite(node, "lstm", w, _int8(1 if per_channel else 0), source=inputs[1],
                          recurrence=r)


def _plan_attention(node: ir.Node, per_channel: bool) -> DynamicRewrite | str:
    """com.microsoft.Attention (packed Q/K/V weight [D, 3*N*H]) -> QAttention, issue 16."""
    weight = traced_constant(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
        return "Attention weight is not a constant float32 matrix"
    unequal = node.attributes.get("qkv_hidden_sizes") is not None
    if not _weights.is_float32(node.inputs[0]) or unequal:
        return "Attention with float16 input or unequal q/k/v sizes is not quantized"
    if len(node.inputs) > 4 and any(v is not None for v in list(node.inputs)[4:]):
        return "QAttention takes no attention_bias (Attention with a bias input stays float)"
    return DynamicRewrite(node, "attention", weight, _int8(1 if per_channel else None),
                          source=node.inputs[1])


def _plan_no_kernel(node: ir.Node, per_channel: bool) -> str:
    del per_channel
    return f"onnxruntime has no dynamic int8 kernel for {node.op_type}"


def _plan_conv(node: ir.Node, per_channel: bool) -> DynamicRewrite | str:
    weight = traced_constant(node.inputs[1])
    if weight is None:
        return "weight is not constant"
    if weight.dtype != np.float32 or not _weights.is_float32(node.inputs[0]):
        return "not a float32 Conv"
    return DynamicRewrite(node, "conv", weight, _int8(0 if per_channel else None),
                          source=node.inputs[1])


_Planner = Callable[[ir.Node, bool], "DynamicRewrite | str"]
_PLANNERS: dict[str, _Planner] = {
    "MatMul": _plan_matmul,
    "Gemm": _plan_gemm,
    "Gather": _plan_gather,
    "LSTM": _plan_lstm,
    "GRU": _plan_no_kernel,
    "RNN": _plan_no_kernel,
    "Conv": _plan_conv,
}


# --- rewriting ---------------------------------------------------------------------------------


class _Builder(_weights.WeightWriter):
    """Creates the quantized initializers and nodes; caches tied weights and shared activations."""

    def __init__(self, graph: ir.Graph, matmul_kernel: MatMulKernel) -> None:
        super().__init__(graph)
        self.matmul_kernel = matmul_kernel
        self.weights: dict[tuple[object, ...], tuple[ir.Value, ...]] = {}
        self.activations: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}

    @staticmethod
    def _granularity(spec: QuantSpec) -> str:
        return "per-tensor" if spec.axis is None else "per-channel"

    def _node(
        self, like: ir.Node, op_type: str, inputs: Sequence[ir.Value | None], *,
        domain: str = "", attributes: Mapping[str, Any] | None = None,
        outputs: int = 1,
        suffix: str = "",
    ) -> ir.Node:
        props = self._props(like)
        base = like.name or op_type
        node = ir.node(
            op_type, list(inputs), attributes or {}, domain=domain, num_outputs=outputs,
            name=self._name(f"{base}_{suffix or op_type}"), metadata_props=props,
        )
        for index, value in enumerate(node.outputs):
            value.name = self._name(f"{base}_{suffix or op_type}_out{index}")
        return node

    def _replace(self, old: ir.Node, new_nodes: list[ir.Node], new_outputs: list[ir.Value]) -> None:
        ir.convenience.replace_nodes_and_values(
            self.graph, old, [old], new_nodes, list(old.outputs), new_outputs
        )

    def _matmul_weight(self, rewrite: DynamicRewrite) -> tuple[ir.Value, ir.Value]:
        """int8 weight [K, N] and scale ([N] per channel, scalar per tensor), once per weight."""
        weight, spec = rewrite.weight, rewrite.weight_spec
        key = _weights.content_key(f"matmul {spec.axis is not None}", weight)
        if key not in self.weights:
            q = quantize_tensor(weight, spec)
            base = (rewrite.source.name if rewrite.source is not None else None) or "weight"
            scales = q.scale.reshape(-1) if spec.axis is not None else q.scale.reshape(())
            self.weights[key] = (
                self._initializer(f"{base}_int8", q.codes),
                self._initializer(f"{base}_scale", scales),
            )
        codes, scale = self.weights[key]
        return codes, scale

    def rewrite_matmul(self, rewrite: DynamicRewrite) -> QuantizedNode:
        """MatMul/Gemm -> DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul [-> Add], or
        DynamicQuantizeMatMul (`matmul_kernel="fused"`, a bias Add after it fused)."""
        node, bias, bias_add = rewrite.node, rewrite.bias, rewrite.bias_add
        if isinstance(bias, ir.Value):
            # read now, not from the plan: an earlier rewrite may have replaced its producer
            # (two Gemms reading one activation, the second adding the first's output)
            bias = node.inputs[2]
        codes, scale = self._matmul_weight(rewrite)
        replaced = [node]
        if bias_add is not None and self.matmul_kernel == "fused":
            bias = _weights.bias_of(bias_add, node)
            replaced.append(bias_add)
        bias_value: ir.Value | None = None
        if isinstance(bias, np.ndarray) and bias.ndim == 1:
            bias_value = self._initializer(f"{node.name}_bias", bias)
        activation = node.inputs[0]
        assert activation is not None
        new_nodes: list[ir.Node] = []
        if self.matmul_kernel == "fused":
            inputs: list[ir.Value | None] = [activation, codes, scale, None, bias_value]
            while inputs[-1] is None:
                inputs.pop()
            main = self._node(node, "DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN)
            new_nodes.append(main)
            kernel = "DynamicQuantizeMatMul"
        else:
            quantized, a_scale, a_zero = self._quantized_activation(node, activation, new_nodes)
            integer = self._node(node, "MatMulInteger", [quantized, codes, a_zero])
            as_float = self._node(
                node, "Cast", integer.outputs, attributes={"to": ir.DataType.FLOAT}
            )
            both = self._node(node, "Mul", [a_scale, scale], suffix="scales")
            main = self._node(node, "Mul", [as_float.outputs[0], both.outputs[0]])
            new_nodes += [integer, as_float, both, main]
            if bias_value is not None:
                main = self._node(node, "Add", [main.outputs[0], bias_value], suffix="bias")
                new_nodes.append(main)
            kernel = "MatMulInteger"
        if bias is not None and bias_value is None:  # a full [M, N] bias, added as it was
            other = (bias if isinstance(bias, ir.Value)
                     else self._initializer(f"{node.name}_bias", bias))
            main = self._node(node, "Add", [main.outputs[0], other], suffix="bias")
            new_nodes.append(main)
        record = _record(rewrite, kernel, self._granularity(rewrite.weight_spec))
        ir.convenience.replace_nodes_and_values(
            self.graph, replaced[-1], replaced, new_nodes, [replaced[-1].outputs[0]],
            [main.outputs[0]],
        )
        return record

    def _quantized_activation(
        self, like: ir.Node, activation: ir.Value, new_nodes: list[ir.Node]
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """One DynamicQuantizeLinear per activation, shared by every MatMul reading it."""
        key = id(activation)
        if key not in self.activations:
            dql = self._node(like, "DynamicQuantizeLinear", [activation], outputs=3)
            new_nodes.append(dql)
            self.activations[key] = (dql.outputs[0], dql.outputs[1], dql.outputs[2])
        return self.activations[key]

    def rewrite_attention(self, rewrite: DynamicRewrite) -> QuantizedNode:
        """Attention -> DynamicQuantizeLinear(x) + com.microsoft.QAttention (int8 weight,
        per-column scales when per-channel; uint8 input shared with other readers of x)."""
        node = rewrite.node
        codes, scale = self._matmul_weight(rewrite)
        activation = node.inputs[0]
        assert activation is not None
        new_nodes: list[ir.Node] = []
        quantized, a_scale, a_zero = self._quantized_activation(node, activation, new_nodes)
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        main = self._node(
            node, "QAttention",
            [quantized, codes, node.inputs[2], a_scale, scale, mask, a_zero],
            domain=MS_DOMAIN, attributes=attrs,
        )
        new_nodes.append(main)
        if node.outputs[0].dtype is not None:
            main.outputs[0].dtype = node.outputs[0].dtype
        main.outputs[0].shape = node.outputs[0].shape
        self._replace(node, new_nodes, [main.outputs[0]])
        return _record(rewrite, "QAttention", self._granularity(rewrite.weight_spec))

    def rewrite_gather(self, rewrite: DynamicRewrite) -> QuantizedNode:
        """int8 rows with one scale per row, read by `com.microsoft.GatherBlockQuantized`.

        The kernel gathers the rows and dequantizes only them (dequantizing the whole table with
        DequantizeLinear and gathering after measured 40x slower on a 30522 x 384 table). It takes
        uint8 codes with an implicit zero point of 128, so the symmetric int8 codes are stored
        offset by 128; one block spans the whole row (block size: the next power of two >= 16).
        """
        node, table = rewrite.node, rewrite.weight
        key = _weights.content_key("gather", table)
        if key not in self.weights:
            q = quantize_tensor(table, rewrite.weight_spec)
            base = (rewrite.source.name if rewrite.source is not None else None) or "table"
            codes = (q.codes.astype(np.int16) + 128).astype(np.uint8)
            self.weights[key] = (
                self._initializer(f"{base}_int8", codes),
                self._initializer(f"{base}_scale", q.scale),
            )
        codes_value, scale = self.weights[key]
        block = max(16, 1 << (table.shape[1] - 1).bit_length())
        main = self._node(
            node, "GatherBlockQuantized", [codes_value, node.inputs[1], scale], domain=MS_DOMAIN,
            attributes={"bits": 8, "block_size": block, "gather_axis": 0, "quantize_axis": 1},
        )
        record = _record(rewrite, "GatherBlockQuantized", "per-row")
        self._replace(node, [main], [main.outputs[0]])
        return record

    def rewrite_lstm(self, rewrite: DynamicRewrite) -> QuantizedNode:
        """DynamicQuantizeLSTM takes W [dirs, input, 4*hidden] and R [dirs, hidden, 4*hidden]."""
        node, spec = rewrite.node, rewrite.weight_spec
        assert rewrite.recurrence is not None
        new_inputs: list[ir.Value | None] = list(node.inputs) + [None] * (8 - len(node.inputs))
        quantized: list[ir.Value] = []
        for array, label in ((rewrite.weight, "W"), (rewrite.recurrence, "R")):
            codes, scale = _lstm_codes(np.transpose(array, (0, 2, 1)), spec)  # [dirs, in, 4h]
            base = f"{node.name or 'lstm'}_{label}"
            quantized += [
                self._initializer(f"{base}_int8", codes),
                self._initializer(f"{base}_scale", scale),
                self._initializer(f"{base}_zero_point", np.zeros(scale.shape, np.int8)),
            ]
        inputs = [new_inputs[0], quantized[0], quantized[3], *new_inputs[3:8],
                  quantized[1], quantized[2], quantized[4], quantized[5]]
        attributes = {
            name: attr for name, attr in node.attributes.items() if name != "layout"
        }
        main = ir.Node(
            MS_DOMAIN, "DynamicQuantizeLSTM", inputs, attributes.values(),
            num_outputs=len(node.outputs), name=self._name(f"{node.name or 'lstm'}_int8"),
            metadata_props=self._props(node),
        )
        record = _record(rewrite, "DynamicQuantizeLSTM", self._granularity(spec))
        self._replace(node, [main], list(main.outputs))
        return record

    def rewrite_conv(self, rewrite: DynamicRewrite) -> QuantizedNode:
        """DynamicQuantizeLinear -> ConvInteger -> Cast -> Mul(per-output-channel scales) + bias."""
        node, weight, spec = rewrite.node, rewrite.weight, rewrite.weight_spec
        q = quantize_tensor(weight, spec)
        base = (rewrite.source.name if rewrite.source is not None else None) or "conv_weight"
        codes = self._initializer(f"{base}_int8", q.codes)
        out_channels = weight.shape[0]
        broadcast = (q.scale.reshape(-1, *([1] * (weight.ndim - 2))) if spec.axis is not None
                     else q.scale.reshape(()))
        scale = self._initializer(f"{base}_scale", broadcast)
        new_nodes: list[ir.Node] = []
        activation = node.inputs[0]
        assert activation is not None
        quantized, a_scale, a_zero = self._quantized_activation(node, activation, new_nodes)
        attributes = {name: attr for name, attr in node.attributes.items()}
        integer = ir.Node(
            "", "ConvInteger", [quantized, codes, a_zero], attributes.values(),
            name=self._name(f"{node.name or 'conv'}_ConvInteger"),
            metadata_props=self._props(node),
        )
        integer.outputs[0].name = self._name(f"{node.name or 'conv'}_int32")
        as_float = self._node(node, "Cast", integer.outputs, attributes={"to": ir.DataType.FLOAT})
        both = self._node(node, "Mul", [a_scale, scale], suffix="scales")
        main = self._node(node, "Mul", [as_float.outputs[0], both.outputs[0]])
        new_nodes += [integer, as_float, both, main]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = traced_constant(node.inputs[2])
            channels = [out_channels] + [1] * (weight.ndim - 2)
            bias_value = (
                self._initializer(f"{base}_bias", bias.reshape(channels))
                if bias is not None else None
            )
            if bias_value is None:
                shape = self._initializer(f"{base}_bias_shape", np.array(channels, np.int64))
                reshape = self._node(node, "Reshape", [node.inputs[2], shape], suffix="bias_shape")
                new_nodes.append(reshape)
                bias_value = reshape.outputs[0]
            main = self._node(node, "Add", [main.outputs[0], bias_value], suffix="bias")
            new_nodes.append(main)
        record = _record(rewrite, "ConvInteger", self._granularity(spec))
        self._replace(node, new_nodes, [main.outputs[0]])
        return record


# The one dispatch from a planned rewrite to the code that applies it (no names built at run time).
MATERIALIZERS: dict[RewriteKind, Callable[[_Builder, DynamicRewrite], QuantizedNode]] = {
    "matmul": _Builder.rewrite_matmul,
    "attention": _Builder.rewrite_attention,
    "gather": _Builder.rewrite_gather,
    "lstm": _Builder.rewrite_lstm,
    "conv": _Builder.rewrite_conv,
}


def _record(rewrite: DynamicRewrite, kernel: str, granularity: str) -> QuantizedNode:
    node = rewrite.node
    weight = rewrite.source.name if rewrite.source is not None else None
    return QuantizedNode(node.name or "", node.op_type, layer_name(node), weight or "", kernel,
                         granularity)


def _lstm_codes(weight: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes of an LSTM weight [dirs, in, 4h] and its scales: [dirs, 4h] per direction and
    gate column (`spec.axis` 1), [dirs] per direction (`spec.axis` 0)."""
    dirs, inputs, gates = weight.shape
    if spec.axis == 0:
        q = quantize_tensor(np.ascontiguousarray(weight), spec)
        return q.codes, q.scale.reshape(-1)
    # one column per (direction, gate column): [in, dirs * 4h], one scale per column
    columns = np.ascontiguousarray(np.transpose(weight, (1, 0, 2)).reshape(inputs, -1))
    q = quantize_tensor(columns, spec)
    codes = np.transpose(q.codes.reshape(inputs, dirs, gates), (1, 0, 2))
    return np.ascontiguousarray(codes), q.scale.reshape(dirs, gates)
