"""The fusions as onnxscript rewrite rules: one rule table, one driver, a reason for every skip.

Each fusion is a `onnxscript.rewriter.pattern.RewriteRuleClassBase` subclass: `pattern` is the
subgraph, `check` returns a `MatchResult` that says why a match is refused (each rule's
`verdict`), `rewrite` builds the replacement (the algebra is in `slimgraph.passes.fuse_math`).
`fusion_rules(edit, family)` is the one table: a family is the name of the pass that applies
those rules. `run_rules` applies a rule
set (to a fixed point, at most `max_rounds` sweeps) and then sweeps once more with a
`MatchingTracer` that changes nothing, to collect why each candidate left in the graph was not
rewritten; those reasons become the pass's `Skipped` records.

What a skip is: a node matched the pattern's structure and the rule's `check` refused it (its
reason is recorded; a check that fails with the empty reason `NOT_A_CANDIDATE` says the node only
resembles the pattern, e.g. an Add whose other operand is computed, and is not recorded). Rules
that set `report_shared` also record a structural match refused because an intermediate value has
other readers (onnxscript's matcher refuses it before `check` runs).

Weights are written through the kit (`set_constant`: in place when the layer is the weight's only
reader, else a new initializer for the new node; copy-on-share), so a weight shared with another
node is never changed. Rewrites run only on a committed match: in the tracing sweep `rewrite`
declines (`RuleEdit.dry_run`), so tracing has no side effects.

The rules see every graph onnxscript's rewriter visits (the main graph and If/Loop bodies; the
rules that add initializers leave model-local functions alone, which cannot hold any).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchContext
from onnxscript.rewriter.pattern import (
    MatchingTracer,
    MatchResult,
    MatchStatus,
    RewriteRule,
    RewriteRuleClassBase,
    RewriteRuleSet,
)
from onnxscript.rewriter.rules.common import _matmul_add_to_gemm

from slimgraph.passes._kit import Names, add_initializer, constant_array, layout, set_constant
from slimgraph.passes.base import Skipped
from slimgraph.passes.fuse_math import (
    batchnorm_affine,
    channel_vector,
    pad_to_conv_pads,
    scale_output_channels,
)

__all__ = [
    "FLOAT_TYPES",
    "NOT_A_CANDIDATE",
    "RuleEdit",
    "FusionRule",
    "BatchNormIntoLayer",
    "BatchNormToAffine",
    "FoldAffineIntoLayer",
    "PadIntoConv",
    "SumOfTwoToAdd",
    "SkipRecorder",
    "batchnorm_refusal",
    "batchnorm_scale_shift",
    "fusion_rules",
    "run_rules",
    "node_label",
]

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)

# The reason of a failed check that is not worth a Skipped record (the node only resembles the
# pattern). onnxscript keeps the empty string as the match's reason.
NOT_A_CANDIDATE = ""

_DRY_RUN = "tracing sweep: rewrite declined"
_OTHER_USES = "Matched nodes have other uses preventing replacement."  # onnxscript's matcher


def node_label(node: ir.Node) -> str:
    """A node's name for reports, `<unnamed Op>` when it has none."""
    return node.name or f"<unnamed {node.op_type}>"


@dataclasses.dataclass
class RuleEdit:
    """What the rules of one pass run share.

    Attributes:
        names: the one fresh-name allocator of the run (new initializers).
        fused: rewrites committed so far, per `FusionRule.label`.
        dry_run: set during the tracing sweep: `rewrite` declines, nothing changes.
        report_shared: names of the rules that record "other readers" as a skip.
    """

    names: Names
    fused: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    dry_run: bool = False
    report_shared: set[str] = dataclasses.field(default_factory=set)


class FusionRule(RewriteRuleClassBase):
    """A slimgraph fusion: subclasses define `pattern`, `verdict` and `replace`.

    `check` (onnxscript's hook) returns the rule's `verdict`: a `MatchResult` that failed with
    the reason the match is refused. It refuses model-local functions for rules that add
    initializers (a function holds none). `rewrite` counts the rewrite under `label` and calls
    `replace`; in the tracing sweep it declines instead. `replace` runs only for a match that is
    committed right after, so it may write weights through the kit.
    """

    label: str = "fused"
    report_shared: ClassVar[bool] = False
    adds_initializers: ClassVar[bool] = True

    def __init__(self, edit: RuleEdit, name: str | None = None) -> None:
        super().__init__(name=name)
        self.edit = edit
        if self.report_shared:
            edit.report_shared.add(self.name)

    def check(self, op: Any, *args: Any, **bindings: Any) -> MatchResult:
        # onnxscript passes the MatchContext as `op`
        if self.adds_initializers and isinstance(op.graph_or_function, ir.Function):
            return MatchResult().fail(NOT_A_CANDIDATE)
        return self.verdict(op, **bindings)

    def verdict(self, context: MatchContext, **bindings: Any) -> MatchResult:
        """Success, or a failure whose reason says why the match is refused."""
        return MatchResult()

    def rewrite(self, op: Any, *args: Any, **bindings: Any) -> Any:
        if self.edit.dry_run:
            return MatchResult().fail(_DRY_RUN)
        self.edit.fused[self.label] += 1
        return self.replace(op, **bindings)

    def replace(self, op: Any, **bindings: Any) -> ir.Value:
        raise NotImplementedError

    def _new_constant(self, node: ir.Node, index: int, array: np.ndarray, base: str) -> ir.Value:
        """`array` for input `index` of `node` (copy-on-share), or a new initializer for an
        input the node does not have yet."""
        if index < len(node.inputs) and node.inputs[index] is not None:
            return set_constant(node, index, array, names=self.edit.names)
        assert node.graph is not None
        return add_initializer(node.graph, base, array, names=self.edit.names)


def _adopt(value: ir.Value, old: ir.Node) -> ir.Value:
    """Give the node producing `value` the name, doc string and metadata of `old` (torch layer
    names stay with the layer)."""
    new = value.producer()
    if new is not None:
        new.name = old.name
        new.doc_string = old.doc_string
        new.metadata_props.update(old.metadata_props)
    return value


def _producer(value: ir.Value) -> ir.Node:
    node = value.producer()
    assert node is not None  # the pattern bound a computed value
    return node


# ---------------------------------------------------------------- BatchNorm into the layer before


def batchnorm_refusal(bn: ir.Node, channels: int) -> str | None:
    """Why the BatchNormalization `bn` cannot become a per-channel affine map of `channels`
    channels (training mode, parameters not constant or not one per channel), or None."""
    if bn.attributes.get_int("training_mode", 0) or len(bn.outputs) > 1:
        # before opset 14, asking for the running statistics outputs means training mode
        return "BatchNormalization in training mode"
    if bn.attributes.get_int("spatial", 1) != 1:
        return "BatchNormalization with spatial=0"
    params = [constant_array(v) for v in bn.inputs[1:5]]
    if len(params) != 4 or any(p is None for p in params):
        return "BatchNormalization parameters are not constant"
    if any(p.shape != (channels,) for p in params if p is not None):
        return f"BatchNormalization parameters do not have one entry per channel ({channels})"
    if bn.outputs[0].dtype not in FLOAT_TYPES:
        return "not a float BatchNormalization"
    return None


def batchnorm_scale_shift(bn: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """The BN `bn` with constant parameters as `(scale, shift)` per channel (float64)."""
    gamma, beta, mean, var = (constant_array(v) for v in bn.inputs[1:5])
    assert gamma is not None and beta is not None and mean is not None and var is not None
    return batchnorm_affine(gamma, beta, mean, var, bn.attributes.get_float("epsilon", 1e-5))


class BatchNormIntoLayer(FusionRule):
    """`BN(layer(x, W, b))` -> `layer(x, W * s, b * s + t)` for a Conv, ConvTranspose (groups
    included), Gemm (`beta` folded into the bias) or 2-D MatMul with a constant (K, N) weight
    (which becomes `Gemm(x, W * s, t)`); `s, t` is the BN as an affine map."""

    report_shared = True

    def __init__(self, edit: RuleEdit, layer_op: str) -> None:
        super().__init__(edit, name=f"fuse-batchnorm:{layer_op}")
        self.layer_op = layer_op
        self.label = "matmul" if layer_op == "MatMul" else "conv/convtranspose/gemm"

    def pattern(self, op: Any, x: Any) -> Any:
        layer = getattr(op, self.layer_op)(x, _allow_other_inputs=True, _outputs=["layer_out"])
        return op.BatchNormalization(layer, _allow_other_inputs=True, _outputs=["bn_out"])

    def verdict(self, context: MatchContext, **bindings: Any) -> MatchResult:
        result = MatchResult()
        x: ir.Value = bindings["x"]
        layer, bn = _producer(bindings["layer_out"]), _producer(bindings["bn_out"])
        weight = constant_array(layer.inputs[1]) if len(layer.inputs) > 1 else None
        op_layout = layout(layer)
        if self.layer_op == "MatMul" and (
            weight is None or weight.ndim != 2 or x.shape is None or len(x.shape) != 2
        ):
            return result.fail("MatMul is not 2-D with a constant weight")
        channels = None
        if weight is not None and op_layout is not None and weight.ndim >= 2:
            channels = op_layout.out_channels(weight.shape)
        if weight is None or op_layout is None or channels is None:
            return result.fail(f"the {layer.op_type} weight is not a constant initializer")
        if op_layout.group > 1 and weight.shape[0] % op_layout.group:
            return result.fail(f"the {layer.op_type} weight rows do not split into the groups")
        bias_value = layer.inputs[2] if len(layer.inputs) > 2 else None
        if bias_value is not None:
            bias = constant_array(bias_value)
            if bias is None:
                return result.fail(f"the {layer.op_type} bias is not a constant")
            try:
                np.broadcast_shapes(bias.shape, (channels,))
            except ValueError:
                return result.fail(f"the {layer.op_type} bias does not broadcast to its output")
        reason = batchnorm_refusal(bn, channels)
        return result.fail(reason) if reason else result

    def replace(self, op: Any, **bindings: Any) -> ir.Value:
        layer, bn = _producer(bindings["layer_out"]), _producer(bindings["bn_out"])
        weight_value = layer.inputs[1]
        weight = constant_array(weight_value)
        op_layout = layout(layer)
        assert weight is not None and weight_value is not None and op_layout is not None
        scale, shift = batchnorm_scale_shift(bn)
        bias = constant_array(layer.inputs[2]) if len(layer.inputs) > 2 else None
        bias64 = np.zeros(1) if bias is None else bias.astype(np.float64)
        bias64 = bias64 * layer.attributes.get_float("beta", 1.0) * scale + shift
        base = weight_value.name or "weight"
        new_weight = self._new_constant(
            layer, 1, scale_output_channels(weight, scale, op_layout), base
        )
        new_bias = self._new_constant(layer, 2, bias64.astype(weight.dtype), f"{base}_bias")
        attributes = {k: v for k, v in layer.attributes.items() if k != "beta"}
        op_type = "Gemm" if layer.op_type == "MatMul" else layer.op_type
        return _adopt(op.op(op_type, bindings["x"], new_weight, new_bias, **attributes), layer)


class BatchNormToAffine(FusionRule):
    """A BatchNormalization with nothing to fold into -> `Mul(x, s) + t` (`s`, `t` shaped
    `(C, 1, ...)` over the input's spatial axes; needs the input's rank), or with
    `form="conv"` one depthwise 1x1 Conv (`group=C`, weight `s`, bias `t`) for inputs with
    spatial axes. Every BatchNormalization left is a skip with its reason."""

    label = "batchnorm"
    report_shared = True

    def __init__(self, edit: RuleEdit, form: str = "mul-add") -> None:
        super().__init__(edit, name=f"batchnorm-to-affine:{form}")
        self.form = form

    def pattern(self, op: Any, x: Any) -> Any:
        return op.BatchNormalization(x, _allow_other_inputs=True, _outputs=["bn_out"])

    def verdict(self, context: MatchContext, **bindings: Any) -> MatchResult:
        result = MatchResult()
        x: ir.Value = bindings["x"]
        bn = _producer(bindings["bn_out"])
        gamma = constant_array(bn.inputs[1]) if len(bn.inputs) > 1 else None
        if gamma is None:
            return result.fail("parameters not constant")
        reason = batchnorm_refusal(bn, gamma.size)
        if reason is None and (x.shape is None or len(x.shape) < 2):
            reason = "input rank unknown"
        if reason is None and self.form == "conv" and len(x.shape or ()) < 3:
            reason = "a depthwise Conv needs spatial axes"
        return result.fail(reason) if reason else result

    def replace(self, op: Any, **bindings: Any) -> ir.Value:
        x: ir.Value = bindings["x"]
        bn = _producer(bindings["bn_out"])
        graph, names = bn.graph, self.edit.names
        assert graph is not None and x.shape is not None and bn.inputs[1] is not None
        dtype = bn.inputs[1].dtype
        scale, shift = batchnorm_scale_shift(bn)
        channels, spatial = scale.size, (1,) * (len(x.shape) - 2)
        numpy_dtype = dtype.numpy() if dtype is not None else np.float32
        base = bn.inputs[1].name or "bn"
        if self.form == "conv":
            kernel = (scale.reshape((channels, 1) + spatial)).astype(numpy_dtype)
            weight = add_initializer(graph, f"{base}_dw", kernel, names=names)
            bias = add_initializer(
                graph, f"{base}_dw_bias", shift.astype(numpy_dtype), names=names
            )
            return _adopt(op.Conv(x, weight, bias, group=channels), bn)
        factor = scale.reshape((channels,) + spatial).astype(numpy_dtype)
        offset = shift.reshape((channels,) + spatial).astype(numpy_dtype)
        s = add_initializer(graph, f"{base}_scale", factor, names=names)
        t = add_initializer(graph, f"{base}_shift", offset, names=names)
        scaled = op.Mul(x, s, _name=f"{bn.name}_mul" if bn.name else None)
        scaled.type, scaled.shape = x.type, x.shape
        mul = _producer(scaled)
        mul.metadata_props.update(bn.metadata_props)
        return _adopt(op.Add(scaled, t), bn)


# ---------------------------------------------------------------- per-channel Mul/Add/Sub folding


@dataclasses.dataclass
class _AffinePlan:
    constants: dict[int, np.ndarray]  # input index -> new value
    drop_beta: bool  # Gemm: `beta` is folded into the new bias


class FoldAffineIntoLayer(FusionRule):
    """`Mul/Add/Sub(layer(...), k)` with `k` constant per output channel (or scalar) folds into
    the layer: `(W x + b) * k + c = (k W) x + (k b + c)` per channel; a BatchNormalization's
    gamma and beta take the factor. `k - layer` (constant on the left of Sub) is not a rule."""

    label = "mul/add"

    def __init__(self, edit: RuleEdit, layer_op: str, affine_op: str) -> None:
        super().__init__(edit, name=f"fold-affine:{affine_op}({layer_op})")
        self.layer_op, self.affine_op = layer_op, affine_op
        self._plan: _AffinePlan | None = None

    def pattern(self, op: Any, k: Any) -> Any:
        layer = getattr(op, self.layer_op)(_allow_other_inputs=True, _outputs=["layer_out"])
        return getattr(op, self.affine_op)(layer, k)

    def verdict(self, context: MatchContext, **bindings: Any) -> MatchResult:
        result = MatchResult()
        const = constant_array(bindings["k"])
        layer_out: ir.Value = bindings["layer_out"]
        layer = _producer(layer_out)
        if const is None or len(layer.outputs) != 1:
            return result.fail(NOT_A_CANDIDATE)
        if layer_out.dtype not in FLOAT_TYPES or const.dtype.kind != "f":
            return result.fail(NOT_A_CANDIDATE)
        plan = self._plan_for(layer, const)
        if isinstance(plan, str):
            return result.fail(plan)
        self._plan = plan  # `replace` follows for this very match
        return result

    def _plan_for(self, layer: ir.Node, const: np.ndarray) -> _AffinePlan | str:
        scaling = self.affine_op == "Mul"
        sign = -1.0 if self.affine_op == "Sub" else 1.0
        if layer.op_type == "BatchNormalization":
            x = layer.inputs[0]
            gamma, beta = constant_array(layer.inputs[1]), constant_array(layer.inputs[2])
            if x is None or x.shape is None or len(x.shape) < 2:
                return "the BatchNormalization input rank is unknown"
            if gamma is None or beta is None:
                return "BatchNormalization parameters are not constant"
            reason = batchnorm_refusal(layer, gamma.size)
            if reason:
                return reason
            k = channel_vector(const, len(x.shape), 1, gamma.size)
            if k is None:
                return "the constant does not vary along the channel axis alone"
            if scaling:
                new = {1: gamma * k, 2: beta * k}
            else:
                new = {2: beta + sign * k}
            return _AffinePlan({i: a.astype(gamma.dtype) for i, a in new.items()}, False)
        op_layout = layout(layer)
        weight = constant_array(layer.inputs[1]) if len(layer.inputs) > 1 else None
        channels = (
            op_layout.out_channels(weight.shape)
            if op_layout is not None and weight is not None and weight.ndim >= 2
            else None
        )
        if weight is None or op_layout is None or channels is None:
            return f"the {layer.op_type} weight is not a constant"
        bias_value = layer.inputs[2] if len(layer.inputs) > 2 else None
        bias = constant_array(bias_value)
        if bias_value is not None and bias is None:
            return f"the {layer.op_type} bias is not a constant"
        rank = 2 if layer.op_type == "Gemm" else weight.ndim
        k = channel_vector(const, rank, 1, channels)
        if k is None:
            return "the constant does not vary along the channel axis alone"
        bias64 = np.zeros(channels) if bias is None else bias.astype(np.float64)
        if layer.op_type == "Gemm" and bias is not None:
            bias64 = bias64 * layer.attributes.get_float("beta", 1.0)
            try:
                np.broadcast_shapes(bias64.shape, (1, channels))
            except ValueError:
                return "the Gemm bias does not broadcast to its output"
        constants: dict[int, np.ndarray] = {}
        if scaling:
            if op_layout.group > 1 and weight.shape[0] % op_layout.group:
                return f"the {layer.op_type} weight rows do not split into the groups"
            constants[1] = scale_output_channels(weight, k, op_layout)
            bias64 = bias64 * k
        else:
            bias64 = bias64 + sign * k
        constants[2] = bias64.astype(weight.dtype)
        return _AffinePlan(constants, layer.op_type == "Gemm")

    def replace(self, op: Any, **bindings: Any) -> ir.Value:
        layer, plan = _producer(bindings["layer_out"]), self._plan
        assert plan is not None
        self._plan = None
        base = (layer.inputs[1].name if layer.inputs[1] is not None else None) or "weight"
        inputs = list(layer.inputs)
        for index, array in plan.constants.items():
            value = self._new_constant(layer, index, array, f"{base}_bias")
            inputs += [None] * (index + 1 - len(inputs))
            inputs[index] = value
        attributes = {
            k: v for k, v in layer.attributes.items() if not (plan.drop_beta and k == "beta")
        }
        return _adopt(op.op(layer.op_type, *inputs, **attributes), layer)


# ---------------------------------------------------------------- Pad into Conv


class PadIntoConv(FusionRule):
    """`Conv(Pad(x))` with a constant-zero Pad of the spatial axes -> `Conv(x)` whose pads are
    the sum. Pad before opset 11 (`pads`/`value` attributes) and after (inputs, `axes` from
    opset 18); the Conv must have `auto_pad` NOTSET. Crops, padded batch/channel axes and
    reflect/edge modes are refused. Skips name the Pad."""

    label = "pad"
    adds_initializers = False

    def __init__(self, edit: RuleEdit) -> None:
        super().__init__(edit, name="fuse-pad:Conv")
        self._pads: list[int] | None = None

    def pattern(self, op: Any, x: Any) -> Any:
        padded = op.Pad(x, _allow_other_inputs=True, _outputs=["padded"])
        return op.Conv(padded, _allow_other_inputs=True, _outputs=["conv_out"])

    def verdict(self, context: MatchContext, **bindings: Any) -> MatchResult:
        pad, conv = _producer(bindings["padded"]), _producer(bindings["conv_out"])
        found = self._summed_pads(pad, conv)
        if isinstance(found, str):
            return MatchResult().fail(found, pad)
        self._pads = found
        return MatchResult()

    @staticmethod
    def _summed_pads(pad: ir.Node, conv: ir.Node) -> list[int] | str:
        if pad.attributes.get_string("mode", "constant") != "constant":
            return "mode is not constant"
        if conv.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
            return "the Conv uses auto_pad"
        weight = conv.inputs[1] if len(conv.inputs) > 1 else None
        if weight is None or weight.shape is None:
            return "the Conv weight's rank is unknown"
        axes = None
        if "pads" in pad.attributes:  # opset < 11
            pads = list(pad.attributes.get_ints("pads", []))
            value = pad.attributes.get_float("value", 0.0)
        else:
            pads_array = constant_array(pad.inputs[1]) if len(pad.inputs) > 1 else None
            if pads_array is None:
                return "pads are not constant"
            pads = [int(p) for p in pads_array.reshape(-1)]
            value = 0.0
            if len(pad.inputs) > 2 and pad.inputs[2] is not None:
                fill = constant_array(pad.inputs[2])
                if fill is None or fill.size != 1:
                    return "the pad value is not a constant"
                value = float(fill.reshape(-1)[0])
            if len(pad.inputs) > 3 and pad.inputs[3] is not None:
                axes_array = constant_array(pad.inputs[3])
                if axes_array is None:
                    return "axes are not constant"
                axes = [int(a) for a in axes_array.reshape(-1)]
        if value != 0.0:
            return f"pad value {value} is not zero"
        spatial = pad_to_conv_pads(pads, axes, len(weight.shape))
        if spatial is None:
            return "pads touch the batch/channel axes, crop, or do not fit the rank"
        old = list(conv.attributes.get_ints("pads", [0] * len(spatial)))
        return [a + b for a, b in zip(old, spatial, strict=True)]

    def replace(self, op: Any, **bindings: Any) -> ir.Value:
        conv, pads = _producer(bindings["conv_out"]), self._pads
        assert pads is not None
        self._pads = None
        attributes = dict(conv.attributes)
        attributes["pads"] = ir.AttrInt64s("pads", pads)
        return _adopt(op.op("Conv", bindings["x"], *conv.inputs[1:], **attributes), conv)


# ---------------------------------------------------------------- Sum of two -> Add


class SumOfTwoToAdd(FusionRule):
    """`Sum(a, b)` -> `Add(a, b)` (same arithmetic; quantizers and fusions know Add)."""

    label = "sum"
    adds_initializers = False

    def __init__(self, edit: RuleEdit) -> None:
        super().__init__(edit, name="sum-to-add:Sum")

    def pattern(self, op: Any, a: Any, b: Any) -> Any:
        return op.Sum(a, b, _outputs=["total"])

    def replace(self, op: Any, **bindings: Any) -> ir.Value:
        return _adopt(op.Add(bindings["a"], bindings["b"]), _producer(bindings["total"]))


# ---------------------------------------------------------------- MatMul + Add -> Gemm


class _CheckedGemmMixin:
    """onnxscript's MatMul+Add->Gemm rules with the checks Gemm needs: 2-D operands (others are
    not candidates), a float type, a bias C unidirectionally broadcastable to the MatMul's
    (M, N) output (Gemm cannot grow its output) that is not the MatMul's own output (Add(m, m)).
    The Gemm keeps the MatMul's name and metadata."""

    trans_a: ClassVar[bool]
    trans_b: ClassVar[bool]
    edit: RuleEdit
    label: str = "matmul+add"

    def __init__(self, edit: RuleEdit) -> None:
        super().__init__()  # type: ignore[call-arg]
        self.edit = edit
        self._matmul: ir.Node | None = None

    def check(  # type: ignore[override]  # onnxscript calls the MatchContext `op`
        self, context: Any, *args: Any, **bindings: Any
    ) -> MatchResult:
        input_a, input_b = bindings["input_a"], bindings["input_b"]
        input_c: ir.Value | None = bindings.get("input_c")
        result = MatchResult()
        if any(v.shape is None or len(v.shape) != 2 for v in (input_a, input_b)):
            return result.fail(NOT_A_CANDIDATE)
        result = super().check(context, input_a=input_a, input_b=input_b)  # type: ignore[misc]
        if not result:
            return result
        self._matmul = next((n for n in context.nodes if n.op_type == "MatMul"), None)
        if input_a.dtype not in FLOAT_TYPES:
            return result.fail("not a float MatMul")
        if input_c is None or input_c.shape is None or input_c.dtype != input_a.dtype:
            return result.fail("the bias's shape or type is unknown")
        if len(input_c.shape) > 2:
            return result.fail("the bias has rank > 2 (the Add broadcasts the output)")
        if self._matmul is None or any(input_c is node.outputs[0] for node in context.nodes):
            return result.fail("the bias is the MatMul's own output (Add(m, m))")
        rows = input_a.shape[1 if self.trans_a else 0]
        cols = input_b.shape[0 if self.trans_b else 1]
        c_dims = (1,) * (2 - len(input_c.shape)) + tuple(input_c.shape)
        for c_dim, o_dim in zip(c_dims, (rows, cols), strict=True):
            if c_dim != 1 and c_dim != o_dim:
                return result.fail("the bias does not broadcast to the MatMul's output (M, N)")
        return result

    def rewrite(self, op: Any, *args: Any, **bindings: Any) -> Any:
        if self.edit.dry_run:
            return MatchResult().fail(_DRY_RUN)
        self.edit.fused[self.label] += 1
        value = super().rewrite(op, *args, **bindings)  # type: ignore[misc]
        return value if self._matmul is None else _adopt(value, self._matmul)


def _gemm_rules(edit: RuleEdit) -> list[RewriteRule]:
    rules: list[RewriteRule] = []
    for base in (
        _matmul_add_to_gemm.TransABMatMulAddToGemm,
        _matmul_add_to_gemm.TransAMatMulAddToGemm,
        _matmul_add_to_gemm.TransBMatMulAddToGemm,
        _matmul_add_to_gemm.MatMulAddToGemm,
    ):
        checked: type[RewriteRuleClassBase] = type(
            f"Checked{base.__name__}", (_CheckedGemmMixin, base), {}
        )
        rules.extend(checked.rule(edit).commute())
    return rules


# ---------------------------------------------------------------- the table and the driver

_LAYERS = ("Conv", "ConvTranspose", "Gemm")

_FAMILIES: dict[str, Callable[[RuleEdit], list[RewriteRule]]] = {
    "fuse-batchnorm": lambda edit: [
        BatchNormIntoLayer.rule(edit, op) for op in (*_LAYERS, "MatMul")
    ],
    "fold-affine": lambda edit: [
        rule
        for layer in (*_LAYERS, "BatchNormalization")
        for affine in ("Mul", "Add", "Sub")
        for rule in (
            [FoldAffineIntoLayer.rule(edit, layer, affine)]
            if affine == "Sub"
            else FoldAffineIntoLayer.rule(edit, layer, affine).commute()
        )
    ],
    "batchnorm-to-affine": lambda edit: [BatchNormToAffine.rule(edit)],
    "fuse-pad": lambda edit: [PadIntoConv.rule(edit)],
    "sum-to-add": lambda edit: [SumOfTwoToAdd.rule(edit)],
    "matmul-add-to-gemm": _gemm_rules,
}


def fusion_rules(edit: RuleEdit, *families: str) -> RewriteRuleSet:
    """The rule set of slimgraph's fusions: every family, or those named (pass names).

    Raises:
        KeyError: an unknown family.
    """
    chosen = families or tuple(_FAMILIES)
    return RewriteRuleSet([rule for family in chosen for rule in _FAMILIES[family](edit)])


class SkipRecorder(MatchingTracer):
    """A `MatchingTracer` that keeps, per node, the best reason a rule refused it.

    A refusal by `check` (or by the replacement) outranks a structural match refused because an
    intermediate value has other readers (kept only for rules in `report_shared`); nodes that
    some rule would still rewrite, pure structural mismatches and `NOT_A_CANDIDATE` refusals
    are not recorded.
    """

    def __init__(self, report_shared: set[str] | None = None) -> None:
        super().__init__()
        self.report_shared = report_shared or set()
        self._found: dict[ir.Node, tuple[int, Skipped]] = {}
        self._rewritable: set[ir.Node] = set()

    def log(  # type: ignore[override]
        self,
        rule: RewriteRule,
        container: ir.Graph | ir.Function,
        node: ir.Node,
        match_result: MatchResult,
        status: MatchStatus,
    ) -> None:
        reason = match_result.reason
        if status == MatchStatus.SUCCESS or reason == _DRY_RUN:
            self._rewritable.add(node)
            return
        if status in (MatchStatus.CONDITION_FAILED, MatchStatus.REPLACEMENT_FAILED):
            rank = 2
        elif reason == _OTHER_USES and rule.name in self.report_shared:
            rank, reason = 1, _shared_reason(node, match_result)
        else:
            return
        if not reason:
            return
        subject = next(
            (n for n in match_result.failure_nodes_and_values if isinstance(n, ir.Node)), node
        )
        if node not in self._found or self._found[node][0] < rank:
            self._found[node] = (rank, Skipped(node_label(subject), subject.op_type, reason))

    def skipped(self) -> list[Skipped]:
        """The records, in graph order, one per node and reason."""
        records = [s for node, (_, s) in self._found.items() if node not in self._rewritable]
        return list(dict.fromkeys(records))


def _shared_reason(root: ir.Node, match: MatchResult) -> str:
    inside = set(match.nodes)
    if any(value.uses() or value.is_graph_output() for value in root.outputs[1:]):
        return f"the {root.op_type} outputs after the first are read"
    for node in match.nodes:
        if node is root:
            continue
        for value in node.outputs:
            if value.is_graph_output() or any(use.node not in inside for use in value.uses()):
                return f"the {node.op_type} output has other readers or is a graph output"
    return _OTHER_USES


def run_rules(
    model: ir.Model,
    rules: RewriteRuleSet,
    *,
    edit: RuleEdit | None = None,
    max_rounds: int = 1,
) -> tuple[int, list[Skipped]]:
    """Apply `rules` until nothing matches (at most `max_rounds` sweeps), then record why the
    candidates left were refused.

    Args:
        model: edited in place.
        rules: the rule set (`fusion_rules`, or one of onnxscript's).
        edit: the `RuleEdit` the rules were built with (None for onnxscript's own rules).
        max_rounds: at most this many rewriting sweeps.

    Returns:
        (rewrites committed, skipped nodes with their reasons).
    """
    count = 0
    for _ in range(max_rounds):
        applied = rules.apply_to_model(model)
        count += applied
        if not applied:
            break
    recorder = SkipRecorder(edit.report_shared if edit is not None else None)
    if edit is not None:
        edit.dry_run = True
    try:
        rules.apply_to_model(model, tracer=recorder)
    finally:
        if edit is not None:
            edit.dry_run = False
    return count, recorder.skipped()

