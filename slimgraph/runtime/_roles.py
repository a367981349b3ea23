"""What a graph input is for, read from the nodes that consume it, and sample values that fit.

A random integer is a fine token id but not a divisor (0 divides nothing), nor a shape, nor a
list of axes; a float is a fine activation but not a Dropout ratio. `input_role` follows an input
to the slot it feeds (through Cast/Identity) and `role_values` draws what that slot accepts: a
divisor away from zero, a Reshape target read from the shape the model declares for the result,
axes that exist and do not repeat, a Split that adds up to the dimension it splits, neutral
Slice/Pad/Tile/Resize parameters, `training_mode` false, Gather indices (token ids) over the
whole axis they index. Inputs whose slot is not listed here get
the default draws of `feeds.random_feeds`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = ["Role", "input_role", "role_values"]


@dataclass(frozen=True)
class Role:
    """The slot an input feeds: `kind` (a key of `_DRAWS`), the node and the input index."""

    kind: str
    node: ir.Node
    index: int


# (op type, input index) -> role kind, for default-domain ops.
_SLOTS: dict[tuple[str, int], str] = {
    ("Div", 1): "divisor",
    ("Mod", 1): "divisor",
    ("Reshape", 1): "reshape",
    ("Expand", 1): "expand",
    ("Tile", 1): "ones",
    ("ConstantOfShape", 0): "ones",
    ("Unsqueeze", 1): "new_axes",
    ("Squeeze", 1): "unit_axes",
    ("Slice", 1): "zeros",
    ("Slice", 2): "ends",
    ("Slice", 3): "axes",
    ("Slice", 4): "ones",
    ("Split", 1): "split",
    ("SplitToSequence", 1): "split",
    ("CumSum", 1): "zeros",
    ("CumProd", 1): "zeros",
    ("Pad", 1): "zeros",
    ("Pad", 3): "axes",
    ("TopK", 1): "ones",
    ("OneHot", 1): "depth",
    ("Resize", 1): "roi",
    ("Resize", 2): "ones",
    ("Resize", 3): "sizes",
    ("Upsample", 1): "ones",
    ("Range", 0): "zeros",
    ("Range", 1): "limit",
    ("Range", 2): "ones",
    ("Trilu", 1): "zeros",
    ("Gather", 1): "indices",
    ("Dropout", 1): "ratio",
    ("Dropout", 2): "false",
    ("NonMaxSuppression", 2): "ones",
    ("NonMaxSuppression", 3): "ratio",
    ("NonMaxSuppression", 4): "zeros",
    ("CenterCropPad", 1): "sizes",
    ("AffineGrid", 1): "affine_size",
    **{
        (op, 1): "axes"
        for op in (
            "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
            "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
        )
    },
}

# Ops a value passes through unchanged in meaning (followed to the slot behind them).
_TRANSPARENT = ("Cast", "Identity")


def input_role(value: ir.Value) -> Role | None:
    """The listed slot `value` feeds (directly or through Cast/Identity), else None."""
    seen: set[int] = set()
    pending = [value]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for use in current.uses():
            node, index = use.node, use.idx
            if node.domain not in ("", "ai.onnx"):
                continue
            kind = _SLOTS.get((node.op_type, index))
            if kind is not None:
                return Role(kind, node, index)
            if node.op_type in _TRANSPARENT:
                pending.extend(node.outputs)
    return None


def _static(shape: ir.Shape | None) -> list[int] | None:
    if shape is None:
        return None
    dims = [d for d in shape if isinstance(d, int)]
    return dims if len(dims) == len(shape) else None


def _data_shape(role: Role, shapes: dict[str, tuple[int, ...]]) -> list[int] | None:
    """The shape of the data input of the role's node (input 0): generated or declared."""
    data = role.node.inputs[0]
    if data is None:
        return None
    if data.name in shapes:
        return list(shapes[data.name])
    return _static(data.shape)


def _output_shape(role: Role) -> list[int] | None:
    return _static(role.node.outputs[0].shape) if role.node.outputs else None


def _reshape(role: Role, count: int, shapes: dict[str, tuple[int, ...]]) -> list[int] | None:
    declared = _output_shape(role)
    if declared is not None and len(declared) == count:
        return declared
    if role.node.attributes.get_int("allowzero", 0):
        return None
    data = _data_shape(role, shapes)
    rank = len(data) if data is not None else count
    if count < rank:
        return [0] * (count - 1) + [-1] if count else None
    return [0] * rank + [1] * (count - rank)  # 0 copies the input's dimension


def _split(role: Role, count: int, shapes: dict[str, tuple[int, ...]]) -> list[int] | None:
    data = _data_shape(role, shapes)
    axis = role.node.attributes.get_int("axis", 0)
    if data is None or not -len(data) <= axis < len(data) or count < 1:
        return None
    size = data[axis]
    part = size // count
    return [part] * (count - 1) + [size - part * (count - 1)]


def _indices(
    role: Role, shape: Sequence[int], rng: np.random.Generator,
    shapes: dict[str, tuple[int, ...]],
) -> np.ndarray | None:
    """Positions along the gathered axis, all equally likely: token ids over the whole
    vocabulary of an embedding table (not 0 and 1 only, where an LM's fidelity means little)."""
    data = _data_shape(role, shapes)
    axis = role.node.attributes.get_int("axis", 0)
    if data is None or not -len(data) <= axis < len(data) or data[axis] < 1:
        return None
    return rng.integers(0, data[axis], size=tuple(shape))


def _unit_axes(role: Role, count: int, shapes: dict[str, tuple[int, ...]]) -> list[int] | None:
    data = _data_shape(role, shapes)
    if data is None:
        return None
    units = [axis for axis, dim in enumerate(data) if dim == 1]
    return units[:count] if len(units) >= count else None


def _sizes(role: Role, count: int, shapes: dict[str, tuple[int, ...]]) -> list[int] | None:
    """The result's declared shape, else the data's own (on the node's `axes` when it has
    them: Resize-18 sizes for some axes only)."""
    axes = list(role.node.attributes.get_ints("axes", []) or [])
    declared = _output_shape(role)
    data = _data_shape(role, shapes)
    for shape in (declared, data):
        if shape is None:
            continue
        picked = [shape[a] for a in axes if -len(shape) <= a < len(shape)] if axes else shape
        if len(picked) == count:
            return picked
    return None


def _affine_size(
    role: Role, count: int, shapes: dict[str, tuple[int, ...]]
) -> list[int] | None:
    """AffineGrid's output size [N, C, H, W(, D)]: N from theta [N, 2, 3] (or [N, 3, 4])."""
    theta = _data_shape(role, shapes)
    if theta is None or count < 3:
        return None
    return [theta[0], 1] + [4] * (count - 2)


_Draw = Callable[[Role, int, dict[str, tuple[int, ...]]], "list[int] | list[float] | None"]

# Role kind -> the flat values for an input of `count` elements (None: no sensible value).
_DRAWS: dict[str, _Draw] = {
    "reshape": _reshape,
    "expand": lambda role, n, shapes: (
        d if (d := _output_shape(role)) is not None and len(d) == n else [1] * n
    ),
    "ones": lambda role, n, shapes: [1] * n,
    "zeros": lambda role, n, shapes: [0] * n,
    "false": lambda role, n, shapes: [0] * n,
    "new_axes": lambda role, n, shapes: list(range(n)),
    "axes": lambda role, n, shapes: list(range(n)),
    "unit_axes": _unit_axes,
    "ends": lambda role, n, shapes: [np.iinfo(np.int32).max] * n,
    "split": _split,
    "sizes": _sizes,
    "depth": lambda role, n, shapes: [3] * n,
    "limit": lambda role, n, shapes: [4] * n,
    "ratio": lambda role, n, shapes: [0.5] * n,
    "roi": lambda role, n, shapes: [0.0] * (n // 2) + [1.0] * (n - n // 2),
    "affine_size": _affine_size,
}


def role_values(
    role: Role,
    shape: Sequence[int],
    dtype: np.dtype,
    rng: np.random.Generator,
    shapes: dict[str, tuple[int, ...]],
) -> np.ndarray | None:
    """Values of `shape` and `dtype` that the role's slot accepts, or None for the default draw.

    Args:
        role: from `input_role`.
        shape: the shape generated for the input.
        dtype: its numpy dtype.
        rng: the generator (divisors are random, away from zero).
        shapes: shapes already generated for other inputs, by name (the data a Reshape or a
            Split reads, say).
    """
    if role.kind == "divisor":
        if dtype.kind not in "iu":
            return None  # a float divisor drawn from a normal is never exactly zero
        magnitude = rng.integers(1, 4, size=tuple(shape))
        sign = rng.choice([-1, 1], size=tuple(shape)) if dtype.kind == "i" else 1
        return np.asarray(magnitude * sign).astype(dtype)
    if role.kind == "indices":
        drawn = _indices(role, shape, rng, shapes) if dtype.kind in "iu" else None
        return None if drawn is None else drawn.astype(dtype)
    count = int(np.prod(shape)) if len(shape) else 1
    if role.kind == "split" and not len(shape):
        values: list[int] | list[float] | None = [1]  # a scalar split: chunks of 1 always fit
    else:
        values = _DRAWS[role.kind](role, count, shapes)
    if values is None or len(values) != count:
        return None
    if dtype.kind == "b":
        return np.asarray(values, dtype=bool).reshape(shape)
    array = np.asarray(values)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        array = np.clip(array, info.min, info.max)
    return array.astype(dtype).reshape(shape)
