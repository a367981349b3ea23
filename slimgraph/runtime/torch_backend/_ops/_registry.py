"""The registry of the op table and what every kernel module shares.

A builder receives the node, the opset version of its domain and the lowering context, reads the
node's attributes once and returns a kernel: a function of the module (for `training`) and the
node's input tensors (None for a missing optional input) that returns the node's outputs.
`op(...)` registers a builder under (domain, op_type); `lookup` finds it.

This module imports torch; it is only imported by `_lower` (lazily).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from slimgraph.errors import UnsupportedModelError

__all__ = [
    "MS_DOMAIN",
    "Tensor",
    "Kernel",
    "Builder",
    "LowerContext",
    "QuantizedWeight",
    "op",
    "lookup",
    "known_ops",
    "attr",
    "ints",
    "int_list",
    "optional",
    "unsupported",
    "QOPERATOR_OPS",
    "TORCH_DTYPES",
    "to_torch",
]

MS_DOMAIN = "com.microsoft"

Tensor = torch.Tensor
Kernel = Callable[[torch.nn.Module, list[Any]], list[Any]]


@dataclass(frozen=True)
class QuantizedWeight:
    """How an integer weight initializer that is lowered to a float parameter (holding its
    dequantized value (codes - zero_point) * scale) gets its codes back: the initializers of
    its scale and zero point (None: `zero_point_default`), the per-channel axis and the block
    size along it (0: per tensor or per channel)."""

    dtype: ir.DataType
    scale: str
    zero_point: str | None
    zero_point_default: int
    axis: int
    block: int


@dataclass
class LowerContext:
    """What a builder may know beyond its node: which values are trained weights or scales.

    Attributes:
        weight_values: values read by DequantizeLinear that hold a dequantized integer weight
            (the weight's parameter, or rows gathered from it), by value name.
        quantized_weights: integer weights read by an integer op (MatMulInteger, ConvInteger,
            MatMulIntegerToFloat, DynamicQuantizeMatMul, QAttention, GatherBlockQuantized) and
            lowered to float parameters, by value name: the op re-quantizes them.
        learned_scales: activation scales that are parameters (LSQ), by value name.
    """

    weight_values: set[str] = field(default_factory=set)
    quantized_weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    learned_scales: set[str] = field(default_factory=set)


Builder = Callable[[ir.Node, int, LowerContext], Kernel]

_OPS: dict[tuple[str, str], Builder] = {}

# Integer ops of onnxruntime's QOperator format that the backend does not train (the QDQ form
# of the same model is trainable); the dynamic int8 ops are lowered (`_quant`).
QOPERATOR_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "QGemm", "QLinearConvTranspose",
    "MatMulNBits", "QOrderedMatMul",
})

TORCH_DTYPES: dict[ir.DataType, torch.dtype] = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.INT16: torch.int16,
    ir.DataType.UINT16: torch.int32,  # widened: torch's uint16 lacks most kernels
    ir.DataType.INT32: torch.int32,
    ir.DataType.UINT32: torch.int64,
    ir.DataType.INT64: torch.int64,
    ir.DataType.BOOL: torch.bool,
    ir.DataType.INT4: torch.int8,
    ir.DataType.UINT4: torch.uint8,
}


def _domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def op(*op_types: str, domain: str = "") -> Callable[[Builder], Builder]:
    """Register a builder for `op_types` of `domain` ("" is the ONNX domain)."""

    def register(builder: Builder) -> Builder:
        for op_type in op_types:
            _OPS[(domain, op_type)] = builder
        return builder

    return register


def lookup(domain: str, op_type: str) -> Builder | None:
    """The builder of `op_type` in `domain` ("" and "ai.onnx" alike), or None."""
    return _OPS.get((_domain(domain), op_type))


def known_ops() -> list[tuple[str, str]]:
    """Every (domain, op_type) with a kernel, sorted ("" is the ONNX domain)."""
    return sorted(_OPS)


# --- attribute and input helpers ---------------------------------------------------------------


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """Attribute `name` of `node` as a Python value (a tensor as numpy, lists as lists)."""
    found = node.attributes.get(name)
    if found is None:
        return default
    value = found.value
    if isinstance(value, ir.TensorProtocol):
        return value.numpy()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return value


def ints(t: Tensor | None) -> list[int] | None:
    """The values of an integer tensor as a list (None stays None)."""
    return None if t is None else int_list(t)


def int_list(t: Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def optional(xs: list[Any], index: int) -> Any:
    """Input `index` of a kernel's inputs, or None when it is missing or empty."""
    return xs[index] if len(xs) > index else None


def unsupported(node: ir.Node, what: str) -> UnsupportedModelError:
    """The error for a node whose attributes or inputs the kernel does not support."""
    return UnsupportedModelError(
        f"the torch backend does not support {what} in {node.op_type} node '{node.name}'"
    )


def to_torch(array: np.ndarray) -> Tensor:
    """A numpy array as a torch tensor (int4/uint4 widened to int8/uint8, uint16 to int32)."""
    array = np.asarray(array)
    name = array.dtype.name
    if name == "int4":
        array = array.astype(np.int8)
    elif name == "uint4":
        array = array.astype(np.uint8)
    elif array.dtype == np.uint16:
        array = array.astype(np.int32)
    elif array.dtype == np.uint32:
        array = array.astype(np.int64)
    return torch.from_numpy(np.array(array, copy=True))
