"""Weight-only int4/int8 quantization of MatMul weights with block-wise scales.

Approximate pass (seed 002, "granularity: group / sub-channel"): each MatMul weight W [K, N] is
cut into blocks of `block_size` consecutive rows along K (the reduction axis) per column, and
every block gets its own scale (and zero point when asymmetric). Activations stay float: the
weight is dequantized (by the kernel or by a DequantizeLinear node) and the MatMul runs in float,
so this shrinks files (about 1/8 for int4 weights) rather than speeding up compute-bound models.

Two output formats:
- "matmulnbits": onnxruntime's `com.microsoft.MatMulNBits` (weight transposed to [N, K], packed
  into per-block blobs, the bias Add fused), embeddings as `com.microsoft.GatherBlockQuantized`.
  The default: faster on this CPU (BERT-style encoder, int4: 1.17x vs 1.37x fp32 latency at
  batch 8, 1.23x vs 1.67x at batch 1; benchmarks/quantize_modes.py prints both side by side).
- "dq": standard ONNX, `DequantizeLinear(axis=0, block_size=B)` on an int4/int8 initializer
  feeding the unchanged MatMul (embeddings: DequantizeLinear(axis=1) feeding the Gather); needs
  opset 21, so `quantize_weight_only` upgrades older models with `onnx.version_converter` and
  checks the upgrade changed nothing. onnxruntime fuses DQ -> MatMul into MatMulNBits with int8
  activations (accuracy level 4), so the two formats' outputs differ slightly at level "all".

Symmetric (default): codes in [-(2^(b-1) - 1), 2^(b-1) - 1], scale max|block| / (2^(b-1) - 1).
Asymmetric: unsigned codes over [min(block, 0), max(block, 0)] with a zero point per block.
4-bit values are packed two per byte, the first in the low nibble (ONNX INT4 / MatMulNBits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

import slimgraph.passes.quantize._weights as _weights
from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import layer_name
from slimgraph.ir.select import check_patterns, matching_pattern
from slimgraph.passes._graph_utils import replace_output
from slimgraph.passes._kit import add_initializer, traced_constant
from slimgraph.passes.base import Skipped
from slimgraph.passes.quantize._weights import (
    QuantizedNode,
    WeightPlan,
    WeightQuantizePass,
    WeightQuantizeResult,
    WeightWriter,
    as_tuple,
    working_copy,
)
from slimgraph.passes.registry import register_pass
from slimgraph.runtime.quant_math import QuantSpec, pack_4bit, quantize_tensor, weight_spec

__all__ = [
    "FORMATS",
    "DEFAULT_FORMAT",
    "WeightOnlyOptions",
    "WeightOnlyRewrite",
    "WeightOnlyPlan",
    "plan_weight_only",
    "MATERIALIZERS",
    "WeightOnlyResult",
    "WeightOnlyQuantizePass",
    "quantize_weight_only",
]

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("matmulnbits", "dq")
DEFAULT_FORMAT = "matmulnbits"
_DQ_BLOCK_OPSET = 21


@dataclass
class WeightOnlyResult(WeightQuantizeResult):
    """What `WeightOnlyQuantizePass` quantized (and, in `skipped`, what it left float and why)."""


@dataclass(frozen=True, kw_only=True)
class WeightOnlyOptions:
    """The options of weight-only quantization (see `WeightOnlyQuantizePass`)."""

    bits: int = 4
    block_size: int = 32
    fmt: str = DEFAULT_FORMAT
    symmetric: bool = True
    exclude: Sequence[str] = ()
    accuracy_level: int = 0
    embeddings: bool = True
    exclude_ops: Sequence[str] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", as_tuple(self.exclude))
        object.__setattr__(self, "exclude_ops", as_tuple(self.exclude_ops))

    def check(self) -> None:
        """Raises:
        BadOptionError: bits other than 4 or 8, a block size that is not a power of two >= 16,
            an unknown format.
        """
        if self.bits not in (4, 8):
            raise BadOptionError(
                f"weight-only quantization supports bits 4 or 8 (got {self.bits})"
            )
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise BadOptionError(
                f"block_size must be a power of two >= 16 (got {self.block_size})"
            )
        if self.fmt not in FORMATS:
            raise BadOptionError(
                f"unknown weight-only format '{self.fmt}' (choose from {', '.join(FORMATS)})"
            )

    @property
    def spec(self) -> QuantSpec:
        """The block-wise spec of every weight (blocks along K; tables: along D)."""
        return weight_spec(self.bits, self.symmetric, axis=0, block_size=self.block_size)


WeightOnlyKind = Literal["matmul", "gather"]


@dataclass(frozen=True, eq=False)
class WeightOnlyRewrite:
    """One planned rewrite: a MatMul with its constant weight [K, N] (and the bias Add that
    MatMulNBits takes in), or an embedding Gather with its table [V, D]."""

    node: ir.Node
    kind: WeightOnlyKind
    weight: np.ndarray
    spec: QuantSpec
    bias_add: ir.Node | None = None


@dataclass(frozen=True)
class WeightOnlyPlan(WeightPlan[WeightOnlyRewrite]):
    """Rewrites (MatMuls first, then tables, each in graph order), nodes left float and why,
    and how many MatMul nodes were looked at."""


@register_pass("quantize-weight-only", exact=False)
class WeightOnlyQuantizePass(WeightQuantizePass[WeightOnlyRewrite]):
    """Block-wise int4/int8 weights for MatMul with a constant [K, N] weight (`exact = False`).

    Args:
        bits: 4 or 8.
        block_size: rows of K per block; a power of two >= 16.
        fmt: "matmulnbits" (default) or "dq" (needs opset >= 21; see `quantize_weight_only`).
        symmetric: symmetric codes without zero points (True) or asymmetric with zero points.
        exclude: fnmatch patterns over layer names and node names to leave in float.
        accuracy_level: MatMulNBits' `accuracy_level` (0: onnxruntime's default, float
            activations; 4: int8 activations, as onnxruntime runs the "dq" format).
        exclude_ops: op types to leave in float: "MatMul" and/or "Gather" (embeddings).
        embeddings: also quantize embedding tables (Gather of a constant [V, D] table) in blocks
            along D: `com.microsoft.GatherBlockQuantized` ("matmulnbits" format) or
            DequantizeLinear -> Gather ("dq").
    """

    mode = "weight-only"

    options_from = WeightOnlyOptions

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = WeightOnlyOptions(**options)

    def requires(self, model: ir.Model) -> None:
        check_patterns(model.graph.all_nodes(), self.options.exclude)  # a typo is an error
        self.options.check()
        opset = _weights.opset_version(model)
        if self.options.fmt == "dq" and opset < _DQ_BLOCK_OPSET:
            raise UnsupportedModelError(
                f"block-wise DequantizeLinear needs opset >= {_DQ_BLOCK_OPSET} and the model has "
                f"opset {opset}; quantize_weight_only() upgrades it first"
            )

    def _plan(self, graph: ir.Graph) -> WeightOnlyPlan:
        if "MatMul" not in self.options.exclude_ops and "Gemm" not in self.options.exclude_ops:
            _gemms_as_matmuls(graph)
        return plan_weight_only(graph, self.options)

    def _nothing(self, plan: WeightPlan[WeightOnlyRewrite], reasons: str) -> str:
        return (
            f"nothing to quantize weight-only: no MatMul with a constant float weight "
            f"({plan.candidates} MatMul node(s): {reasons or 'no MatMul nodes'})"
        )

    def _materialize(
        self, graph: ir.Graph, plan: WeightPlan[WeightOnlyRewrite]
    ) -> list[QuantizedNode]:
        writer = _Writer(graph, self.options.accuracy_level)
        fmt = self.options.fmt
        return [MATERIALIZERS[fmt, rewrite.kind](writer, rewrite) for rewrite in plan.rewrites]

    def _result(
        self, model: ir.Model, skipped: list[Skipped], quantized: list[QuantizedNode]
    ) -> WeightOnlyResult:
        return WeightOnlyResult(model, modified=True, skipped=skipped, quantized=quantized)


def plan_weight_only(graph: ir.Graph, options: WeightOnlyOptions) -> WeightOnlyPlan:
    """The frozen plan of weight-only quantization for `graph` (not modified)."""
    skipped: list[Skipped] = []
    matmuls: list[WeightOnlyRewrite] = []
    tables: list[WeightOnlyRewrite] = []
    candidates = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Gather" and options.embeddings and (
            "Gather" not in options.exclude_ops
        ):
            table = _embedding_table(node, options, skipped)
            if table is not None:
                tables.append(WeightOnlyRewrite(node, "gather", table, options.spec))
            continue
        if node.op_type != "MatMul":
            continue
        candidates += 1
        reason = None
        weight = traced_constant(node.inputs[1])
        if "MatMul" in options.exclude_ops:
            reason = "op type MatMul excluded"
        elif (pattern := matching_pattern(node, options.exclude)) is not None:
            reason = f"excluded by pattern '{pattern}'"
        elif weight is None:
            reason = "both inputs are activations (no constant weight)"
        elif weight.ndim != 2 or weight.dtype != np.float32 or (
            not _weights.is_float32(node.inputs[0])
        ):
            reason = "weight is not a float32 [K, N] matrix"
        if reason is not None or weight is None:
            skipped.append(Skipped(node.name or "", node.op_type, reason or ""))
            continue
        fused = None
        if options.fmt == "matmulnbits":
            fused = _weights.bias_add_after(node, weight.shape[1])
        matmuls.append(WeightOnlyRewrite(node, "matmul", weight, options.spec, fused))
    return WeightOnlyPlan(tuple(matmuls + tables), tuple(skipped), candidates)


def _embedding_table(
    node: ir.Node, options: WeightOnlyOptions, skipped: list[Skipped]
) -> np.ndarray | None:
    """The constant [V, D] table of an embedding Gather, or None (a reason is recorded)."""
    table = traced_constant(node.inputs[0])
    if table is None:
        return None  # a Gather on activations: nothing to say
    reason = None
    if (pattern := matching_pattern(node, options.exclude)) is not None:
        reason = f"excluded by pattern '{pattern}'"
    elif table.dtype != np.float32 or table.ndim != 2 or node.attributes.get_int("axis", 0) != 0:
        reason = "only float32 2-D tables gathered on axis 0 (embeddings) are quantized"
    elif table.shape[1] % options.block_size:
        reason = (
            f"row length {table.shape[1]} is not a multiple of block_size {options.block_size}"
        )
    if reason is not None:
        skipped.append(Skipped(node.name or "", node.op_type, reason))
        return None
    return table


def _gemms_as_matmuls(graph: ir.Graph) -> int:
    """Rewrite `Gemm(a, B, c)` with a constant float32 B (alpha = beta = 1, transA = 0) as
    `Add(MatMul(a, B'), c)` (B' = B or its transpose): a Linear exported as Gemm, or folded to one
    by `matmul-add-to-gemm`, is a MatMul to this mode (whose MatMulNBits takes the bias). Exact.
    """
    count = 0
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = node.attributes
        if (
            attrs.get_float("alpha", 1.0) != 1.0
            or attrs.get_float("beta", 1.0) != 1.0
            or attrs.get_int("transA", 0) != 0
        ):
            continue
        weight = traced_constant(node.inputs[1])
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
            continue
        if attrs.get_int("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        source = node.inputs[1]
        b = add_initializer(graph, f"{(source.name if source else None) or node.name}_kn", weight)
        matmul = ir.node("MatMul", [node.inputs[0], b], name=node.name)
        matmul.metadata_props.update(node.metadata_props)
        graph.insert_before(node, matmul)
        result = matmul.outputs[0]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:
            add = ir.node("Add", [result, bias], name=f"{node.name}_bias" if node.name else None)
            graph.insert_before(node, add)
            result = add.outputs[0]
        result.type, result.shape = node.outputs[0].type, node.outputs[0].shape
        replace_output(node.outputs[0], result)
        graph.remove(node, safe=True)
        count += 1
    return count


def quantize_weight_only(
    model: ir.Model,
    *,
    bits: int = 4,
    block_size: int = 32,
    fmt: str = DEFAULT_FORMAT,
    symmetric: bool = True,
    exclude: Sequence[str] = (),
    accuracy_level: int = 0,
    embeddings: bool = True,
    exclude_ops: Sequence[str] = (),
) -> ir.Model:
    """Weight-only block-wise quantization of a copy of `model` (the input is left untouched).

    Example:
        >>> q = quantize_weight_only(model, bits=4, block_size=32)  # doctest: +SKIP
    """
    options = WeightOnlyOptions(
        bits=bits, block_size=block_size, fmt=fmt, symmetric=symmetric, exclude=exclude,
        accuracy_level=accuracy_level, embeddings=embeddings, exclude_ops=exclude_ops,
    )
    minimum = _DQ_BLOCK_OPSET if fmt == "dq" else 0
    copy = working_copy(model, minimum, _DQ_BLOCK_OPSET, check=options.check)
    return WeightOnlyQuantizePass(**vars(options))(copy).model


class _Writer(WeightWriter):
    """Writes the quantized initializers and nodes for one model."""

    def __init__(self, graph: ir.Graph, accuracy_level: int) -> None:
        super().__init__(graph)
        self.accuracy_level = accuracy_level
        self.cache: dict[tuple[object, ...], tuple[ir.Value | None, ...]] = {}

    def _record(
        self, node: ir.Node, kernel: str, spec: QuantSpec, weight: str | None = None
    ) -> QuantizedNode:
        source = node.inputs[1]
        granularity = f"int{spec.bits} blocks of {spec.block_size}"
        granularity += "" if spec.symmetric else " with zero points"
        return QuantizedNode(
            node.name or "", node.op_type, layer_name(node),
            weight if weight is not None else source.name if source is not None and source.name
            else "", kernel, granularity,
        )

    def matmulnbits(self, rewrite: WeightOnlyRewrite) -> QuantizedNode:
        """MatMul [-> Add(bias)] -> com.microsoft.MatMulNBits (weight [N, K] in packed blocks)."""
        node, weight, bias_add, spec = rewrite.node, rewrite.weight, rewrite.bias_add, rewrite.spec
        k, n = weight.shape
        source = node.inputs[1]
        assert source is not None
        key = _weights.content_key("matmulnbits", weight)
        if key not in self.cache:
            q = quantize_tensor(weight, spec)
            blocks = q.scale.shape[0]
            offset = 2 ** (spec.bits - 1)
            codes = q.codes.astype(np.int16) + (offset if spec.symmetric else 0)  # unsigned
            per_row = codes.T.reshape(n, blocks, spec.block_size).astype(np.uint8)
            blob = pack_4bit(per_row) if spec.bits == 4 else per_row
            base = source.name or "weight"
            zero_value = None
            if q.zero_point is not None:
                zeros = q.zero_point.T  # [N, blocks]
                packed = pack_4bit(zeros) if spec.bits == 4 else zeros.astype(np.uint8)
                zero_value = self._initializer(f"{base}_zero_point", packed.reshape(-1))
            self.cache[key] = (
                self._initializer(f"{base}_q{spec.bits}", blob),
                self._initializer(
                    f"{base}_scale", np.ascontiguousarray(q.scale.T.reshape(-1), dtype=np.float32)
                ),
                zero_value,
            )
        packed_value, scale_value, zero_value = self.cache[key]
        replaced = [node]
        bias_value = None
        if bias_add is not None:
            bias = _weights.bias_of(bias_add, node).astype(np.float32)
            bias_value = self._initializer(f"{node.name or 'matmul'}_bias", bias)
            replaced.append(bias_add)
        inputs: list[ir.Value | None] = [
            node.inputs[0], packed_value, scale_value, zero_value, None, bias_value
        ]
        while inputs[-1] is None:
            inputs.pop()
        record = self._record(node, "MatMulNBits", spec)
        new = ir.node(
            "MatMulNBits", inputs,
            {"K": k, "N": n, "bits": spec.bits, "block_size": spec.block_size,
             **({"accuracy_level": self.accuracy_level} if self.accuracy_level else {})},
            domain=_weights.MS_DOMAIN, name=self._name(f"{node.name or 'matmul'}_nbits"),
            metadata_props=self._props(node),
        )
        ir.convenience.replace_nodes_and_values(
            self.graph, replaced[-1], replaced, [new], [replaced[-1].outputs[0]], [new.outputs[0]]
        )
        return record

    def dequantize_linear(self, rewrite: WeightOnlyRewrite) -> QuantizedNode:
        """DequantizeLinear(axis=0, block_size) of the weight feeding the unchanged MatMul (its
        bias Add stays as it is)."""
        node, weight, spec = rewrite.node, rewrite.weight, rewrite.spec
        source = node.inputs[1]
        assert source is not None
        key = _weights.content_key("dq", weight)
        if key not in self.cache:
            q = quantize_tensor(weight, spec)
            codes = q.codes[: weight.shape[0]]
            base = source.name or "weight"
            tensor = self._int_tensor(codes, spec, signed=q.zero_point is None)
            inputs: list[ir.Value | None] = [
                self._initializer(f"{base}_q{spec.bits}", tensor),
                self._initializer(f"{base}_scale", q.scale),
            ]
            if q.zero_point is not None:
                zero_tensor = self._int_tensor(q.zero_point, spec, signed=False)
                inputs.append(self._initializer(f"{base}_zero_point", zero_tensor))
            dq = ir.node(
                "DequantizeLinear", inputs, {"axis": 0, "block_size": spec.block_size},
                name=self._name(f"{node.name or 'matmul'}_dq"), metadata_props=self._props(node),
            )
            dq.outputs[0].name = self._name(f"{base}_dequantized")
            self.graph.insert_before(node, dq)
            self.cache[key] = (dq.outputs[0],)
        (dequantized,) = self.cache[key]
        record = self._record(node, "DequantizeLinear", spec)
        node.replace_input_with(1, dequantized)
        return record

    @staticmethod
    def _table(
        table: np.ndarray, spec: QuantSpec
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Codes [V, D], scales [V, D / B] (and zero points) in blocks of B along each row."""
        q = quantize_tensor(table.T, spec)
        zero = None if q.zero_point is None else np.ascontiguousarray(q.zero_point.T)
        return np.ascontiguousarray(q.codes.T), np.ascontiguousarray(q.scale.T), zero

    def gather_nbits(self, rewrite: WeightOnlyRewrite) -> QuantizedNode:
        """`GatherBlockQuantized` on uint8 data (4-bit values packed along the row)."""
        node, spec = rewrite.node, rewrite.spec
        codes, scale, zero = self._table(rewrite.weight, spec)
        base = node.inputs[0].name or "table"  # type: ignore[union-attr]
        stored = codes.astype(np.int16) + (2 ** (spec.bits - 1) if zero is None else 0)
        stored = stored.astype(np.uint8)
        data = pack_4bit(stored) if spec.bits == 4 else stored
        inputs: list[ir.Value | None] = [
            self._initializer(f"{base}_q{spec.bits}", data),
            node.inputs[1],
            self._initializer(f"{base}_scale", scale),
        ]
        if zero is not None:
            packed = pack_4bit(zero) if spec.bits == 4 else zero.astype(np.uint8)
            inputs.append(self._initializer(f"{base}_zero_point", packed))
        record = self._record(node, "GatherBlockQuantized", spec, weight=base)
        new = ir.node(
            "GatherBlockQuantized", inputs,
            {"bits": spec.bits, "block_size": spec.block_size, "gather_axis": 0,
             "quantize_axis": 1},
            domain=_weights.MS_DOMAIN, name=self._name(f"{node.name or 'gather'}_nbits"),
            metadata_props=self._props(node),
        )  # fmt: skip
        ir.convenience.replace_nodes_and_values(
            self.graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]]
        )
        return record

    def gather_dq(self, rewrite: WeightOnlyRewrite) -> QuantizedNode:
        """DequantizeLinear(axis=1, block_size) of the table, then the unchanged Gather."""
        node, spec = rewrite.node, rewrite.spec
        codes, scale, zero = self._table(rewrite.weight, spec)
        base = node.inputs[0].name or "table"  # type: ignore[union-attr]
        inputs = [
            self._initializer(f"{base}_q{spec.bits}",
                            self._int_tensor(codes, spec, signed=zero is None)),
            self._initializer(f"{base}_scale", scale),
        ]  # fmt: skip
        if zero is not None:
            zero_tensor = self._int_tensor(zero, spec, signed=False)
            inputs.append(
                self._initializer(f"{base}_zero_point", zero_tensor)
            )
        record = self._record(node, "DequantizeLinear", spec, weight=base)
        dq = ir.node(
            "DequantizeLinear", inputs, {"axis": 1, "block_size": spec.block_size},
            name=self._name(f"{node.name or 'gather'}_dq"), metadata_props=self._props(node),
        )
        dq.outputs[0].name = self._name(f"{base}_dequantized")
        self.graph.insert_before(node, dq)
        node.replace_input_with(0, dq.outputs[0])
        return record

    @staticmethod
    def _int_tensor(values: np.ndarray, spec: QuantSpec, *, signed: bool) -> ir.TensorProtocol:
        if spec.bits == 4:
            dtype = ir.DataType.INT4 if signed else ir.DataType.UINT4
            return ir.PackedTensor(pack_4bit(values.reshape(-1)), dtype, shape=values.shape)
        return ir.tensor(values.astype(np.int8 if signed else np.uint8))


# The one dispatch from (format, planned rewrite) to the code that writes it.
MATERIALIZERS: dict[tuple[str, WeightOnlyKind], Callable[[_Writer, WeightOnlyRewrite],
                                                         QuantizedNode]] = {
    ("matmulnbits", "matmul"): _Writer.matmulnbits,
    ("matmulnbits", "gather"): _Writer.gather_nbits,
    ("dq", "matmul"): _Writer.dequantize_linear,
    ("dq", "gather"): _Writer.gather_dq,
}
