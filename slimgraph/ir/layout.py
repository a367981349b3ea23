"""Where the learned parameters of an op sit: one per-op table of weight layouts.

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

`layout(node)` resolves the attributes (Gemm's transB, the group of a Conv/ConvTranspose). The
table lives in `slimgraph.ir` because `ir.analysis` (parameter counts) and `ir.channels`
(pruning) read it and `ir` imports nothing from `passes`; `slimgraph.passes._kit` re-exports it.
Source: the ONNX operator specification (onnx.ai/onnx/operators).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import onnx_ir as ir

__all__ = ["OpLayout", "LAYOUTS", "layout"]

_ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class OpLayout:
    """Where one op's weight and bias are, and which weight axes hold its channels.

    Attributes:
        op_type: the ONNX op type.
        weight: input index of the weight.
        bias: input index of the bias (None when the op has none).
        params: every input index that holds a learned parameter (BatchNormalization's mean and
            variance included), in input order.
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
        "Conv": OpLayout("Conv", 1, 2, (1, 2), out_axis=0, in_axis=1, grouped=True),
        "ConvTranspose": OpLayout(
            "ConvTranspose", 1, 2, (1, 2), out_axis=1, in_axis=0, grouped=True
        ),
        "Gemm": OpLayout("Gemm", 1, 2, (1, 2), out_axis=1, in_axis=0),
        "MatMul": OpLayout("MatMul", 1, None, (1,), out_axis=1, in_axis=0),
        "BatchNormalization": OpLayout(
            "BatchNormalization", 1, 2, (1, 2, 3, 4), out_axis=0, in_axis=None
        ),
        "InstanceNormalization": OpLayout(
            "InstanceNormalization", 1, 2, (1, 2), out_axis=0, in_axis=None
        ),
        "LayerNormalization": OpLayout(
            "LayerNormalization", 1, 2, (1, 2), out_axis=None, in_axis=None
        ),
        "Gather": OpLayout("Gather", 0, None, (0,), out_axis=1, in_axis=None),
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
