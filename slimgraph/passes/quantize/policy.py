"""Quantization policy: decide WHAT to quantize and how, before anything is inserted.

As in PT2E, deciding is separate from rewriting: `annotate` reads the float graph and returns a
`QuantPlan` of frozen annotations (value, dtype, symmetric or not, per-tensor or per-channel axis,
shared-with); `qdq.materialize` later inserts QuantizeLinear/DequantizeLinear from the plan and the
calibrated ranges. The placement rules follow what makes the result accurate and what onnxruntime
fuses into integer kernels:

- Conv/ConvTranspose/Gemm/MatMul with a constant weight are quantized: weights int8 symmetric,
  per-channel on the output-channel axis (Conv 0, ConvTranspose 1, Gemm 0 with transB else 1,
  MatMul 1); biases int32 with scale s_input * s_weight (onnxruntime's QLinearConv/QGemm need it);
- activations uint8 asymmetric by default: on x86 onnxruntime's U8S8 kernels are fast and S8S8
  falls back to slow paths (measured here, batch 8, latency vs fp32, U8S8 / S8S8: ResNet-18-style
  224px 0.30x / 1.05x, MobileNetV2-style 0.55x / 1.03x, BERT-style 6x384 0.49x / 0.69x);
- a Relu/Clip that is the only consumer of a quantized op's output is absorbed: the value after
  it is quantized (onnxruntime drops the Relu in front of a QuantizeLinear with zero point qmin);
- Concat inputs and output share one scale; data-movement ops keep their input's scale;
- a residual Add of two quantized values is quantized (onnxruntime fuses it to QLinearAdd), any
  other Add stays float;
- a Sigmoid of a quantized value and a Mul of two, on values computed from a quantized
  convolution's output, are quantized with uint8 activations (QLinearSigmoid, QLinearMul; a
  transformer's gated MLP stays float, and so do they with int8 activations, which onnxruntime
  left unfused on x86): SiLU (x * sigmoid(x)) and squeeze-excitation gates then stay in the integer
  domain between quantized convolutions instead of paying a DequantizeLinear/QuantizeLinear pair
  each (EfficientNet-style net, one thread: 1.23x -> 0.85x fp32 at batch 32, with the pooling
  rule below; onnxruntime's quantize_static 0.88x);
- pooling (AveragePool, GlobalAveragePool, and a ReduceMean over all spatial axes with keepdims,
  which `qdq.QDQPass` writes as the GlobalAveragePool it is: onnxruntime has no integer
  ReduceMean) of a quantized value is quantized when a quantized node reads its output;
- masks, Where, comparisons, Softmax, normalizations, Erf/Gelu and every op not listed stay
  float, unless asked (`include_ops`: the op's float inputs and output get Q/DQ; "MatMul" there
  also quantizes MatMuls of two activations, the attention products; onnxruntime fuses a
  quantized Softmax into QLinearSoftmax);
- embedding tables (Gather from a constant 2-D table) are stored int8 with one scale, the
  DequantizeLinear after the Gather (only the gathered rows are dequantized);
- a tied weight gets one quantized copy; nodes are excluded by name/layer/output pattern or type.
"""

from __future__ import annotations

import fnmatch
import logging
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from slimgraph.errors import BadOptionError
from slimgraph.ir import layer_name
from slimgraph.ir.select import matching_pattern
from slimgraph.passes._kit import layout
from slimgraph.passes.base import Skipped
from slimgraph.passes.quantize.options import ActivationDtype
from slimgraph.runtime.quant_math import QuantSpec

__all__ = [
    "QuantSpec",
    "ActivationAnnotation",
    "WeightAnnotation",
    "BiasAnnotation",
    "QuantPlan",
    "annotate",
    "default_activation_dtype",
    "WEIGHT_OPS",
    "DATA_MOVEMENT_OPS",
    "ELEMENTWISE_OPS",
    "is_global_mean",
]

logger = logging.getLogger(__name__)

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that only move or select values: their output keeps the input's scale and zero point.
DATA_MOVEMENT_OPS = (
    "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather",
    "Resize", "Identity", "DepthToSpace", "SpaceToDepth",
)
# Ops onnxruntime runs on int8 with their own output scale (QLinearAveragePool, ...).
POOLING_OPS = ("AveragePool", "GlobalAveragePool")
# Element-wise ops onnxruntime runs on uint8/int8 when Q/DQ surround them (QLinearSigmoid, a
# table lookup; QLinearMul, broadcasting): quantized when their activation inputs already are.
ELEMENTWISE_OPS = ("Sigmoid", "Mul")
# Everything the default rules may quantize.
_STANDARD_OPS = WEIGHT_OPS + ("Add", "Concat") + DATA_MOVEMENT_OPS + POOLING_OPS + ELEMENTWISE_OPS
# Quantized by default only when a dataflow rule holds; include_ops asks for all of them.
_CONDITIONAL_OPS = ("MatMul", "Add") + ELEMENTWISE_OPS
_ABSORBED = ("Relu", "Clip")
_INT8 = ir.DataType.INT8
_UINT8 = ir.DataType.UINT8
_INT32 = ir.DataType.INT32


@dataclass(frozen=True)
class ActivationAnnotation:
    """An activation (or graph input) to quantize; `shared_with` names its scale group's root."""

    value: str
    spec: QuantSpec
    node: str  # the node that produces it (or, for graph inputs, the first quantized consumer)
    layer: str
    op_type: str
    shared_with: str
    # Produced by a float op (or a graph input): only quantized consumers read the Q/DQ copy,
    # float consumers (a residual branch, say) keep the exact value.
    float_producer: bool = False


@dataclass(frozen=True)
class WeightAnnotation:
    """A constant weight, quantized once however many nodes read it."""

    value: str
    spec: QuantSpec
    uses: tuple[tuple[str, int], ...]  # (node name, input index)
    node: str
    layer: str
    op_type: str


@dataclass(frozen=True)
class BiasAnnotation:
    """A bias stored as int32 with scale s_input * s_weight (zero point 0)."""

    value: str
    node: str
    index: int
    activation: str
    weight: str
    spec: QuantSpec = QuantSpec(_INT32, True)


@dataclass(frozen=True)
class QuantPlan:
    """Everything `materialize` needs besides calibrated ranges."""

    activations: tuple[ActivationAnnotation, ...]
    weights: tuple[WeightAnnotation, ...]
    biases: tuple[BiasAnnotation, ...]
    nodes: tuple[str, ...]
    skipped: tuple[Skipped, ...] = field(default=())

    def groups(self) -> dict[str, list[str]]:
        """Scale groups: root value -> its member values (calibrated ranges are merged)."""
        groups: dict[str, list[str]] = {}
        for annotation in self.activations:
            groups.setdefault(annotation.shared_with, []).append(annotation.value)
        return groups


def default_activation_dtype() -> ir.DataType:
    """uint8 on x86 (onnxruntime's fast U8S8 kernels), int8 elsewhere (ARM's S8S8 dot kernels)."""
    machine = platform.machine().lower()
    return _UINT8 if machine in ("x86_64", "amd64", "i386", "i686", "x86") else _INT8


def annotate(
    model: ir.Model,
    *,
    per_channel: bool = True,
    exclude: Sequence[str] = (),
    exclude_ops: Sequence[str] = (),
    activation_dtype: ActivationDtype = "auto",
    include_ops: Sequence[str] = (),
) -> QuantPlan:
    """Decide what to quantize in `model` (not modified).

    Args:
        model: a float model with BatchNorm already folded and constants as initializers.
        per_channel: per-channel weight scales (else one scale per weight).
        exclude: fnmatch patterns; a node whose name, torch layer or output name matches is float.
        exclude_ops: op types to leave float.
        activation_dtype: "uint8", "int8" or "auto" (`default_activation_dtype`).
        include_ops: op types left float by default to quantize anyway (Softmax, Where, Add,
            LayerNormalization, ...: Q/DQ on their float inputs and output; MatMul: also the
            MatMuls of two activations). Usually less accurate: the report says by how much.
    """
    act_dtype = {"uint8": _UINT8, "int8": _INT8}.get(activation_dtype)
    if activation_dtype == "auto":
        act_dtype = default_activation_dtype()
    if act_dtype is None:
        raise BadOptionError(
            f"unknown activation dtype '{activation_dtype}' (choose auto, uint8 or int8)"
        )
    already = sorted((set(include_ops) & set(_STANDARD_OPS)) - set(_CONDITIONAL_OPS))
    if already:
        raise BadOptionError(
            f"--include-op {', '.join(already)}: quantized by default already (include-op asks "
            "for ops left float: Softmax, Where, LayerNormalization, Mul, ...)"
        )
    present = {node.op_type for node in model.graph}
    absent = sorted(set(include_ops) - present)
    if absent:
        raise BadOptionError(f"--include-op {', '.join(absent)}: the model has no such node")
    return _Planner(model, per_channel, list(exclude), set(exclude_ops), act_dtype,
                    set(include_ops)).plan()


class _Planner:
    def __init__(
        self,
        model: ir.Model,
        per_channel: bool,
        exclude: list[str],
        exclude_ops: set[str],
        act_dtype: ir.DataType,
        include_ops: set[str],
    ) -> None:
        self.graph = model.graph
        self.per_channel = per_channel
        self.exclude = exclude
        self.exclude_ops = exclude_ops
        self.act_spec = QuantSpec(act_dtype, symmetric=False)
        # onnxruntime's x86 QDQ fusions of Sigmoid/Mul were measured with uint8 activations; with
        # int8 ones it left them (and the convolutions) unfused here, so the rule would only add
        # Q/DQ pairs
        self.elementwise = act_dtype == _UINT8
        self.include_ops = include_ops
        self.activation_matmul = "MatMul" in include_ops
        self.generic: set[int] = set()  # id(node): quantized because the user asked for its type
        self.skipped: list[Skipped] = []
        self.quantized: dict[int, ir.Node] = {}  # id(node) -> node
        self.absorbed: dict[int, ir.Node] = {}  # id(quantized node) -> its absorbed Relu/Clip
        self.parent: dict[str, str] = {}  # union-find of shared scales, by value name
        self.embeddings: list[ir.Node] = []  # Gathers from constant tables, stored int8
        # id(value): quantized values computed from a quantized convolution's output (the
        # feature maps the element-wise rule applies to; a transformer's MatMuls are not)
        self.conv_values: set[int] = set()
        self.pooled_means: set[int] = set()  # id(node): ReduceMeans quantized as pooling

    # --- helpers -------------------------------------------------------------------------
    def _excluded(self, node: ir.Node) -> bool:
        """Excluded by op type, by the shared name rule (layer or node name, `ir.select`), or by
        the name of a tensor it outputs (the report prints tensor names too)."""
        if node.op_type in self.exclude_ops:
            return True
        if matching_pattern(node, self.exclude) is not None:
            return True
        outputs = [v.name for v in node.outputs if v.name]
        return any(fnmatch.fnmatchcase(n, p) for p in self.exclude for n in outputs)

    def _find(self, name: str) -> str:
        root = name
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        self.parent[name] = root
        return root

    def _union(self, a: str, b: str) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self.parent[rb] = ra

    def _out(self, node: ir.Node) -> ir.Value:
        """The value quantized at a quantized node's output (after an absorbed Relu/Clip)."""
        absorbed = self.absorbed.get(id(node))
        return (absorbed or node).outputs[0]

    def _in_q_domain(self, value: ir.Value | None) -> bool:
        if value is None or _is_constant(value):
            return False
        source = value.producer()
        if source is None:
            return False
        if id(source) in self.quantized:
            return self._out(source) is value
        for node in self.quantized.values():  # an absorbed Relu/Clip's output
            if self.absorbed.get(id(node)) is source:
                return True
        return False

    # --- phase 1: which nodes are quantized ----------------------------------------------
    def plan(self) -> QuantPlan:
        nodes = list(self.graph)
        for node in nodes:
            if node.domain not in ("", "ai.onnx") or not node.outputs:
                continue
            op = node.op_type
            pooled = op == "ReduceMean" and is_global_mean(node)
            if op not in _STANDARD_OPS and op not in self.include_ops and not pooled:
                continue
            if self._excluded(node):
                self.skipped.append(Skipped(node.name or "", op, "excluded"))
                continue
            if op == "Gather" and _is_embedding(node):
                self.embeddings.append(node)
                continue
            if op in WEIGHT_OPS:
                ok, reason = self._weight_op_ok(node)
            elif op == "Add" or op in ELEMENTWISE_OPS:
                ok, reason = self._add_ok(node) if op == "Add" else self._elementwise_ok(node)
                if not ok and op in self.include_ops and self._generic_ok(node):
                    ok = True
                    self.generic.add(id(node))
            elif pooled:  # written as GlobalAveragePool by `qdq.QDQPass`
                ok = self._movement_ok(node)
                reason = "input not quantized"
                if ok:
                    self.pooled_means.add(id(node))
            elif op not in _STANDARD_OPS:
                ok, reason = self._generic_ok(node), "no float input and output"
                if ok:
                    self.generic.add(id(node))
            elif op == "Concat":
                ok = any(self._in_q_domain(v) for v in node.inputs) and all(
                    v is not None and _is_float(v) and not _is_constant(v) for v in node.inputs
                )
                reason = "no quantized input"
            else:
                ok = self._movement_ok(node)
                reason = "input not quantized"
            if not ok:
                if op in WEIGHT_OPS:
                    self.skipped.append(Skipped(node.name or "", op, reason))
                continue
            self.quantized[id(node)] = node
            if op in WEIGHT_OPS + ("Add",):
                self._absorb(node)
            if op in ("Conv", "ConvTranspose") or any(
                id(v) in self.conv_values for v in node.inputs if v is not None
            ):
                self.conv_values.add(id(self._out(node)))
        self._drop_dangling_movement(nodes)
        return self._annotations(nodes)

    def _weight_op_ok(self, node: ir.Node) -> tuple[bool, str]:
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            return False, "missing inputs"
        x, w = node.inputs[0], node.inputs[1]
        if not _is_float(x):
            return False, "input is not float32"
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0) != 0:
                return False, "Gemm with transA"
        weight = _constant(w)
        if weight is not None:
            if weight.dtype != ir.DataType.FLOAT or _is_constant(x):
                return False, "weight is not float32"
            return True, ""
        if node.op_type == "MatMul" and self.activation_matmul and _is_float(w):
            return True, ""
        return False, "weight is not a constant"

    def _add_ok(self, node: ir.Node) -> tuple[bool, str]:
        inputs = [v for v in node.inputs if v is not None]
        if len(inputs) != 2 or not all(self._in_q_domain(v) for v in inputs):
            return False, "not a residual Add of two quantized values"
        a, b = (v.shape for v in inputs)
        if a is None or b is None or len(a) != len(b):
            return False, "operand ranks differ"
        return True, ""

    def _elementwise_ok(self, node: ir.Node) -> tuple[bool, str]:
        """A Sigmoid of a quantized value, a Mul of two (SiLU x * sigmoid(x), a squeeze-excitation
        gate): onnxruntime fuses DQ -> op -> Q into QLinearSigmoid / QLinearMul, so a SiLU or SE
        block between quantized convolutions runs without leaving the integer domain."""
        if not self.elementwise:
            return False, "int8 activations"
        if len(node.outputs) != 1 or not _is_float(node.outputs[0]):
            return False, "output is not float32"
        inputs = [v for v in node.inputs if v is not None]
        if len(inputs) != (1 if node.op_type == "Sigmoid" else 2):
            return False, "unexpected inputs"
        if not all(self._in_q_domain(v) for v in inputs):
            return False, "input not quantized"
        if not any(id(v) in self.conv_values for v in inputs):
            return False, "not fed by a quantized convolution"
        shapes = [v.shape for v in inputs]
        if any(s is None for s in shapes) or len({len(s) for s in shapes if s is not None}) != 1:
            return False, "operand ranks differ"
        return True, ""

    def _generic_ok(self, node: ir.Node) -> bool:
        """An op quantized on request: one float output and at least one float activation in."""
        if len(node.outputs) != 1 or not _is_float(node.outputs[0]):
            return False
        return any(
            v is not None and not _is_constant(v) and v.dtype == ir.DataType.FLOAT
            for v in node.inputs
        )

    def _movement_ok(self, node: ir.Node) -> bool:
        if len(node.outputs) != 1:
            return False
        if node.op_type == "Resize" and _attr(node, "mode", "nearest") != "nearest":
            return False
        if node.op_type == "MaxPool" and len(node.outputs) > 1:
            return False
        return self._in_q_domain(node.inputs[0])

    def _absorb(self, node: ir.Node) -> None:
        users = node.outputs[0].consumers()
        if len(users) != 1 or node.outputs[0].is_graph_output():
            return
        user = users[0]
        if user.op_type not in _ABSORBED or self._excluded(user):
            return
        if user.op_type == "Clip" and not _clip_starts_at_zero(user):
            return
        self.absorbed[id(node)] = user

    def _drop_dangling_movement(self, nodes: list[ir.Node]) -> None:
        """Data-movement ops only stay quantized if a quantized node reads their output."""
        for node in reversed(nodes):
            movement = node.op_type in DATA_MOVEMENT_OPS + POOLING_OPS
            if id(node) in self.quantized and (movement or id(node) in self.pooled_means):
                if not any(id(u) in self.quantized for u in node.outputs[0].consumers()):
                    del self.quantized[id(node)]
                    self.pooled_means.discard(id(node))

    # --- phase 2: annotations ----------------------------------------------------------------
    def _annotations(self, nodes: list[ir.Node]) -> QuantPlan:
        act_values: dict[str, tuple[ir.Value, ir.Node]] = {}  # value name -> (value, owner node)
        weights: dict[str, _WeightUses] = {}
        biases: list[BiasAnnotation] = []

        def want(value: ir.Value | None, owner: ir.Node | None = None) -> None:
            """Quantize `value`; its owner is `owner`, else its producer, else `node`."""
            if value is None:  # phase 1 only quantizes nodes whose inputs are present
                return
            name = _name(value)
            if name not in act_values:
                act_values[name] = (value, owner or value.producer() or node)
                self.parent.setdefault(name, name)

        for node in nodes:
            if id(node) not in self.quantized:
                continue
            op = node.op_type
            if id(node) in self.generic:
                for value in node.inputs:
                    if value is not None and not _is_constant(value) and (
                        value.dtype == ir.DataType.FLOAT
                    ):
                        want(value)
                if not node.outputs[0].is_graph_output():
                    want(node.outputs[0], node)
                continue
            if op in WEIGHT_OPS:
                x, w = node.inputs[0], node.inputs[1]
                want(x)
                weight = _constant(w)
                if weight is not None and w is not None:
                    axis = _weight_axis(node, w) if self.per_channel else None
                    entry = weights.setdefault(_name(w), _WeightUses(axis, node))
                    entry.add(node, 1, axis)
                    bias = node.inputs[2] if len(node.inputs) > 2 else None
                    bias_tensor = _constant(bias)
                    if (
                        op in ("Conv", "ConvTranspose", "Gemm")
                        and bias_tensor is not None
                        and bias_tensor.dtype == ir.DataType.FLOAT
                        and tuple(bias_tensor.shape) == (_out_channels(node, w),)
                        and (op != "Gemm" or (_attr(node, "alpha", 1.0) == 1.0
                                              and _attr(node, "beta", 1.0) == 1.0))
                    ):
                        biases.append(BiasAnnotation(_name(bias), node.name or "", 2, _name(x),
                                                     _name(w)))
                else:
                    want(w)
            elif op in ("Add", "Concat") + ELEMENTWISE_OPS:
                for value in node.inputs:
                    want(value)
                if op == "Concat":
                    for value in node.inputs:
                        self._union(_name(node.inputs[0]), _name(value))
            elif op in POOLING_OPS or id(node) in self.pooled_means:
                want(node.inputs[0])
                want(node.outputs[0], node)
                continue
            else:  # data movement: output shares the input's scale
                want(node.inputs[0])
                out = node.outputs[0]
                want(out, node)
                self._union(_name(node.inputs[0]), _name(out))
                continue
            out = self._out(node)
            consumers_quantized = any(id(u) in self.quantized for u in out.consumers())
            needs_q = op in ("Conv", "ConvTranspose", "Add", "Concat") + ELEMENTWISE_OPS
            if consumers_quantized or (needs_q and not out.is_graph_output()):
                want(out, node)
                if op == "Concat":
                    self._union(_name(node.inputs[0]), _name(out))

        for node in self.embeddings:  # per-tensor: the scale must survive the Gather
            entry = weights.setdefault(_name(node.inputs[0]), _WeightUses(None, node))
            entry.add(node, 0, None)

        activations = []
        for name, (value, owner) in act_values.items():
            activations.append(
                ActivationAnnotation(
                    value=name,
                    spec=self.act_spec,
                    node=owner.name or "",
                    layer=layer_name(owner),
                    op_type=owner.op_type,
                    shared_with=self._find(name),
                    float_producer=value.producer() is None or id(owner) not in self.quantized,
                )
            )
        weight_annotations = []
        for name, entry in weights.items():
            axis = None if entry.conflict else entry.axis
            weight_annotations.append(
                WeightAnnotation(
                    value=name,
                    spec=QuantSpec(_INT8, symmetric=True, axis=axis),
                    uses=tuple(entry.uses),
                    node=entry.node.name or "",
                    layer=layer_name(entry.node),
                    op_type=entry.node.op_type,
                )
            )
        quantized_names = tuple(n.name or "" for n in nodes if id(n) in self.quantized)
        logger.info(
            "quantization plan: %d nodes, %d activations, %d weights, %d biases",
            len(quantized_names), len(activations), len(weight_annotations), len(biases),
        )
        return QuantPlan(
            tuple(activations), tuple(weight_annotations), tuple(biases), quantized_names,
            tuple(self.skipped),
        )


@dataclass
class _WeightUses:
    """The nodes reading one constant weight; per-tensor when they disagree on the axis."""

    axis: int | None
    node: ir.Node  # the first reader (names the weight's row in the report)
    uses: list[tuple[str, int]] = field(default_factory=list)  # (node name, input index)
    conflict: bool = False

    def add(self, node: ir.Node, index: int, axis: int | None) -> None:
        if self.uses and self.axis != axis:
            self.conflict = True
        self.uses.append((node.name or "", index))


def _name(value: ir.Value | None) -> str:
    """A value's name ("" for none: every value the policy plans is named)."""
    return (value.name or "") if value is not None else ""


def _constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of a constant (not an overridable graph input), else None."""
    return value.const_value if value is not None and _is_constant(value) else None


def is_global_mean(node: ir.Node) -> bool:
    """A ReduceMean over every spatial axis (2 .. rank-1) of a float tensor of rank 3 or more with
    keepdims: a GlobalAveragePool (torch's `x.mean((2, 3), keepdim=True)`, the squeeze of a
    squeeze-excitation block)."""
    if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or not node.inputs:
        return False
    x = node.inputs[0]
    if x is None or x.dtype != ir.DataType.FLOAT or x.shape is None or len(x.shape) < 3:
        return False
    if _attr(node, "keepdims", 1) != 1:
        return False
    axes_value = node.inputs[1] if len(node.inputs) > 1 else None
    if "axes" in node.attributes:
        axes = [int(a) for a in node.attributes["axes"].value]
    elif axes_value is not None and axes_value.const_value is not None:
        axes = [int(a) for a in axes_value.const_value.numpy().reshape(-1)]
    else:
        return False
    rank = len(x.shape)
    return sorted(a % rank for a in axes) == list(range(2, rank))


def _is_embedding(node: ir.Node) -> bool:
    """A Gather of rows from a float32 constant table by runtime indices (an embedding)."""
    table = _constant(node.inputs[0])
    indices = node.inputs[1] if len(node.inputs) > 1 else None
    if table is None or indices is None or _is_constant(indices):
        return False
    if table.dtype != ir.DataType.FLOAT or len(table.shape) != 2:
        return False
    return _attr(node, "axis", 0) == 0 and not node.outputs[0].is_graph_output()


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in (ir.DataType.FLOAT, None)


def _attr(node: ir.Node, name: str, default: object) -> object:
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def _clip_starts_at_zero(node: ir.Node) -> bool:
    low = node.inputs[1] if len(node.inputs) > 1 else None
    if low is None:
        return _attr(node, "min", None) == 0.0
    return low.const_value is not None and float(low.const_value.numpy()) == 0.0


def _out_channels(node: ir.Node, weight: ir.Value) -> int | None:
    """Output channels of a Conv/ConvTranspose/Gemm (the length its bias must have)."""
    found = layout(node)
    const = weight.const_value
    return None if found is None or const is None else found.out_channels(const.shape.numpy())


def _weight_axis(node: ir.Node, weight: ir.Value) -> int | None:
    """The output-channel axis of a weight (the kit's layout table; None: per-tensor).

    A grouped ConvTranspose holds one group's output channels on axis 1 (one scale per index
    there would be shared across groups) and a MatMul weight of rank other than 2 has batch
    axes: both get one scale.
    """
    found = layout(node)
    const = weight.const_value
    if found is None or const is None:
        return None
    if node.op_type == "ConvTranspose" and found.group != 1:
        return None
    if node.op_type == "MatMul" and len(const.shape) != 2:
        return None
    return found.out_axis
