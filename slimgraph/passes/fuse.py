"""Exact fusions: fold BatchNorm, per-channel Mul/Add and zero Pad into the layer before them.

Each pass replaces a pattern by fewer nodes computing the same function (up to float rounding, so
each is `exact = True` and verified at rtol 1e-4). A fold only happens where the intermediate
value has exactly one reader and is not a graph output (onnxscript's matcher guarantees this for
the rules reused here; the hand-written folds check it with `single_consumer`). The algebra is in
`slimgraph.passes.fuse_math`. The fusions work on the main graph (not inside If/Loop bodies).

- `fuse-batchnorm`: BN after Conv, ConvTranspose (groups included) or Gemm (onnxscript's rules,
  with extra checks), and after a 2-D MatMul with a constant weight (becomes a Gemm).
- `fold-affine`: Mul/Add/Sub by per-channel constants after Conv, ConvTranspose, Gemm or BN.
- `batchnorm-to-affine`: a BN left alone (nothing to fold it into) becomes Mul + Add.
- `fuse-pad`: a constant-zero Pad of the spatial axes folded into the next Conv's pads.
- `sum-to-add`: Sum of two inputs becomes Add (one input: removed).
- `matmul-add-to-gemm`: Add(MatMul(a, b), c) with 2-D a, b becomes Gemm (onnxscript's rules).
- `mark-units`: Conv/ConvTranspose/Gemm/MatMul followed by Relu/Clip/HardSwish recorded as one
  unit in node metadata (`pkg.slimgraph.unit`), so quantization keeps them together.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter.rules.common import _fuse_batchnorm, _matmul_add_to_gemm

from slimgraph.ir import metadata
from slimgraph.passes._graph_utils import bypass, is_onnx_op, replace_output, single_consumer
from slimgraph.passes._kit import add_initializer, constant_array
from slimgraph.passes.base import Skipped, SlimgraphPass, SlimgraphPassResult
from slimgraph.passes.fuse_math import (
    batchnorm_affine,
    pad_to_conv_pads,
    scale_output_channels,
)
from slimgraph.passes.registry import register_pass

__all__ = [
    "FuseBatchNormPass",
    "FoldAffinePass",
    "BatchNormToAffinePass",
    "FusePadPass",
    "SumToAddPass",
    "MatMulAddToGemmPass",
    "MarkUnitsPass",
    "FusionResult",
]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclasses.dataclass
class FusionResult(SlimgraphPassResult):
    """How many patterns each fusion rewrote."""

    fused: dict[str, int] = dataclasses.field(default_factory=dict)


def _tidy(result: FusionResult) -> FusionResult:
    """Drop what a fusion left dead (old weights, replaced nodes), so cleanup has less to redo."""
    if result.modified:
        common.RemoveUnusedNodesPass()(result.model)
    return result


def _label(node: ir.Node) -> str:
    return node.name or f"<unnamed {node.op_type}>"


# ---------------------------------------------------------------- BatchNorm into the layer before


def _bn_fail(context: Any, bn_out: ir.Value, channels: int) -> str | None:
    """Why a BN cannot be folded by the onnxscript rules beyond their own checks, or None."""
    bn = bn_out.producer()
    assert bn is not None
    if bn.attributes.get_int("training_mode", 0) or len(bn.outputs) > 1:
        # before opset 14, asking for the running statistics outputs means training mode
        return "BatchNormalization in training mode"
    if bn.attributes.get_int("spatial", 1) != 1:
        return "BatchNormalization with spatial=0"
    params = [constant_array(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params):
        return "BatchNormalization parameters are not constant"
    if any(p.shape != (channels,) for p in params):  # type: ignore[union-attr]
        return f"BatchNormalization parameters do not have one entry per channel ({channels})"
    if bn_out.dtype not in _FLOAT_TYPES:
        return "not a float BatchNormalization"
    return None


def _output_channels(node: ir.Node) -> int | None:
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim < 2:
        return None
    if node.op_type == "Conv":
        return weight.shape[0]
    if node.op_type == "ConvTranspose":
        return weight.shape[1] * node.attributes.get_int("group", 1)
    if node.op_type == "Gemm":
        return weight.shape[0] if node.attributes.get_int("transB", 0) else weight.shape[1]
    return None


class _CheckedBnMixin:
    """Extra checks on top of onnxscript's BN-fusion rules (training mode, parameter shapes)."""

    def check(  # type: ignore[no-untyped-def]
        self, context, x, inbound_out: ir.Value, batchnorm_out: ir.Value
    ) -> MatchResult:
        result = super().check(context, x, inbound_out, batchnorm_out)  # type: ignore[misc]
        if not result:
            return result
        inbound = inbound_out.producer()
        assert inbound is not None
        if inbound.domain not in ("", "ai.onnx"):
            return result.fail("not an ONNX-domain layer")
        if inbound.op_type == "Gemm" and inbound.attributes.get_int("transA", 0) not in (0, 1):
            return result.fail("bad transA")
        channels = _output_channels(inbound)
        if channels is None:
            return result.fail("weight layout unknown")
        reason = _bn_fail(context, batchnorm_out, channels)
        if reason:
            return result.fail(reason)
        return result


    def rewrite(  # type: ignore[no-untyped-def]
        self, op, x, inbound_out: ir.Value, batchnorm_out: ir.Value
    ):
        """onnxscript's rewrite, keeping the layer's name and metadata (torch layer names)."""
        inbound = inbound_out.producer()
        assert inbound is not None
        value = super().rewrite(op, x, inbound_out, batchnorm_out)  # type: ignore[misc]
        fused = value.producer()
        if fused is not None:
            fused.name = inbound.name
            fused.doc_string = inbound.doc_string
            fused.metadata_props.update(inbound.metadata_props)
        return value


class _BnConv(_CheckedBnMixin, _fuse_batchnorm.FuseBatchNormIntoConv):
    pass


class _BnConvTranspose(_CheckedBnMixin, _fuse_batchnorm.FuseBatchNormIntoConvTranspose):
    pass


class _BnGemm(_CheckedBnMixin, _fuse_batchnorm.FuseBatchNormIntoGemm):
    pass


@register_pass("fuse-batchnorm", exact=True)
class FuseBatchNormPass(SlimgraphPass):
    """Fold BatchNormalization into the Conv, ConvTranspose, Gemm or 2-D MatMul before it; exact.

    Conv/ConvTranspose/Gemm use onnxscript's rules (`_fuse_batchnorm`: `W * s` on the output-
    channel axis, `b' = (b - mean) * s + beta`), checked here for training mode and parameter
    shapes. A MatMul with a 2-D input and a constant (K, N) weight followed by BN becomes
    `Gemm(x, W * s, t)`. The BN's output keeps its name.
    """

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> FusionResult:
        fused: dict[str, int] = {}
        rule_set = RewriteRuleSet([_BnConv.rule(), _BnConvTranspose.rule(), _BnGemm.rule()])
        _unshare_layer_params(model)
        count = rule_set.apply_to_model(model)
        if count:
            fused["conv/convtranspose/gemm"] = count
        matmuls = self._fold_into_matmul(model)
        if matmuls:
            fused["matmul"] = matmuls
        # The rewrites create no BatchNormalization: the ones left are the ones not folded.
        skipped = [
            Skipped(_label(n), n.op_type, _bn_skip_reason(n))
            for n in model.graph
            if is_onnx_op(n, "BatchNormalization") and _bn_has_layer_before(n)
        ]
        return _tidy(FusionResult(model, bool(fused), skipped=skipped, fused=fused))

    def _fold_into_matmul(self, model: ir.Model) -> int:
        count = 0
        for bn in list(model.graph):
            if not is_onnx_op(bn, "BatchNormalization") or bn.graph is None:
                continue
            source = bn.inputs[0].producer() if bn.inputs[0] is not None else None
            if source is None or not is_onnx_op(source, "MatMul"):
                continue
            if single_consumer(source.outputs[0]) is not bn or len(bn.outputs) != 1:
                continue
            x, w_value = source.inputs[0], source.inputs[1]
            weight = constant_array(w_value)
            if weight is None or weight.ndim != 2 or x is None or x.shape is None:
                continue
            if len(x.shape) != 2 or _bn_fail(None, bn.outputs[0], weight.shape[1]):
                continue
            gamma, beta, mean, var = (constant_array(v) for v in bn.inputs[1:5])
            eps = bn.attributes.get_float("epsilon", 1e-5)
            scale, shift = batchnorm_affine(gamma, beta, mean, var, eps)  # type: ignore[arg-type]
            graph = bn.graph
            new_w = add_initializer(
                graph, f"{w_value.name}_bn", scale_output_channels(weight, scale, "MatMul")
            )
            new_b = add_initializer(graph, f"{w_value.name}_bn_bias", shift.astype(weight.dtype))
            gemm = ir.node(
                "Gemm", [x, new_w, new_b], name=source.name, doc_string=source.doc_string
            )
            gemm.metadata_props.update(source.metadata_props)
            graph.insert_after(bn, gemm)
            gemm.outputs[0].type = bn.outputs[0].type
            gemm.outputs[0].shape = bn.outputs[0].shape
            replace_output(bn.outputs[0], gemm.outputs[0])
            graph.remove(bn, safe=True)
            graph.remove(source, safe=True)
            count += 1
        return count


def _unshare_layer_params(model: ir.Model) -> None:
    """Give each layer that feeds a BN private copies of weight and bias initializers it shares.

    onnxscript's rules refuse shared initializers (they rewrite them by name); exporters and
    deduplication share e.g. one zero bias among all Convs. Copies share the tensor, not bytes.
    """
    graph = model.graph
    for bn in list(graph):
        if not is_onnx_op(bn, "BatchNormalization") or not _bn_has_layer_before(bn):
            continue
        layer = bn.inputs[0].producer()
        assert layer is not None
        if layer.op_type == "MatMul" or single_consumer(layer.outputs[0]) is not bn:
            continue
        for index in (1, 2):
            value = layer.inputs[index] if index < len(layer.inputs) else None
            if value is None or not value.is_initializer() or value.const_value is None:
                continue
            if value.is_graph_input() or all(use.node is layer for use in value.uses()):
                continue
            copy = add_initializer(graph, f"{value.name}_{layer.name or 'copy'}", value.const_value)
            layer.replace_input_with(index, copy)


def _bn_has_layer_before(bn: ir.Node) -> bool:
    source = bn.inputs[0].producer() if bn.inputs[0] is not None else None
    return source is not None and is_onnx_op(source, "Conv", "ConvTranspose", "Gemm", "MatMul")


def _bn_skip_reason(bn: ir.Node) -> str:
    source = bn.inputs[0].producer()
    assert source is not None
    if single_consumer(bn.inputs[0]) is not bn:
        return f"the {source.op_type} output has other readers or is a graph output"
    if source.op_type == "MatMul":
        return "MatMul is not 2-D with a constant weight"
    channels = _output_channels(source)
    if channels is None:
        return f"the {source.op_type} weight is not a constant initializer"
    return _bn_fail(None, bn.outputs[0], channels) or "weights shared or not initializers"


# ---------------------------------------------------------------- per-channel Mul/Add folding


def _channel_vector(
    const: np.ndarray, rank: int, channel_axis: int, channels: int
) -> np.ndarray | None:
    """`const` as one value per channel if broadcasting it over the output only varies along
    `channel_axis` and does not grow the output's shape; else None."""
    if const.ndim > rank:
        return None
    shape = (1,) * (rank - const.ndim) + const.shape
    for axis, dim in enumerate(shape):
        if axis == channel_axis:
            if dim not in (1, channels):
                return None
        elif dim != 1:
            return None
    flat = const.reshape(-1)
    if flat.size not in (1, channels):
        return None
    return np.broadcast_to(flat, (channels,)).astype(np.float64)


@register_pass("fold-affine", exact=True)
class FoldAffinePass(SlimgraphPass):
    """Fold `Mul`/`Add`/`Sub` by per-channel constants into the Conv, ConvTranspose, Gemm or
    BatchNormalization before them; exact.

    `(W x + b) * k + c = (k W) x + (k b + c)` per output channel. Only constants that vary along
    the channel axis alone (or scalars) and do not broadcast the output to a bigger shape qualify;
    `k - y` (constant on the left of Sub) does not. New weights are new initializers, so weights
    shared with other nodes are never changed.
    """

    exact: ClassVar[bool] = True

    def __init__(self, *, max_rounds: int = 8) -> None:
        super().__init__()
        self.max_rounds = max_rounds

    def call(self, model: ir.Model) -> FusionResult:
        total = 0
        for _ in range(self.max_rounds):
            count = 0
            for node in list(model.graph):
                if node.graph is not None and is_onnx_op(node, "Mul", "Add", "Sub"):
                    count += self._try(node)
            total += count
            if not count:
                break
        fused = {"mul/add": total} if total else {}
        return _tidy(FusionResult(model, bool(total), fused=fused))

    def _try(self, node: ir.Node) -> int:
        for layer_index in (0, 1):
            if node.op_type == "Sub" and layer_index == 1:
                break
            value = node.inputs[layer_index]
            const = constant_array(node.inputs[1 - layer_index])
            if value is None or const is None:
                continue
            layer = value.producer()
            if layer is None or single_consumer(value) is not node or len(layer.outputs) != 1:
                continue
            if not is_onnx_op(layer, "Conv", "ConvTranspose", "Gemm", "BatchNormalization"):
                continue
            if value.dtype not in _FLOAT_TYPES or const.dtype.kind != "f":
                continue
            if self._fold(layer, node, const):
                return 1
        return 0

    def _fold(self, layer: ir.Node, node: ir.Node, const: np.ndarray) -> bool:
        graph = layer.graph
        assert graph is not None
        op = layer.op_type
        if op == "BatchNormalization":
            if layer.inputs[0] is None or layer.inputs[0].shape is None:
                return False
            rank = len(layer.inputs[0].shape)
            gamma = constant_array(layer.inputs[1])
            beta = constant_array(layer.inputs[2])
            if gamma is None or beta is None or rank < 2:
                return False
            if _bn_fail(None, layer.outputs[0], gamma.size):
                return False
            k = _channel_vector(const, rank, 1, gamma.size)
            if k is None:
                return False
            if node.op_type == "Mul":
                gamma, beta = gamma * k, beta * k
            else:
                beta = beta + (k if node.op_type == "Add" else -k)
            dtype = constant_array(layer.inputs[1]).dtype  # type: ignore[union-attr]
            for index, array in ((1, gamma), (2, beta)):
                hint = f"{layer.inputs[index].name}_k"
                layer.replace_input_with(index, add_initializer(graph, hint, array.astype(dtype)))
        else:
            weight = constant_array(layer.inputs[1])
            channels = _output_channels(layer)
            if weight is None or channels is None:
                return False
            bias_value = layer.inputs[2] if len(layer.inputs) > 2 else None
            bias = constant_array(bias_value) if bias_value is not None else None
            if bias_value is not None and bias is None:
                return False
            rank = 2 if op == "Gemm" else weight.ndim
            k = _channel_vector(const, rank, 1, channels)
            if k is None:
                return False
            attrs = layer.attributes
            if op == "Gemm":
                beta_attr = attrs.get_float("beta", 1.0)
                bias64 = np.zeros(channels) if bias is None else bias.astype(np.float64) * beta_attr
                if bias is not None:
                    try:
                        np.broadcast_shapes(bias64.shape, (1, channels))
                    except ValueError:
                        return False
            else:
                bias64 = np.zeros(channels) if bias is None else bias.astype(np.float64)
            if node.op_type == "Mul":
                group = attrs.get_int("group", 1)
                trans_b = bool(attrs.get_int("transB", 0))
                new_weight = scale_output_channels(weight, k, op, group=group, trans_b=trans_b)
                bias64 = bias64 * k
            else:
                new_weight = weight
                bias64 = bias64 + (k if node.op_type == "Add" else -k)
            w_name = layer.inputs[1].name or "weight"
            if new_weight is not weight:
                layer.replace_input_with(1, add_initializer(graph, f"{w_name}_k", new_weight))
            new_bias = add_initializer(graph, f"{w_name}_bias_k", bias64.astype(weight.dtype))
            if len(layer.inputs) > 2:
                layer.replace_input_with(2, new_bias)
            else:
                layer.resize_inputs(3)
                layer.replace_input_with(2, new_bias)
            if op == "Gemm" and "beta" in attrs:
                del attrs["beta"]
        out = node.outputs[0]
        layer.outputs[0].shape = out.shape
        replace_output(out, layer.outputs[0])
        graph.remove(node, safe=True)
        return True


# ---------------------------------------------------------------- standalone BatchNorm


@register_pass("batchnorm-to-affine", exact=True)
class BatchNormToAffinePass(SlimgraphPass):
    """Turn a BatchNormalization with nothing to fold into into `Mul(x, s) + t`; exact.

    `s = gamma / sqrt(var + eps)`, `t = beta - mean * s`, shaped `(C, 1, ...)` to broadcast over
    the input's spatial axes; needs the input's rank (skipped, with the reason, when unknown).
    Quantizers handle Mul/Add; they do not handle a bare BatchNormalization.

    Args:
        form: "mul-add" (default), or "conv": one depthwise 1x1 Conv (`group=C`, weight `s`,
            bias `t`) for inputs with spatial axes (rank >= 3).
    """

    exact: ClassVar[bool] = True

    def __init__(self, *, form: str = "mul-add") -> None:
        super().__init__()
        if form not in ("mul-add", "conv"):
            raise ValueError(f"form must be 'mul-add' or 'conv', got {form!r}")
        self.form = form

    def call(self, model: ir.Model) -> FusionResult:
        skipped: list[Skipped] = []
        count = 0
        for bn in list(model.graph):
            if not is_onnx_op(bn, "BatchNormalization"):
                continue
            gamma = constant_array(bn.inputs[1])
            if gamma is None:
                skipped.append(Skipped(_label(bn), bn.op_type, "parameters not constant"))
                continue
            reason = _bn_fail(None, bn.outputs[0], gamma.size)
            if reason is None and any(
                o.uses() or o.is_graph_output() for o in bn.outputs[1:]
            ):
                reason = "its running statistics outputs are used"
            x = bn.inputs[0]
            if reason is None and (x is None or x.shape is None or len(x.shape) < 2):
                reason = "input rank unknown"
            rank = len(x.shape) if x is not None and x.shape is not None else 0
            if reason is None and self.form == "conv" and rank < 3:
                reason = "a depthwise Conv needs spatial axes"
            if reason:
                skipped.append(Skipped(_label(bn), bn.op_type, reason))
                continue
            assert x is not None and x.shape is not None
            scale, shift = batchnorm_affine(
                *(constant_array(v) for v in bn.inputs[1:5]),  # type: ignore[arg-type]
                bn.attributes.get_float("epsilon", 1e-5),
            )
            shape = (gamma.size,) + (1,) * (len(x.shape) - 2)
            graph = bn.graph
            assert graph is not None
            base = bn.inputs[1].name or "bn"
            if self.form == "conv":
                kernel = (gamma.size, 1) + (1,) * (len(x.shape) - 2)
                w = add_initializer(graph, f"{base}_dw", scale.reshape(kernel).astype(gamma.dtype))
                b = add_initializer(graph, f"{base}_dw_bias", shift.astype(gamma.dtype))
                new_nodes = [ir.node("Conv", [x, w, b], attributes={"group": gamma.size})]
            else:
                s_array = scale.reshape(shape).astype(gamma.dtype)
                t_array = shift.reshape(shape).astype(gamma.dtype)
                s = add_initializer(graph, f"{base}_scale", s_array)
                t = add_initializer(graph, f"{base}_shift", t_array)
                mul = ir.node("Mul", [x, s], name=f"{bn.name}_mul" if bn.name else None)
                mul.outputs[0].type = x.type
                mul.outputs[0].shape = x.shape
                new_nodes = [mul, ir.node("Add", [mul.outputs[0], t])]
            new_nodes[-1].name = bn.name
            for new in new_nodes:
                new.metadata_props.update(bn.metadata_props)
            new_nodes[-1].outputs[0].type = bn.outputs[0].type
            new_nodes[-1].outputs[0].shape = bn.outputs[0].shape
            graph.insert_after(bn, new_nodes)
            replace_output(bn.outputs[0], new_nodes[-1].outputs[0])
            graph.remove(bn, safe=True)
            count += 1
        fused = {"batchnorm": count} if count else {}
        return _tidy(FusionResult(model, bool(count), skipped=skipped, fused=fused))


# ---------------------------------------------------------------- Pad into Conv


@register_pass("fuse-pad", exact=True)
class FusePadPass(SlimgraphPass):
    """Fold a constant-zero Pad of the spatial axes into the Conv that reads it; exact.

    Handles Pad before opset 11 (`pads`/`value` attributes) and after (inputs, `axes` from opset
    18). The Conv must have `auto_pad` NOTSET; its pads become the sum. Negative pads (crops),
    padded batch/channel axes, and reflect/edge modes are left alone.
    """

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> FusionResult:
        count = 0
        skipped: list[Skipped] = []
        for pad in list(model.graph):
            if not is_onnx_op(pad, "Pad") or pad.graph is None:
                continue
            conv = single_consumer(pad.outputs[0])
            if conv is None or not is_onnx_op(conv, "Conv") or conv.inputs[0] is not pad.outputs[0]:
                continue
            reason = self._fold(pad, conv)
            if reason:
                skipped.append(Skipped(_label(pad), "Pad", reason))
            else:
                count += 1
        fused = {"pad": count} if count else {}
        return _tidy(FusionResult(model, bool(count), skipped=skipped, fused=fused))

    def _fold(self, pad: ir.Node, conv: ir.Node) -> str | None:
        if pad.attributes.get_string("mode", "constant") != "constant":
            return "mode is not constant"
        if conv.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
            return "the Conv uses auto_pad"
        weight = conv.inputs[1]
        if weight is None or weight.shape is None:
            return "the Conv weight's rank is unknown"
        rank = len(weight.shape)
        axes = None
        if "pads" in pad.attributes:  # opset < 11
            pads = list(pad.attributes.get_ints("pads"))
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
        spatial = pad_to_conv_pads(pads, axes, rank)
        if spatial is None:
            return "pads touch the batch/channel axes, crop, or do not fit the rank"
        old = list(conv.attributes.get_ints("pads", [0] * len(spatial)))
        summed = [a + b for a, b in zip(old, spatial, strict=True)]
        conv.attributes["pads"] = ir.AttrInt64s("pads", summed)
        conv.replace_input_with(0, pad.inputs[0])
        pad.graph.remove(pad, safe=True)  # type: ignore[union-attr]
        return None


# ---------------------------------------------------------------- Sum -> Add, MatMul+Add -> Gemm


@register_pass("sum-to-add", exact=True)
class SumToAddPass(SlimgraphPass):
    """Sum with two inputs becomes Add; Sum with one input is removed; exact."""

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> FusionResult:
        count = 0
        for node in list(model.graph):
            if not is_onnx_op(node, "Sum") or node.graph is None:
                continue
            inputs = [v for v in node.inputs if v is not None]
            if len(inputs) == 1:
                bypass(node, inputs[0])
            elif len(inputs) == 2:
                add = ir.node("Add", inputs, name=node.name, doc_string=node.doc_string)
                add.metadata_props.update(node.metadata_props)
                add.outputs[0].type = node.outputs[0].type
                add.outputs[0].shape = node.outputs[0].shape
                node.graph.insert_after(node, add)
                replace_output(node.outputs[0], add.outputs[0])
                node.graph.remove(node, safe=True)
            else:
                continue
            count += 1
        fused = {"sum": count} if count else {}
        return _tidy(FusionResult(model, bool(count), fused=fused))


class _CheckedGemmMixin:
    """Gemm needs C unidirectionally broadcastable to (M, N) and a float type; the Gemm keeps the
    MatMul's name and metadata."""

    def check(  # type: ignore[no-untyped-def]
        self, context, input_a, input_b, input_c=None, **kwargs
    ) -> MatchResult:
        result = super().check(context, input_a, input_b, **kwargs)  # type: ignore[misc]
        if not result:
            return result
        self._matmul = next((n for n in context.nodes if n.op_type == "MatMul"), None)
        if input_a.dtype not in _FLOAT_TYPES:
            return result.fail("not a float MatMul")
        if input_c is None or input_c.shape is None or input_c.dtype != input_a.dtype:
            return result.fail("the bias's shape or type is unknown")
        if len(input_c.shape) > 2:
            return result.fail("the bias has rank > 2 (the Add broadcasts the output)")
        if self._matmul is None or input_c is self._matmul.outputs[0] or any(
            input_c is node.outputs[0] for node in context.nodes
        ):
            return result.fail("the bias is the MatMul's own output (Add(m, m))")
        if input_a.shape is None or input_b.shape is None:
            return result.fail("the MatMul's input shapes are unknown")
        rows = input_a.shape[1 if self.trans_a else 0]  # type: ignore[attr-defined]
        cols = input_b.shape[0 if self.trans_b else 1]  # type: ignore[attr-defined]
        c_dims = (1,) * (2 - len(input_c.shape)) + tuple(input_c.shape)
        for c_dim, o_dim in zip(c_dims, (rows, cols), strict=True):
            if c_dim != 1 and c_dim != o_dim:
                # Gemm's output is the MatMul's (M, N): a bias that grows it cannot move inside.
                return result.fail("the bias does not broadcast to the MatMul's output (M, N)")
        return result


    def rewrite(self, op, *args, **kwargs):  # type: ignore[no-untyped-def]
        value = super().rewrite(op, *args, **kwargs)  # type: ignore[misc]
        gemm, matmul = value.producer(), getattr(self, "_matmul", None)
        if gemm is not None and matmul is not None:
            gemm.name = matmul.name
            gemm.metadata_props.update(matmul.metadata_props)
        return value


def _gemm_rules() -> list[Any]:
    rules = []
    for base in (
        _matmul_add_to_gemm.TransABMatMulAddToGemm,
        _matmul_add_to_gemm.TransAMatMulAddToGemm,
        _matmul_add_to_gemm.TransBMatMulAddToGemm,
        _matmul_add_to_gemm.MatMulAddToGemm,
    ):
        checked = type(f"Checked{base.__name__}", (_CheckedGemmMixin, base), {})
        rules.extend(checked.rule().commute())
    return rules


@register_pass("matmul-add-to-gemm", exact=True)
class MatMulAddToGemmPass(SlimgraphPass):
    """Add(MatMul(a, b), c) with 2-D a and b becomes Gemm(a, b, c); exact.

    onnxscript's rules (also with a Transpose on a or b), both operand orders of the Add, plus
    checks that c broadcasts to the MatMul's (M, N) output (Gemm cannot grow its output).
    """

    exact: ClassVar[bool] = True

    def call(self, model: ir.Model) -> FusionResult:
        count = RewriteRuleSet(_gemm_rules()).apply_to_model(model)
        fused = {"matmul+add": count} if count else {}
        return _tidy(FusionResult(model, bool(count), fused=fused))


# ---------------------------------------------------------------- activation units

_UNIT_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_UNIT_ACTIVATIONS = ("Relu", "Clip", "HardSwish")


@register_pass("mark-units", exact=True, metadata_only=True)
class MarkUnitsPass(SlimgraphPass):
    """Record Conv/ConvTranspose/Gemm/MatMul followed by Relu, Clip or HardSwish as one unit.

    Both nodes get metadata `pkg.slimgraph.unit` = the layer's name (quantization then quantizes
    after the activation, not between). Only metadata changes: exact, nothing to verify.
    """

    exact: ClassVar[bool] = True
    annotates_only: ClassVar[bool] = True

    def call(self, model: ir.Model) -> FusionResult:
        count = 0
        for index, layer in enumerate(model.graph):
            if not is_onnx_op(layer, *_UNIT_LAYERS) or len(layer.outputs) != 1:
                continue
            activation = single_consumer(layer.outputs[0])
            if activation is None or not is_onnx_op(activation, *_UNIT_ACTIVATIONS):
                continue
            unit = layer.name or f"{layer.op_type}_{index}"
            if not layer.name:
                layer.name = unit
            changed = False
            for node in (layer, activation):
                if node.metadata_props.get(metadata.UNIT) != unit:
                    node.metadata_props[metadata.UNIT] = unit
                    changed = True
            count += changed
        fused = {"units": count} if count else {}
        return FusionResult(model, bool(count), fused=fused)
