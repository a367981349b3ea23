"""Where an integer weight's quantization parameters are, for each kind of reader.

An integer initializer is trainable (a float parameter holding its dequantized value) when every
reader says how to dequantize it, with constant parameters, and all readers agree:

| reader | weight input | scale | zero point | axis |
| --- | --- | --- | --- | --- |
| DequantizeLinear (also of Gathered rows) | x | x_scale | x_zero_point | `axis`, block |
| MatMulIntegerToFloat | B | b_scale | b_zero_point | last |
| DynamicQuantizeMatMul | B | b_scale | b_zero_point | last |
| QAttention | weight | weight_scale | weight_zero_point | last |
| GatherBlockQuantized | data | scales | zero_points (default 128) | `quantize_axis`, `block_size` |
| MatMulInteger | B | traced: the constant the Cast output is multiplied by | b_zero_point | last |
| ConvInteger | w | traced, likewise | w_zero_point | 0 |

MatMulInteger and ConvInteger carry no weight scale: the scale is the one by which their float
output is multiplied (`Cast -> Mul(s)`, or `Mul(a_scale, s)` as dynamic quantization writes it),
the form onnxruntime's and slimgraph's dynamic quantizers emit. Another form keeps the weight
frozen (logged).

This module has no torch dependency (it reads the IR only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_ir as ir

__all__ = ["WeightSource", "weight_source"]

logger = logging.getLogger(__name__)

_MS = "com.microsoft"


@dataclass(frozen=True)
class WeightSource:
    """How integer initializer `value` is dequantized: by `scale` (and `zero_point`, else the
    integer `zero_point_default`) along `axis` in blocks of `block`; `dequantized_by` says
    whether its readers are DequantizeLinear nodes (`rows`: outputs of Gathers of it that they
    read) or integer ops."""

    scale: ir.Value
    zero_point: ir.Value | None
    zero_point_default: int
    axis: int
    block: int
    dequantized_by: str  # "DequantizeLinear" or "op"
    rows: tuple[str, ...] = ()


# (domain, op_type) -> (weight input, scale input or None (traced), zero-point input, axis)
_INTEGER_READERS: dict[tuple[str, str], tuple[int, int | None, int, int]] = {
    (_MS, "MatMulIntegerToFloat"): (1, 3, 5, -1),
    (_MS, "DynamicQuantizeMatMul"): (1, 2, 3, -1),
    (_MS, "QAttention"): (1, 4, 7, -1),
    (_MS, "GatherBlockQuantized"): (0, 2, 3, 1),
    ("", "MatMulInteger"): (1, None, 3, -1),
    ("", "ConvInteger"): (1, None, 3, 0),
}


def _input(node: ir.Node, index: int | None) -> ir.Value | None:
    if index is None or index >= len(node.inputs):
        return None
    return node.inputs[index]


def _is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def _domain(node: ir.Node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def weight_source(value: ir.Value) -> WeightSource | None:
    """How integer initializer `value` is dequantized, or None when it stays a constant (a
    graph output, a reader of another kind, non-constant parameters, readers that disagree)."""
    if value.is_graph_output():
        return None
    found: list[WeightSource] = []
    for use in value.uses():
        node = use.node
        if node.op_type == "DequantizeLinear" and use.idx == 0:
            source = _dq_source(node)
        elif node.op_type == "Gather" and use.idx == 0 and not node.outputs[0].is_graph_output():
            source = _gathered_source(node)
        else:
            source = _op_source(node, use.idx)
        if source is None:
            return None
        found.append(source)
    if not found:
        return None
    keys = {(s.scale.name, s.zero_point.name if s.zero_point is not None else None,
             s.zero_point_default, s.axis, s.block, s.dequantized_by) for s in found}
    if len(keys) != 1:
        return None
    rows = tuple(row for s in found for row in s.rows)
    first = found[0]
    return WeightSource(first.scale, first.zero_point, first.zero_point_default, first.axis,
                        first.block, first.dequantized_by, rows)


def _dq_source(node: ir.Node) -> WeightSource | None:
    scale, zero_point = _input(node, 1), _input(node, 2)
    if not _is_constant(scale) or zero_point is not None and not _is_constant(zero_point):
        return None
    assert scale is not None
    axis = node.attributes.get_int("axis", 1)
    block = node.attributes.get_int("block_size", 0)
    return WeightSource(scale, zero_point, 0, axis, block, "DequantizeLinear")


def _gathered_source(gather: ir.Node) -> WeightSource | None:
    """Rows of a quantized table gathered, then dequantized per tensor (the axis would move)."""
    rows = gather.outputs[0]
    sources = []
    for inner in rows.uses():
        if inner.node.op_type != "DequantizeLinear" or inner.idx != 0:
            return None
        source = _dq_source(inner.node)
        if source is None or source.scale.const_value is None:
            return None
        if source.scale.const_value.size != 1:
            return None
        sources.append(source)
    if not sources:
        return None
    first = sources[0]
    return WeightSource(first.scale, first.zero_point, 0, first.axis, first.block,
                        "DequantizeLinear", (rows.name or "",))


def _op_source(node: ir.Node, index: int) -> WeightSource | None:
    reader = _INTEGER_READERS.get((_domain(node), node.op_type))
    if reader is None or reader[0] != index:
        return None
    _, scale_index, zero_index, axis = reader
    zero_point = _input(node, zero_index)
    if zero_point is not None and not _is_constant(zero_point):
        return None
    default, block = 0, 0
    if node.op_type == "GatherBlockQuantized":
        bits, gather_axis = (node.attributes.get_int(n, d) for n, d in (("bits", 4),
                                                                          ("gather_axis", 0)))
        if bits != 8 or gather_axis != 0:
            return None
        axis = node.attributes.get_int("quantize_axis", 1)
        block = node.attributes.get_int("block_size", 128)
        default = 128
    scale = _input(node, scale_index) if scale_index is not None else _traced_scale(node)
    if not _is_constant(scale):
        if scale_index is None:
            logger.info(
                "integer weight of %s node '%s' stays frozen: its output is not multiplied by "
                "a constant scale (Cast -> Mul)", node.op_type, node.name,
            )
        return None
    assert scale is not None
    return WeightSource(scale, zero_point, default, axis, block, "op")


def _traced_scale(node: ir.Node) -> ir.Value | None:
    """The weight scale of a MatMulInteger/ConvInteger: its output cast to float, multiplied by
    a constant, or by Mul(activation scale, constant). None for any other form."""
    weight = _input(node, 1)
    if weight is None or weight.shape is None or len(node.outputs[0].uses()) != 1:
        return None
    channels = weight.shape[0] if node.op_type == "ConvInteger" else weight.shape[-1]
    cast = next(iter(node.outputs[0].uses())).node
    if cast.op_type != "Cast" or len(cast.outputs[0].uses()) != 1:
        return None
    use = next(iter(cast.outputs[0].uses()))
    mul = use.node
    if mul.op_type != "Mul":
        return None
    other = mul.inputs[1 - use.idx]
    candidates = [other]
    producer = other.producer() if other is not None else None
    if producer is not None and producer.op_type == "Mul":
        candidates = list(producer.inputs)
    constants = [c for c in candidates if _is_constant(c) and _fits(c, channels)]
    return constants[0] if len(constants) == 1 else None


def _fits(value: ir.Value | None, channels: object) -> bool:
    """A scale per tensor, or one per output channel (any shape holding `channels` values)."""
    assert value is not None and value.const_value is not None
    size = value.const_value.size
    return size == 1 or isinstance(channels, int) and size == channels
