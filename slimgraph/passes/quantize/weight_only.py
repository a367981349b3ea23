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

Asymmetric (default): unsigned codes over [min(block, 0), max(block, 0)] with a zero point per
block (all 16 levels of int4; onnxruntime's MatMulNBits runs uint4 zero points as fast as none).
Symmetric: codes in [-(2^(b-1) - 1), 2^(b-1) - 1], scale max|block| / (2^(b-1) - 1).
4-bit values are packed two per byte, the first in the low nibble (ONNX INT4 / MatMulNBits).

How the codes are chosen is the `method` (`METHODS`): round-to-nearest ("rtn", min-max per
block), HQQ ("hqq", `hqq.py`: half-quadratic fit of each block's grid, no data), GPTQ ("gptq",
`gptq.py`: error feedback through the inverse Hessian of the MatMul's calibration inputs) or AWQ
("awq", `awq.py`: activation-aware channel scales folded exactly into the op before, then
clipping searched on calibration inputs). The data-aware two read the MatMuls' inputs on
onnxruntime (`_inputs.collect_inputs`). The plan carries each rewrite's codes; the materializers
only write them.

Embedding tables and the head (a MatMul whose output is a graph output through bias and data
movement only: an LM head, a classifier) are quantized to `embedding_bits` / `head_bits`, 8 by
default: they hold most of a small LM's error at 4 bits and little of its time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
from slimgraph.passes.quantize._inputs import collect_inputs
from slimgraph.passes.quantize._weights import (
    QuantizedNode,
    WeightPlan,
    WeightQuantizePass,
    WeightQuantizeResult,
    WeightWriter,
    as_tuple,
    working_copy,
)
from slimgraph.passes.quantize.awq import SAMPLE_ROWS, AWQOptions, AWQTarget, awq_scale
from slimgraph.passes.quantize.gptq import GPTQOptions, gptq_quantize
from slimgraph.passes.quantize.hqq import hqq_quantize
from slimgraph.passes.registry import register_pass
from slimgraph.runtime.calibrate import CalibrationData, calibration_batches
from slimgraph.runtime.quant_math import (
    QuantizedTensor,
    QuantSpec,
    pack_4bit,
    quantize_tensor,
    weight_spec,
)

__all__ = [
    "METHODS",
    "DATA_METHODS",
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
METHODS: tuple[str, ...] = ("rtn", "hqq", "gptq", "awq")
DATA_METHODS: frozenset[str] = frozenset({"gptq", "awq"})  # need calibration data
# The accuracy level MatMulNBits is written with: 4 computes with int8 activations (per block),
# fastest on CPU; benchmarks/decoder.py measures its speed and perplexity against level 0.
DEFAULT_ACCURACY_LEVEL = 4
# 8-bit MatMulNBits always get level 4: onnxruntime 1.32's CPU has no other fast kernel for them
# (M=1, K=1024, N=32000, 2 threads: 1246 ms at level 0 against 20.7 ms at level 4), so an 8-bit
# head written at level 0 made a whole decode step 25x slower than onnxruntime's own int4 file.
EIGHT_BIT_ACCURACY_LEVEL = 4
# Ops a head's output may pass through on its way to a graph output.
_HEAD_PATH = frozenset({"Add", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast",
                        "Flatten"})
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
    symmetric: bool = False
    exclude: Sequence[str] = ()
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    embeddings: bool = True
    exclude_ops: Sequence[str] = ()
    method: str = "rtn"
    head_bits: int | None = 8
    embedding_bits: int | None = 8
    act_order: bool = True
    awq_clip: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", as_tuple(self.exclude))
        object.__setattr__(self, "exclude_ops", as_tuple(self.exclude_ops))

    def check(self) -> None:
        """Raises:
        BadOptionError: bits other than 4 or 8 (also for the head and tables), a block size
            that is not a power of two >= 16, an unknown format or method, HQQ without zero
            points.
        """
        for bits in (self.bits, self.head_bits, self.embedding_bits):
            if bits is not None and bits not in (4, 8):
                raise BadOptionError(
                    f"weight-only quantization supports bits 4 or 8 (got {bits})"
                )
        if self.method not in METHODS:
            raise BadOptionError.worded(
                "unknown weight-only {method} '{name}' (choose {choices})",
                method=("method", "--method"), name=self.method, choices=", ".join(METHODS))
        if self.method == "hqq" and self.symmetric:
            raise BadOptionError("HQQ fits each block's zero point: it needs symmetric=False")
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
        return self.spec_for(self.bits)

    def spec_for(self, bits: int | None) -> QuantSpec:
        """The block-wise spec at `bits` (None: `bits`)."""
        return weight_spec(bits or self.bits, self.symmetric, axis=0,
                           block_size=self.block_size)


WeightOnlyKind = Literal["matmul", "gather"]


@dataclass(frozen=True, eq=False)
class WeightOnlyRewrite:
    """One planned rewrite: a MatMul with its constant weight [K, N] (and the bias Add that
    MatMulNBits takes in), or an embedding Gather with its table [V, D]; `quantized`: the codes
    the method chose (None: round-to-nearest when written)."""

    node: ir.Node
    kind: WeightOnlyKind
    weight: np.ndarray
    spec: QuantSpec
    bias_add: ir.Node | None = None
    quantized: QuantizedTensor | None = None


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
        symmetric: symmetric codes without zero points (True) or asymmetric with zero points
            (False, the default).
        exclude: fnmatch patterns over layer names and node names to leave in float.
        accuracy_level: 4-bit MatMulNBits' `accuracy_level` (4, the default: int8 activations,
            as onnxruntime also runs the "dq" format; 0: float activations). 8-bit MatMulNBits
            (the head, `bits=8`) always get level 4, onnxruntime's only fast kernel for them.
        exclude_ops: op types to leave in float: "MatMul" and/or "Gather" (embeddings).
        embeddings: also quantize embedding tables (Gather of a constant [V, D] table) in blocks
            along D: `com.microsoft.GatherBlockQuantized` ("matmulnbits" format) or
            DequantizeLinear -> Gather ("dq").
        method: "rtn", "hqq", "gptq" or "awq" (`METHODS`; the last two need `calibration`).
        head_bits, embedding_bits: bits of the head MatMuls and of embedding tables (default 8;
            None: `bits`).
        act_order: GPTQ processes rows by decreasing Hessian diagonal (default; False: in
            order).
        awq_clip: AWQ also searches a clipping ratio per block.
        calibration: calibration data for "gptq" and "awq" (an `.npz` path, stacked arrays or
            feed dicts, as `runtime.calibrate.calibration_batches` reads them).
        batch_size: calibration rows per onnxruntime run.
    """

    mode = "weight-only"

    options_from = WeightOnlyOptions

    def __init__(
        self, *, calibration: CalibrationData | None = None, batch_size: int = 32,
        **options: Any,
    ) -> None:
        super().__init__()
        self.options = WeightOnlyOptions(**options)
        self.calibration = calibration
        self.batch_size = batch_size

    def requires(self, model: ir.Model) -> None:
        check_patterns(model.graph.all_nodes(), self.options.exclude)  # a typo is an error
        self.options.check()
        check_calibration(self.options.method, self.calibration)
        opset = _weights.opset_version(model)
        if self.options.fmt == "dq" and opset < _DQ_BLOCK_OPSET:
            raise UnsupportedModelError(
                f"block-wise DequantizeLinear needs opset >= {_DQ_BLOCK_OPSET} and the model has "
                f"opset {opset}; quantize_weight_only() upgrades it first"
            )

    def _plan_model(self, model: ir.Model) -> WeightOnlyPlan:
        graph = model.graph
        if "MatMul" not in self.options.exclude_ops and "Gemm" not in self.options.exclude_ops:
            _gemms_as_matmuls(graph)
        plan = plan_weight_only(graph, self.options)
        if not plan.rewrites:
            return plan
        return with_method(model, plan, self.options, self.calibration,
                           batch_size=self.batch_size)

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
                spec = options.spec_for(options.embedding_bits)
                tables.append(WeightOnlyRewrite(node, "gather", table, spec))
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
        spec = options.spec_for(options.head_bits if _is_head(node) else options.bits)
        matmuls.append(WeightOnlyRewrite(node, "matmul", weight, spec, fused))
    _check_block_size(matmuls, options.block_size)
    return WeightOnlyPlan(tuple(matmuls + tables), tuple(skipped), candidates)


def _check_block_size(matmuls: Sequence[WeightOnlyRewrite], block_size: int) -> None:
    """A block size that fits the K of no MatMul is a mistake. It fits a K it divides, or a K
    smaller than itself (one block per column); where it fits some MatMuls and not others, the
    others' K is zero-padded to a multiple of it.

    Raises:
        BadOptionError: naming the K values.
    """
    ks = sorted({r.weight.shape[0] for r in matmuls})
    if ks and all(k % block_size and k > block_size for k in ks):
        shown = ", ".join(map(str, ks[:6])) + (", ..." if len(ks) > 6 else "")
        raise BadOptionError.worded(
            "{block} {size} does not divide K of any MatMul (K = {ks}): choose a block size "
            "that divides K", block=("block_size", "--block-size"), size=str(block_size),
            ks=shown)


def _is_head(node: ir.Node) -> bool:
    """The MatMul's output is a graph output through bias Adds and data movement only (each
    value on the way read once): an LM head or a classifier."""
    value = node.outputs[0]
    for _ in range(8):
        if value.is_graph_output():
            return True
        uses = list(value.uses())
        if len(uses) != 1 or uses[0].node.op_type not in _HEAD_PATH or (
            uses[0].node.domain not in ("", "ai.onnx")
        ):
            return False
        user = uses[0].node
        if user.op_type == "Add" and any(
            v is not value and v is not None and traced_constant(v) is None for v in user.inputs
        ):
            return False  # a residual sum of two activations, not a bias
        value = user.outputs[0]
    return False


def check_calibration(method: str, calibration: object) -> None:
    """Raises BadOptionError: a data-aware `method` without calibration data."""
    if method in DATA_METHODS and calibration is None:
        raise BadOptionError.worded(
            "{method} {name} needs calibration data ({calib})", method=("method=", "--method"),
            name=method, calib=("calibration=", "--calib DATA.npz"))


def with_method(
    model: ir.Model, plan: WeightOnlyPlan, options: WeightOnlyOptions,
    calibration: CalibrationData | None, *, batch_size: int = 32,
) -> WeightOnlyPlan:
    """The plan with the codes of every MatMul rewrite chosen by `options.method` (tables stay
    round-to-nearest). AWQ also rewrites the graph (its scales folded, exact in float) and
    the rewrites' weights (scaled)."""
    method = options.method
    matmuls = [r for r in plan.rewrites if r.kind == "matmul"]
    if method == "rtn" or not matmuls:
        return plan
    chosen: dict[int, WeightOnlyRewrite] = {}
    if method == "hqq":
        for r in matmuls:
            chosen[id(r)] = replace(r, quantized=hqq_quantize(r.weight, r.spec))
    else:
        assert calibration is not None
        names = list(dict.fromkeys(r.node.inputs[0].name for r in matmuls
                                   if r.node.inputs[0] is not None and r.node.inputs[0].name))
        batches = calibration_batches(model, calibration, batch_size=batch_size)
        if method == "gptq":
            stats = collect_inputs(model, names, batches, gram=True, keep=0,
                                   total=batches.total)
            gptq = GPTQOptions(act_order=options.act_order)
            for r in matmuls:
                record = stats.get(r.node.inputs[0].name)  # type: ignore[union-attr, arg-type]
                if record is not None and record.gram is not None:
                    chosen[id(r)] = replace(
                        r, quantized=gptq_quantize(r.weight, record.gram, r.spec, gptq))
        else:
            stats = collect_inputs(model, names, batches, gram=False, keep=SAMPLE_ROWS,
                                   total=batches.total)
            result = awq_scale(model.graph, [AWQTarget(r.node, r.weight, r.spec)
                                             for r in matmuls],
                               stats, AWQOptions(clip=options.awq_clip))
            for r in matmuls:
                weight = result.weights[r.node].astype(np.float32)
                chosen[id(r)] = replace(r, weight=weight, quantized=result.quantized.get(r.node))
    rewrites = tuple(chosen.get(id(r), r) for r in plan.rewrites)
    return WeightOnlyPlan(rewrites, plan.skipped, plan.candidates)


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
    symmetric: bool = False,
    exclude: Sequence[str] = (),
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    embeddings: bool = True,
    exclude_ops: Sequence[str] = (),
    method: str = "rtn",
    head_bits: int | None = 8,
    embedding_bits: int | None = 8,
    act_order: bool = True,
    awq_clip: bool = True,
    calibration: CalibrationData | None = None,
    batch_size: int = 32,
) -> ir.Model:
    """Weight-only block-wise quantization of a copy of `model` (the input is left untouched).

    The options are `WeightOnlyQuantizePass`'s.

    Raises:
        BadOptionError: a bad option (see `WeightOnlyOptions.check`), or `method` "gptq" or
            "awq" without calibration data.
        UnsupportedModelError: nothing to quantize; a "dq" model that cannot be upgraded.
        BadDataError: calibration data that does not fit the model.

    Example:
        >>> q = quantize_weight_only(model, bits=4, block_size=32)  # doctest: +SKIP
        >>> q = quantize_weight_only(model, method="gptq", calibration="c.npz")  # doctest: +SKIP
    """
    options = WeightOnlyOptions(
        bits=bits, block_size=block_size, fmt=fmt, symmetric=symmetric, exclude=exclude,
        accuracy_level=accuracy_level, embeddings=embeddings, exclude_ops=exclude_ops,
        method=method, head_bits=head_bits, embedding_bits=embedding_bits, act_order=act_order,
        awq_clip=awq_clip,
    )

    def check() -> None:
        options.check()
        check_calibration(method, calibration)

    minimum = _DQ_BLOCK_OPSET if fmt == "dq" else 0
    copy = working_copy(model, minimum, _DQ_BLOCK_OPSET, check=check)
    return WeightOnlyQuantizePass(calibration=calibration, batch_size=batch_size,
                                  **vars(options))(copy).model


def _codes(kind: str, rewrite: WeightOnlyRewrite) -> tuple[tuple[object, ...], QuantizedTensor]:
    """The rewrite's codes (round-to-nearest unless its method chose them) and the key under
    which equal results are stored once (tied weights)."""
    q = rewrite.quantized or quantize_tensor(rewrite.weight, rewrite.spec)
    key = (_weights.content_key(kind, rewrite.weight), rewrite.spec,
           _weights.content_key("codes", q.codes), _weights.content_key("scale", q.scale))
    return key, q


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
        key, q = _codes("matmulnbits", rewrite)
        if key not in self.cache:
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
        level = self.accuracy_level if spec.bits == 4 else EIGHT_BIT_ACCURACY_LEVEL
        new = ir.node(
            "MatMulNBits", inputs,
            {"K": k, "N": n, "bits": spec.bits, "block_size": spec.block_size,
             **({"accuracy_level": level} if level else {})},
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
        key, q = _codes("dq", rewrite)
        if key not in self.cache:
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
