"""Where an op's parameters sit: its parameter inputs (learned or frozen) and weight layouts.

For each ONNX op with a constant weight (Conv, ConvTranspose, Gemm, MatMul, the normalizations,
Gather as an embedding), `LAYOUTS` names the weight and bias input indices, every input that is a
learned parameter, and the weight's output- and input-channel axes:

- Conv: weight `(C_out, C_in / group, k...)`: output axis 0, input axis 1 (sizes per group).
- ConvTranspose: weight `(C_in, C_out / group, k...)`: output axis 1, input axis 0; output
  channel `g * (C_out / group) + j` is column `j` of group `g`'s rows.
- Gemm: `Y = alpha * A' B' + beta * C` with `B' = B^T if transB`: B is `(K, N)`, output axis 1
  and input axis 0; with transB=1 B is `(N, K)`, output axis 0 and input axis 1.
- MatMul with a 2-D constant right operand `(K, N)`: output axis 1, input axis 0.
- BatchNormalization / InstanceNormalization: per-channel scale `(C,)` and bias `(C,)` (axis 0);
  BatchNormalization's mean and variance are parameters too.
- LayerNormalization: scale and bias over the normalized axes (no channel axis).
- Gather: an embedding table `(vocabulary, dim)` read by row (input 0): output axis 1.

`layout(node)` resolves the attributes (Gemm's transB, the group of a Conv/ConvTranspose).

`SLOTS` is the wider table of parameter inputs by op type, ONNX and onnxruntime's contrib ops
alike (SkipLayerNormalization, Attention, MatMulIntegerToFloat, ...): every input that holds a
parameter when it is a constant, each a `Slot` whose `frozen` field says whether training may
move it (a weight, a bias, a norm's scale) or not (running statistics, quantization scales and
zero points, clip bounds, pad and resize inputs, attention masks, rotary caches). `LAYOUTS`
takes its `params` from it; the torch backend decides from it what becomes a parameter.

The tables live in `slimgraph.ir` because `ir.analysis` (parameter counts) reads them and `ir`
imports nothing from `passes`; `slimgraph.passes._kit` re-exports `LAYOUTS` and `layout`.
Source: the ONNX operator specification (onnx.ai/onnx/operators) and onnxruntime's contrib
operator specification (ContribOperators.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import onnx_ir as ir

__all__ = ["Slot", "SLOTS", "parameter_slot", "OpLayout", "LAYOUTS", "layout"]

_ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Slot:
    """An input of an op that holds a parameter when it is a constant.

    Attributes:
        index: the input index.
        frozen: training never moves it (running statistics, scales and zero points, bounds,
            shape-like inputs, masks); False for learned weights, biases and norm scales.
        swapped: the weight only in the op's swapped form (MatMul's constant left operand,
            `W @ x`); not one of `OpLayout.params`.
    """

    index: int
    frozen: bool = False
    swapped: bool = False


def _slots(
    learned: Sequence[int] = (), frozen: Sequence[int] = (), swapped: Sequence[int] = ()
) -> tuple[Slot, ...]:
    found = [Slot(i) for i in learned] + [Slot(i, frozen=True) for i in frozen]
    found += [Slot(i, swapped=True) for i in swapped]
    return tuple(sorted(found, key=lambda slot: slot.index))


# Parameter inputs by op type (ONNX and com.microsoft ops: the op types do not collide).
SLOTS: Mapping[str, tuple[Slot, ...]] = MappingProxyType(
    {
        # the layers of `LAYOUTS`
        "Conv": _slots((1, 2)),
        "ConvTranspose": _slots((1, 2)),
        "Gemm": _slots((1, 2)),
        "MatMul": _slots((1,), swapped=(0,)),
        "BatchNormalization": _slots((1, 2), frozen=(3, 4)),
        "InstanceNormalization": _slots((1, 2)),
        "LayerNormalization": _slots((1, 2)),
        "Gather": _slots((0,)),
        # other learned parameters
        "PRelu": _slots((1,)),
        "GroupNormalization": _slots((1, 2)),
        "RMSNormalization": _slots((1,)),
        "SimplifiedLayerNormalization": _slots((1,)),
        "SkipLayerNormalization": _slots((2, 3, 4)),
        "SkipSimplifiedLayerNormalization": _slots((2, 3)),
        "BiasGelu": _slots((1,)),
        "FastGelu": _slots((1,)),
        "Attention": _slots((1, 2), frozen=(3, 5)),  # mask index, attention bias
        "MultiHeadAttention": _slots((3,), frozen=(4, 5)),  # key padding mask, attention bias
        # integer ops: the float bias learns; scales and zero points stay
        "QAttention": _slots((2,), frozen=(3, 4)),
        "MatMulIntegerToFloat": _slots((6,), frozen=(2, 3)),
        "DynamicQuantizeMatMul": _slots((4,), frozen=(2,)),
        "GatherBlockQuantized": _slots(frozen=(2,)),
        "QuantizeLinear": _slots(frozen=(1, 2)),
        "DequantizeLinear": _slots(frozen=(1, 2)),
        # bounds, shapes and caches
        "Clip": _slots(frozen=(1, 2)),
        "Resize": _slots(frozen=(1, 2, 3)),
        "Upsample": _slots(frozen=(1,)),
        "Pad": _slots(frozen=(1, 2, 3)),
        "Range": _slots(frozen=(0, 1, 2)),
        "ConstantOfShape": _slots(frozen=(0,)),
        "Dropout": _slots(frozen=(1, 2)),
        "GroupQueryAttention": _slots(frozen=(7, 8, 10)),  # rotary caches, attention bias
        "RotaryEmbedding": _slots(frozen=(1, 2, 3)),  # position ids, cos and sin caches
    }
)


# ONNX standard ops named as a contrib op of another signature: opset 23's Attention takes
# (Q, K, V, mask, past key, past value), no weight; its mask never trains.
_STANDARD_SLOTS: Mapping[str, tuple[Slot, ...]] = MappingProxyType(
    {"Attention": _slots(frozen=(3,))}
)


def parameter_slot(op_type: str, index: int, domain: str = "") -> Slot | None:
    """The `Slot` of input `index` of `op_type` (in `domain`), None when that input holds no
    parameter."""
    table = _STANDARD_SLOTS if domain in ("", "ai.onnx") and op_type in _STANDARD_SLOTS else SLOTS
    return next((slot for slot in table.get(op_type, ()) if slot.index == index), None)


def _params(op_type: str) -> tuple[int, ...]:
    return tuple(slot.index for slot in SLOTS[op_type] if not slot.swapped)


@dataclass(frozen=True)
class OpLayout:
    """Where one op's weight and bias are, and which weight axes hold its channels.

    Attributes:
        op_type: the ONNX op type.
        weight: input index of the weight.
        bias: input index of the bias (None when the op has none).
        params: every input index that holds a parameter (`SLOTS`, BatchNormalization's mean
            and variance included, MatMul's swapped left operand not), in input order.
        out_axis: the weight axis of the output channels (None: no channel axis).
        in_axis: the weight axis of the input channels (None: no channel axis).
        grouped: the op has a `group` attribute (Conv, ConvTranspose): the channel axes then
            hold the channels of one group.
        group: the node's `group` (1 in the table; resolved by `layout(node)`).
        trans_b: Gemm's `transB` (0 in the table; resolved by `layout(node)`).
    """

    op_type: str
    weight: int
    bias: int | None
    params: tuple[int, ...]
    out_axis: int | None
    in_axis: int | None
    grouped: bool = False
    group: int = 1
    trans_b: int = 0

    def out_channels(self, weight_shape: Sequence[int]) -> int | None:
        """Output channels of the node (ConvTranspose: per-group count times the group)."""
        if self.out_axis is None or len(weight_shape) <= self.out_axis:
            return None
        size = int(weight_shape[self.out_axis])
        return size * self.group if self.op_type == "ConvTranspose" else size

    def in_channels(self, weight_shape: Sequence[int]) -> int | None:
        """Input channels of the node (Conv: per-group count times the group)."""
        if self.in_axis is None or len(weight_shape) <= self.in_axis:
            return None
        size = int(weight_shape[self.in_axis])
        return size * self.group if self.op_type == "Conv" else size

    def is_depthwise(self, weight_shape: Sequence[int]) -> bool:
        """A grouped op with one input channel per group (and more than one group)."""
        if not self.grouped or self.group <= 1 or self.in_axis is None:
            return False
        if len(weight_shape) <= self.in_axis:
            return False
        per_group = int(weight_shape[self.in_axis])
        return (per_group // self.group if self.op_type == "ConvTranspose" else per_group) == 1


LAYOUTS: Mapping[str, OpLayout] = MappingProxyType(
    {
        "Conv": OpLayout("Conv", 1, 2, _params("Conv"), out_axis=0, in_axis=1, grouped=True),
        "ConvTranspose": OpLayout(
            "ConvTranspose", 1, 2, _params("ConvTranspose"), out_axis=1, in_axis=0, grouped=True
        ),
        "Gemm": OpLayout("Gemm", 1, 2, _params("Gemm"), out_axis=1, in_axis=0),
        "MatMul": OpLayout("MatMul", 1, None, _params("MatMul"), out_axis=1, in_axis=0),
        "BatchNormalization": OpLayout(
            "BatchNormalization", 1, 2, _params("BatchNormalization"), out_axis=0, in_axis=None
        ),
        "InstanceNormalization": OpLayout(
            "InstanceNormalization", 1, 2, _params("InstanceNormalization"), out_axis=0,
            in_axis=None,
        ),
        "LayerNormalization": OpLayout(
            "LayerNormalization", 1, 2, _params("LayerNormalization"), out_axis=None, in_axis=None
        ),
        "Gather": OpLayout("Gather", 0, None, _params("Gather"), out_axis=1, in_axis=None),
    }
)


def layout(node: ir.Node) -> OpLayout | None:
    """The layout of `node`'s weight with its attributes applied, None for other ops.

    Gemm with transB=1 swaps the axes (B is `(N, K)`); Conv/ConvTranspose carry their `group`.
    """
    if node.domain not in _ONNX_DOMAINS:
        return None
    found = LAYOUTS.get(node.op_type)
    if found is None:
        return None
    if found.grouped:
        group = node.attributes.get_int("group", 1)
        return found if group == 1 else dataclasses.replace(found, group=group)
    trans_b = node.attributes.get_int("transB", 0) if node.op_type == "Gemm" else 0
    if trans_b:
        return dataclasses.replace(found, out_axis=0, in_axis=1, trans_b=1)
    return found
