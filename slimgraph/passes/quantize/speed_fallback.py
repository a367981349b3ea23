"""Static int8 only where it runs faster: layers whose int8 form is measured slower stay float.

onnxruntime's int8 kernels beat its float ones on large convolutions and GEMMs; on tiny or
depthwise convolutions the quantize/requantize work around the op costs more than the op
saves, and a static int8 model can be slower than its float input. Before writing, static
quantization times each kind of layer it quantizes, once per shape class (op type, weight shape,
attributes, input shape at the batch timed) however many layers share it, as two one-node
models side by side on onnxruntime (`runtime.speed_guard.speed_check`: interleaved rounds,
medians, a 90% paired bootstrap interval, slower only beyond noise in two measurements):

- *float in an int8 neighbourhood*: x -> QuantizeLinear -> DequantizeLinear -> op (float
  weight) -> QuantizeLinear -> DequantizeLinear, what the layer costs when it stays float
  between quantized neighbours (its input dequantized, its output quantized again);
- *int8*: the same with the weight int8 per channel behind a DequantizeLinear, which
  onnxruntime fuses into one integer op (QLinearConv, QLinearMatMul).

A class whose int8 form is slower beyond noise keeps all its layers float. The cost is bounded:
`BUDGET_S` seconds of timing (`CLASS_S` per class when that is more, at most `MAX_BUDGET_S`)
shared equally by at most `MAX_CLASSES` shape classes, the likely slow ones first (grouped and
depthwise convolutions, then the fewest MACs per layer: large layers are where int8 wins);
classes past the budget stay int8, which the report says. (The budget used to be split over
at most 12 classes while each took about a second: an EfficientNet-style net with 37 classes
had 5 to 9 timed and most of its layers left untimed.) The timing is
skipped, like the speed guard, when `SLIMGRAPH_NO_SPEED_CHECK` is set.

Also here: `dynamic_note`, what `slimgraph quantize` says when it chooses dynamic int8 for a
model whose MACs are mostly in convolutions (dynamic int8 leaves them float).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from slimgraph.ir import analysis as ir_analysis
from slimgraph.ir import display_name
from slimgraph.ir._dims import mac_dims
from slimgraph.passes.quantize.policy import default_activation_dtype
from slimgraph.runtime.speed_guard import skipped_by_environment, speed_check

__all__ = ["BUDGET_S", "CLASS_S", "MAX_BUDGET_S", "MAX_CLASSES", "FallbackLayer", "SpeedFallback",
           "dynamic_note", "slow_layers"]

logger = logging.getLogger(__name__)

# Seconds of timing for all shape classes together (at least; it grows by `CLASS_S` per class
# past 20 up to `MAX_BUDGET_S`), and the most classes timed. Each class gets an equal share of
# the budget: a class costs `speed_check`'s minimum rounds (about 0.15 s for small layers) however
# small its share, so the 32 classes of an EfficientNet-B0-style net take about 10 s.
BUDGET_S = 6.0
CLASS_S = 0.3
MAX_BUDGET_S = 12.0
MAX_CLASSES = 60
# The ops timed (the ones whose int8 form onnxruntime fuses into one integer op).
_TIMED = ("Conv", "MatMul", "Gemm")
# `dynamic_note` speaks when convolutions hold more than this share of the MACs.
_CONV_SHARE = 0.5


@dataclass(frozen=True)
class FallbackLayer:
    """One timed shape class: its nodes (and their layer names), int8 / float latency and
    whether they stay float."""

    nodes: tuple[str, ...]
    layers: tuple[str, ...]
    op_type: str
    shape: str
    ratio: float
    low: float
    high: float
    kept_float: bool


@dataclass
class SpeedFallback:
    """What the speed fallback measured (`quantized.meta[SPEED_FALLBACK]`).

    Attributes:
        batch: the batch the layers were timed at.
        classes: one `FallbackLayer` per shape class timed.
        untimed: layers left int8 untimed (past the budget or the class limit).
        seconds: time spent.
        skipped: why nothing was timed (None when it was).
    """

    batch: int = 1
    classes: list[FallbackLayer] = field(default_factory=list)
    untimed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None

    @property
    def kept_float(self) -> list[str]:
        """Node names left float."""
        return [name for c in self.classes if c.kept_float for name in c.nodes]

    def summary(self) -> str:
        if self.skipped is not None:
            return f"speed fallback: not measured ({self.skipped})"
        slow = [c for c in self.classes if c.kept_float]
        text = (f"speed fallback: {len(self.classes)} layer shape(s) timed at batch "
                f"{self.batch} in {self.seconds:.1f} s, {len(self.kept_float)} layer(s) kept "
                "float where int8 ran slower")
        for c in slow:
            text += (f"\n  {c.op_type} {c.shape} ({', '.join(c.layers[:3])}"
                     f"{', ...' if len(c.layers) > 3 else ''}): int8 {c.ratio:.2f}x of float "
                     f"({c.low:.2f}-{c.high:.2f})")
        if self.untimed:
            text += f"\n  {len(self.untimed)} layer(s) not timed (budget), left int8"
        return text

    def to_dict(self) -> dict[str, object]:
        return {"batch": self.batch, "seconds": self.seconds, "skipped": self.skipped,
                "kept_float": self.kept_float, "untimed": list(self.untimed),
                "classes": [{"nodes": list(c.nodes), "layers": list(c.layers),
                             "op": c.op_type, "shape": c.shape, "int8_ratio": c.ratio,
                             "low": c.low, "high": c.high, "kept_float": c.kept_float}
                            for c in self.classes]}  # fmt: skip


def slow_layers(
    prepared: ir.Model,
    nodes: Sequence[str],
    *,
    batch: int = 1,
    activation_dtype: str = "auto",
    budget_s: float = BUDGET_S,
) -> SpeedFallback:
    """Time the layers `nodes` of `prepared` (the float model static quantization plans on) per
    shape class as described in the module docstring; returns which to leave float.

    Args:
        prepared: the prepared float model (constants folded, shapes inferable).
        nodes: names of the nodes static quantization would quantize.
        batch: the batch size the layers are timed at.
        activation_dtype: the activations' integer type: "uint8", "int8" or "auto" (uint8 on
            x86, `policy.default_activation_dtype`).
        budget_s: seconds of timing over all classes (grown to `CLASS_S` per class up to
            `MAX_BUDGET_S` when that is more).
    """
    start = time.perf_counter()
    if skipped_by_environment():
        return SpeedFallback(batch, skipped="SLIMGRAPH_NO_SPEED_CHECK is set")
    wanted = set(nodes)
    act = {"uint8": ir.DataType.UINT8, "int8": ir.DataType.INT8}.get(
        activation_dtype, default_activation_dtype())
    dims = {**mac_dims(prepared), **{name: batch for name in _batch_dims(prepared)}}
    try:
        shaped = ir_analysis.with_static_shapes(prepared, dims)
    except ir_analysis.NegativeSizeError as error:  # no example sizes recorded: time nothing
        return SpeedFallback(batch, skipped=f"layer shapes unknown ({error})")
    macs, _ = ir_analysis.macs_by_node(prepared, dims)
    classes: dict[tuple, list[tuple[ir.Node, ir.Node]]] = {}
    for original, copy in zip(prepared.graph, shaped.graph, strict=True):
        if original.name not in wanted or original.op_type not in _TIMED or original.domain:
            continue
        key = _shape_class(original, copy)
        if key is not None:
            classes.setdefault(key, []).append((original, copy))
    # the suspects first: grouped (depthwise) layers, then the fewest MACs per layer (the int8
    # kernels win on large layers; small ones pay the quantization around them)
    order = sorted(classes.items(), key=lambda item: (
        _group(item[1][0][0]) == 1, macs.get(item[1][0][0], 0)))
    result = SpeedFallback(batch)
    count = max(1, min(len(order), MAX_CLASSES))
    budget_s = max(budget_s, min(MAX_BUDGET_S, CLASS_S * count))
    share = budget_s / count
    timing_start = time.perf_counter()  # the budget counts timing, not the shape analysis
    for index, (key, members) in enumerate(order):
        names = tuple(node.name or "" for node, _ in members)
        if index >= MAX_CLASSES or time.perf_counter() - timing_start > budget_s:
            result.untimed += names
            continue
        pair = _one_node_models(*members[0], act)
        if pair is None:
            continue
        check = speed_check(*pair, budget_s=share)
        timing = check.batches[0]
        result.classes.append(FallbackLayer(
            names, tuple(display_name(node) for node, _ in members), key[0], key[-1],
            timing.ratio, timing.low, timing.high, check.slower))  # fmt: skip
    result.seconds = time.perf_counter() - start
    logger.info("%s", result.summary())
    return result


def _group(node: ir.Node) -> int:
    group = node.attributes.get("group")
    return 1 if group is None else int(group.value)


def _batch_dims(model: ir.Model) -> list[str]:
    """Names of the symbolic leading dimensions of the graph's inputs."""
    return [str(v.shape[0]) for v in model.graph.inputs
            if v.shape is not None and len(v.shape) and not isinstance(v.shape[0], int)]


def _shape_class(original: ir.Node, node: ir.Node) -> tuple | None:
    """(op type, attributes, weight shape, input shape, text) of a node with a constant weight
    (in `original`) and static shapes (in `node`, its copy in the shaped weightless model);
    None otherwise."""
    if len(node.inputs) < 2 or node.inputs[0] is None or original.inputs[1] is None:
        return None
    x, w = node.inputs[0], original.inputs[1]
    if x.shape is None or not x.shape.is_static() or w.const_value is None:
        return None
    shape = tuple(int(d) for d in x.shape)  # type: ignore[arg-type]
    weight = tuple(w.const_value.shape)
    attrs = tuple(sorted((k, str(a.value)) for k, a in node.attributes.items()))
    group = node.attributes.get("group")
    text = f"x{list(shape)} w{list(weight)}" + (
        f" group {group.value}" if group is not None and group.value != 1 else "")
    return (node.op_type, attrs, weight, shape, text)


def _one_node_models(
    original: ir.Node, node: ir.Node, activation_dtype: ir.DataType
) -> tuple[ir.Model, ir.Model] | None:
    """The layer alone (its weight from `original`, shapes from `node`, its shaped copy), float
    between Q/DQ pairs and int8 (weight DequantizeLinear)."""
    x, w = node.inputs[0], original.inputs[1]
    assert x is not None and w is not None and w.const_value is not None and x.shape is not None
    weight = w.const_value.numpy().astype(np.float32)
    if node.op_type == "Gemm" and any(k in node.attributes for k in ("transA",)):
        return None
    if node.op_type == "Gemm" and node.attributes.get("transB") is not None and (
            node.attributes["transB"].value):  # fmt: skip
        axis = 0
    else:
        axis = 1 if node.op_type in ("MatMul", "Gemm") else 0
    if weight.ndim != 2 and node.op_type != "Conv":
        return None
    x_shape = [int(d) for d in x.shape]  # type: ignore[arg-type]
    y = node.outputs[0]
    if y.shape is None or not y.shape.is_static():
        return None
    y_shape = [int(d) for d in y.shape]  # type: ignore[arg-type]
    attributes = {k: a.value for k, a in node.attributes.items()}
    act = TensorProto.UINT8 if activation_dtype == ir.DataType.UINT8 else TensorProto.INT8
    zero = 128 if act == TensorProto.UINT8 else 0
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    w_scale = (np.abs(weight).max(axis=reduce) / 127).astype(np.float32) + np.float32(1e-8)
    shape = [1] * weight.ndim
    shape[axis] = -1
    w_int8 = np.clip(np.round(weight / w_scale.reshape(shape)), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s_x"),
        numpy_helper.from_array(np.array(zero, np.uint8 if zero else np.int8), "z_x"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s_y"),
        numpy_helper.from_array(np.array(zero, np.uint8 if zero else np.int8), "z_y"),
    ]
    head = [helper.make_node("QuantizeLinear", ["x", "s_x", "z_x"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s_x", "z_x"], ["xd"])]
    tail = [helper.make_node("QuantizeLinear", ["y", "s_y", "z_y"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "s_y", "z_y"], ["out"])]
    op = helper.make_node(node.op_type, ["xd", "w"], ["y"], **attributes)
    forms = []
    for int8 in (False, True):
        weights = [numpy_helper.from_array(weight, "w")] if not int8 else [
            numpy_helper.from_array(w_int8, "w_q"),
            numpy_helper.from_array(w_scale, "s_w"),
            numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), "z_w")]
        dq = [helper.make_node("DequantizeLinear", ["w_q", "s_w", "z_w"], ["w"], axis=axis)
              ] if int8 else []  # fmt: skip
        graph = helper.make_graph(
            [*head, *dq, op, *tail], node.op_type,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, y_shape)],
            [*inits, *weights])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as error:
            logger.info("speed fallback: %s not timed (%s)", node.name, error)
            return None
        forms.append(ir.from_proto(proto))
    return forms[0], forms[1]


def dynamic_note(model: ir.Model) -> str | None:
    """What to say when dynamic int8 is chosen (no calibration data) for a model whose MACs are
    mostly convolutions, which dynamic int8 leaves float; None otherwise. MACs are counted at
    the export's example sizes (`mac_dims`): at 1 sample an audio model's attention is nothing."""
    macs, _ = ir_analysis.macs_by_node(model, mac_dims(model))
    total = sum(macs.values())
    conv = sum(m for node, m in macs.items() if node.op_type in ("Conv", "ConvTranspose"))
    if not total or conv / total <= _CONV_SHARE:
        return None
    return (f"note: {conv / total:.0%} of the MACs are convolutions, which dynamic int8 leaves "
            "float (onnxruntime's ConvInteger runs slower than its float Conv): it changes "
            "little here; static int8 quantizes them: --calib DATA.npz, or --zero-shot "
            "(calibrated from the model's BatchNorm statistics, no data)")
