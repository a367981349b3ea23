"""Symbolic shapes for matching: dimensions as monomials, shape vectors evaluated symbolically.

Exporters compute the shapes of attention's Reshapes at run time (`Concat(Shape(x)[0:1], [-1],
[8])`), and often leave the result's shape unknown (`[?, ?, ?]`). To follow the data through
those Reshapes, `ShapeInfo` evaluates shape computations (Shape, Gather, Slice, Concat, Squeeze,
Unsqueeze, Cast, Reshape, scalar Mul/Div/Add) on symbolic dimensions and propagates shapes
through the ops attention uses (Reshape with 0 and -1, Transpose, Expand, MatMul, broadcasting
elementwise ops, Split, Slice, Gather, ...). A dimension is a `Dim`: an integer coefficient times
a product of named symbols (`batch`, `seq`, or the exporter's own expression names such as
`((samples//10)) - 1`, which stay opaque). Unknown dimensions get a fresh symbol of their own,
so they only ever equal themselves: the matcher never assumes two unknowns are the same.

Nothing here changes the graph.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from slimgraph.passes._graph_utils import is_onnx_op
from slimgraph.passes._kit import constant_array, traced_constant

__all__ = ["Dim", "ShapeInfo", "Shape", "dim_of", "sum_dim", "product", "scalar", "ONE", "all_true"]

_INT_MAX = 2**62  # Slice ends above this mean "to the end"


@dataclasses.dataclass(frozen=True)
class Dim:
    """`coef * sym_1 * sym_2 * ...` (symbols sorted); a static dimension has no symbols."""

    coef: int
    syms: tuple[str, ...] = ()

    @property
    def static(self) -> bool:
        return not self.syms

    def __int__(self) -> int:
        if self.syms:
            raise ValueError(f"dimension {self} is not static")
        return self.coef

    def __mul__(self, other: Dim | int) -> Dim:
        other = dim_of(other)
        return Dim(self.coef * other.coef, tuple(sorted(self.syms + other.syms)))

    def divide(self, other: Dim | int) -> Dim | None:
        """self / other when it divides exactly (as monomials), else None."""
        other = dim_of(other)
        if other.coef == 0 or self.coef % other.coef:
            return None
        syms = list(self.syms)
        for sym in other.syms:
            if sym not in syms:
                return None
            syms.remove(sym)
        return Dim(self.coef // other.coef, tuple(syms))

    def __str__(self) -> str:
        parts = [str(self.coef)] if self.coef != 1 or not self.syms else []
        return "*".join(parts + list(self.syms))


Shape = tuple[Dim, ...]
ONE = Dim(1)


def sum_dim(a: Dim, b: Dim) -> Dim:
    """`a + b` as one opaque symbol named by the sum (`past_sequence + sequence`, the name
    torch's exporter gives such a dimension): equal only to the same sum, never to a part."""
    terms = sorted(t for d in (a, b) for t in str(d).split(" + ") if t != "0")
    return Dim(1, (" + ".join(terms),))


def _named(text: str) -> Dim:
    """A named dimension; a product the exporter wrote as text (`4*batch`, `batch*seq`) as that
    monomial, so it equals the same product computed from a shape; anything else one opaque
    symbol."""
    factors = text.replace(" ", "").split("*")
    if len(factors) > 1 and all(f.isdigit() or f.isidentifier() for f in factors):
        out = ONE
        for factor in factors:
            out = out * (Dim(int(factor)) if factor.isdigit() else Dim(1, (factor,)))
        return out
    return Dim(1, (text,))


def dim_of(value: Dim | int) -> Dim:
    return value if isinstance(value, Dim) else Dim(int(value))


def product(dims: Sequence[Dim]) -> Dim:
    out = ONE
    for dim in dims:
        out = out * dim
    return out


def _broadcast(shapes: Sequence[Shape]) -> Shape | None:
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for axis in range(rank):
        dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        big = [d for d in dims if d != ONE]
        if not big:
            out.append(ONE)
            continue
        # symbolic dims that differ by name must be equal at run time; prefer the plainest
        out.append(min(big, key=lambda d: (not d.static, len(d.syms), len(str(d)))))
    return tuple(out)


class ShapeInfo:
    """Memoized symbolic shapes (`shape(v)`) and shape-vector values (`ints(v)`) of a graph."""

    def __init__(self) -> None:
        self._shapes: dict[int, Shape | None] = {}
        self._ints: dict[int, tuple[Dim, ...] | None] = {}
        self._busy: set[int] = set()

    # ------------------------------------------------------------------------ recorded shapes

    @staticmethod
    def recorded(value: ir.Value) -> Shape | None:
        """The shape the graph records for `value`, unknown dims as fresh symbols."""
        if value.shape is None:
            return None
        dims: list[Dim] = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                dims.append(Dim(dim))
            elif dim.value is not None:
                dims.append(_named(str(dim.value)))
            else:
                dims.append(Dim(1, (f"?{value.name}:{axis}",)))
        return tuple(dims)

    # ------------------------------------------------------------------------ int vectors

    def ints(self, value: ir.Value | None) -> tuple[Dim, ...] | None:
        """The elements of a 0-D or 1-D integer tensor (a shape computation) as dims, or None."""
        if value is None:
            return None
        key = id(value)
        if key not in self._ints:
            self._ints[key] = None  # cycles and failures
            self._ints[key] = self._compute_ints(value)
        return self._ints[key]

    def _compute_ints(self, value: ir.Value) -> tuple[Dim, ...] | None:
        array = constant_array(value)
        if array is not None:
            if array.dtype.kind not in "iu" or array.ndim > 1:
                return None
            return tuple(Dim(int(x)) for x in array.reshape(-1))
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        op, inputs = node.op_type, node.inputs
        if op == "Constant":
            attr = node.attributes.get("value")
            if attr is None:
                ints = node.attributes.get("value_ints") or node.attributes.get("value_int")
                if ints is None:
                    return None
                data = np.asarray(ints.value).reshape(-1)
            else:
                data = attr.as_tensor().numpy()
                if data.dtype.kind not in "iu":
                    return None
                data = data.reshape(-1)
            return tuple(Dim(int(x)) for x in data)
        if op == "Shape":
            shape = self.shape(inputs[0])
            if shape is None:
                return None
            start = node.attributes.get_int("start", 0)
            end = node.attributes.get_int("end", len(shape))
            return tuple(shape[slice(start, end)])
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze", "Reshape", "Flatten"):
            return self.ints(inputs[0])
        if op == "Concat":
            parts = [self.ints(v) for v in inputs]
            if any(p is None for p in parts):
                return None
            return tuple(d for p in parts for d in p)  # type: ignore[union-attr]
        if op == "Gather":
            vector, positions = self.ints(inputs[0]), self.array(inputs[1])
            if vector is None or positions is None:
                return None
            try:
                return tuple(vector[int(i)] for i in positions.reshape(-1))
            except IndexError:
                return None
        if op == "Slice":
            items = self.ints(inputs[0])
            starts, ends = self.array(inputs[1]), self.array(inputs[2])
            steps = self.array(inputs[4]) if len(inputs) > 4 and inputs[4] else None
            if items is None or starts is None or ends is None or starts.size != 1:
                return None
            step = int(steps.reshape(-1)[0]) if steps is not None else 1
            start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
            end = min(end, len(items)) if end > 0 else max(end, -len(items) - 1)
            return tuple(items[start:end:step])
        if op in ("Mul", "Div", "Add", "Sub") and len(inputs) == 2:
            a, b = self.ints(inputs[0]), self.ints(inputs[1])
            if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
                return None
            n = max(len(a), len(b))
            a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
            out: list[Dim] = []
            for x, y in zip(a, b, strict=True):
                if op == "Mul":
                    out.append(x * y)
                elif op == "Div":
                    q = x.divide(y)
                    if q is None:
                        return None
                    out.append(q)
                elif x.static and y.static:
                    out.append(Dim(x.coef + y.coef if op == "Add" else x.coef - y.coef))
                elif y == Dim(0):
                    out.append(x)
                elif op == "Add" and x == Dim(0):
                    out.append(y)
                elif op == "Add":
                    out.append(sum_dim(x, y))
                else:
                    return None
            return tuple(out)
        return None

    def array(self, value: ir.Value | None) -> np.ndarray | None:
        """An integer input (Slice bounds, axes) as an int64 array when it is static: a
        constant, or a shape computation whose elements are all known numbers."""
        array = constant_array(value)
        if array is not None:
            return array if array.dtype.kind in "iu" else None
        ints = self.ints(value)
        if ints is None or not all(d.static for d in ints):
            return None
        return np.array([d.coef for d in ints], np.int64)

    # ------------------------------------------------------------------------ shapes

    def shape(self, value: ir.Value | None) -> Shape | None:
        """The symbolic shape of `value` (propagated where possible, else recorded)."""
        if value is None:
            return None
        key = id(value)
        if key in self._shapes:
            return self._shapes[key]
        if key in self._busy:
            return self.recorded(value)
        self._busy.add(key)
        try:
            shape = self._propagate(value)
        finally:
            self._busy.discard(key)
        if shape is None:
            shape = self.recorded(value)
        self._shapes[key] = shape
        return shape

    def rank(self, value: ir.Value | None) -> int | None:
        shape = self.shape(value)
        return None if shape is None else len(shape)

    def _propagate(self, value: ir.Value) -> Shape | None:
        if value.const_value is not None:
            return tuple(Dim(int(d)) for d in value.const_value.shape.numpy())
        node = value.producer()
        if node is None or not is_onnx_op(node, *_PROPAGATED):
            return None
        handler = getattr(self, f"_op_{node.op_type}", None)
        if handler is not None:
            return handler(node, value)
        inputs = [self.shape(v) for v in node.inputs if v is not None]
        if any(s is None for s in inputs) or not inputs:
            return None
        if node.op_type == "Where" or node.op_type in _ELEMENTWISE:
            return _broadcast(inputs)  # type: ignore[arg-type]
        return inputs[0] if node.op_type in _SAME_SHAPE else None

    def _op_Constant(self, node: ir.Node, value: ir.Value) -> Shape | None:  # noqa: N802
        attr = node.attributes.get("value")
        if attr is not None:
            return tuple(Dim(int(d)) for d in attr.as_tensor().shape.numpy())
        ints = node.attributes.get("value_ints") or node.attributes.get("value_floats")
        if ints is not None:
            return (Dim(len(ints.value)),)
        return () if node.attributes else None

    def _op_Reshape(self, node: ir.Node, value: ir.Value) -> Shape | None:  # noqa: N802
        source, target = self.shape(node.inputs[0]), self.ints(node.inputs[1])
        if source is None or target is None:
            return None
        allowzero = node.attributes.get_int("allowzero", 0)
        dims: list[Dim | None] = []
        for axis, dim in enumerate(target):
            if dim == Dim(0) and not allowzero:
                if axis >= len(source):
                    return None
                dims.append(source[axis])
            elif dim == Dim(-1):
                dims.append(None)
            else:
                dims.append(dim)
        if dims.count(None) > 1:
            return None
        if None in dims:
            known = product([d for d in dims if d is not None])
            rest = product(source).divide(known)
            if rest is None:
                return None
            dims[dims.index(None)] = rest
        return tuple(d for d in dims if d is not None)

    def _op_Transpose(self, node: ir.Node, value: ir.Value) -> Shape | None:  # noqa: N802
        shape = self.shape(node.inputs[0])
        if shape is None:
            return None
        perm = node.attributes.get_ints("perm", list(reversed(range(len(shape)))))
        return tuple(shape[p] for p in perm)

    def _op_Unsqueeze(self, node: ir.Node, value: ir.Value) -> Shape | None:  # noqa: N802
        shape, axes = self.shape(node.inputs[0]), self.array(node.inputs[1])
        if shape is None or axes is None:
            return None
        rank = len(shape) + axes.size
        wanted = sorted(int(a) % rank for a in axes.reshape(-1))
        dims = list(shape)
        for axis in wanted:
            dims.insert(axis, ONE)
        return tuple(dims)

    def _op_Squeeze(self, node: ir.Node, value: ir.Value) -> Shape | None:  # noqa: N802
        shape = self.shape(node.inputs[0])
        if shape is None:
            return None
        axes = self.array(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None:
            return tuple(d for d in shape if d != ONE) if len(node.inputs) < 2 else None
        drop = {int(a) % len(shape) for a in axes.reshape(-1)}
        return tuple(d for i, d in enumerate(shape) if i not in drop)

    def _op_Expand(self, node: ir.Node, value: ir.Value) -> Shape | None:  # noqa: N802
        shape, target = self.shape(node.inputs[0]), self.ints(node.inputs[1])
        if shape is None or target is None:
            return None
        return _broadcast([shape, target])

    def _op_MatMul(self, node: ir.Node, value: ir.Value) -> Shape | None:  # noqa: N802
        a, b = self.shape(node.inputs[0]), self.shape(node.inputs[1])
        if a is None or b is None or len(a) < 2 or len(b) < 2:
            return None
        batch = _broadcast([a[:-2], b[:-2]]) if len(a) > 2 or len(b) > 2 else ()
        return (*(batch or ()), a[-2], b[-1])

    def _op_Gemm(self, node: ir.Node, value: ir.Value) -> Shape | None:  # noqa: N802
        a, b = self.shape(node.inputs[0]), self.shape(node.inputs[1])
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        m = a[1] if node.attributes.get_int("transA", 0) else a[0]
        n = b[0] if node.attributes.get_int("transB", 0) else b[1]
        return (m, n)

    def _op_Concat(self, node: ir.Node, value: ir.Value) -> Shape | None:  # noqa: N802
        shapes = [self.shape(v) for v in node.inputs]
        if any(s is None for s in shapes) or not shapes:
            return None
        rank = len(shapes[0])  # type: ignore[arg-type]
        axis = node.attributes.get_int("axis", 0) % rank
        total = [s[axis] for s in shapes]  # type: ignore[index]
        if not all(d.static for d in total):
            return None
        out = list(shapes[0])  # type: ignore[arg-type]
        out[axis] = Dim(sum(d.coef for d in total))
        return tuple(out)

    def _op_Slice(self, node: ir.Node, value: ir.Value) -> Shape | None:  # noqa: N802
        shape = self.shape(node.inputs[0])
        parts = [self.array(v) if v is not None else None for v in node.inputs[1:5]]
        parts += [None] * (4 - len(parts))
        if shape is None or parts[0] is None or parts[1] is None:
            return None
        starts, ends = parts[0].reshape(-1), parts[1].reshape(-1)
        axes = parts[2].reshape(-1) if parts[2] is not None else np.arange(starts.size)
        steps = parts[3].reshape(-1) if parts[3] is not None else np.ones(starts.size, np.int64)
        dims = list(shape)
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            size = slice_size(dims[int(axis)], int(start), int(end), int(step))
            if size is None:
                return None
            dims[int(axis)] = size
        return tuple(dims)

    def _op_Gather(self, node: ir.Node, value: ir.Value) -> Shape | None:  # noqa: N802
        data, index = self.shape(node.inputs[0]), self.shape(node.inputs[1])
        if data is None or index is None:
            return None
        axis = node.attributes.get_int("axis", 0) % len(data)
        return (*data[:axis], *index, *data[axis + 1:])

    def _op_Split(self, node: ir.Node, value: ir.Value) -> Shape | None:  # noqa: N802
        shape = self.shape(node.inputs[0])
        if shape is None:
            return None
        axis = node.attributes.get_int("axis", 0) % len(shape)
        sizes = split_sizes(node, shape[axis])
        index = value.index()
        if sizes is None or index is None:
            return None
        return (*shape[:axis], Dim(sizes[index]), *shape[axis + 1:])


def scalar(value: ir.Value | None, depth: int = 0) -> float | None:
    """The number every element of a constant holds (None if not constant or not uniform):
    initializers, Constant/ConstantOfShape, and the scalar arithmetic exporters leave unfolded
    (`Sqrt(CastLike(c, x))`, `1 / c`, Expand and Reshape of a constant)."""
    if value is None or depth > 12:
        return None
    array = constant_array(value)
    if array is None:
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        if op in ("CastLike", "Cast", "Identity", "Expand", "Reshape", "Unsqueeze", "Squeeze"):
            return scalar(node.inputs[0], depth + 1)
        if op in ("Sqrt", "Reciprocal", "Neg"):
            inner = scalar(node.inputs[0], depth + 1)
            if inner is None or (op == "Sqrt" and inner < 0) or (op == "Reciprocal" and not inner):
                return None
            return float(np.sqrt(inner) if op == "Sqrt" else 1.0 / inner if op == "Reciprocal"
                         else -inner)
        if op in ("Mul", "Div") and len(node.inputs) == 2:
            a, b = scalar(node.inputs[0], depth + 1), scalar(node.inputs[1], depth + 1)
            if a is None or b is None or (op == "Div" and not b):
                return None
            return a * b if op == "Mul" else a / b
        array = traced_constant(value, through={"Constant", "ConstantOfShape"})
    if array is None or not array.size or array.dtype.kind not in "fiub":
        return None
    flat = array.reshape(-1)
    if not np.all(flat == flat[0]):
        return None
    return float(flat[0])


_SAME_VALUES = ("Identity", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Slice", "Transpose")


def _lower_bound(value: ir.Value | None, depth: int = 0) -> float | None:
    """A lower bound of every element of `value` when one is evident (ranges, constants)."""
    if value is None or depth > 12:
        return None
    uniform = scalar(value)
    if uniform is not None:
        return uniform
    array = constant_array(value)
    if array is None:
        array = traced_constant(value, through={"Constant", "ConstantOfShape"})
    if array is not None:
        return float(array.min()) if array.size and array.dtype.kind in "iuf" else None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Range":
        start, delta = scalar(node.inputs[0]), scalar(node.inputs[2])
        return start if start is not None and delta is not None and delta > 0 else None
    if node.op_type == "Add":
        bounds = [_lower_bound(v, depth + 1) for v in node.inputs]
        return None if None in bounds else float(sum(b for b in bounds if b is not None))
    if node.op_type in (*_SAME_VALUES, "Cast"):
        return _lower_bound(node.inputs[0], depth + 1)
    return None


def all_true(value: ir.Value | None, depth: int = 0) -> bool:
    """Whether a boolean tensor is evidently true everywhere (constants, `x >= c` for a range
    starting at c or above, And/moves of such tensors)."""
    if value is None or depth > 12:
        return False
    array = constant_array(value)
    if array is not None:
        return array.dtype == np.bool_ and bool(array.all())
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Constant":
        array = traced_constant(value)
        return array is not None and array.dtype == np.bool_ and bool(array.all())
    if node.op_type == "ConstantOfShape":
        attr = node.attributes.get("value")
        fill = attr.as_tensor().numpy() if attr is not None else None
        return fill is not None and fill.dtype == np.bool_ and bool(fill.all())
    if node.op_type == "And":
        return all(all_true(v, depth + 1) for v in node.inputs)
    if node.op_type == "Cast" and node.attributes.get_int("to", 0) == ir.DataType.BOOL:
        number = scalar(node.inputs[0])
        return all_true(node.inputs[0], depth + 1) or (number is not None and number != 0)
    if node.op_type in _SAME_VALUES:
        return all_true(node.inputs[0], depth + 1)
    if node.op_type in ("GreaterOrEqual", "LessOrEqual"):
        big, small = node.inputs if node.op_type == "GreaterOrEqual" else node.inputs[::-1]
        bound, limit = _lower_bound(big), scalar(small)
        return bound is not None and limit is not None and bound >= limit
    return False


def slice_size(dim: Dim, start: int, end: int, step: int) -> Dim | None:
    """The size of `x[start:end:step]` on an axis of size `dim` (None when not computable)."""
    if dim.static:
        return Dim(len(range(*slice(start, end, step).indices(dim.coef))))
    if step == 1 and start >= 0 and end >= _INT_MAX:
        return dim if start == 0 else None
    return None


def split_sizes(node: ir.Node, dim: Dim) -> list[int] | None:
    """The static part sizes of a Split along an axis of size `dim`."""
    sizes = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
    if sizes is None:
        attr = node.attributes.get("split")
        sizes = np.asarray(attr.value) if attr is not None else None
    if sizes is not None:
        return [int(s) for s in sizes.reshape(-1)]
    if not dim.static:
        return None
    parts = len(node.outputs)
    chunk = math.ceil(dim.coef / parts)
    return [min(chunk, dim.coef - i * chunk) for i in range(parts)]


_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Xor", "Equal", "Less", "LessOrEqual",
    "Greater", "GreaterOrEqual", "Max", "Min", "Mod", "BitwiseAnd", "BitwiseOr", "Sum",
})
_SAME_SHAPE = frozenset({
    "Cast", "CastLike", "Identity", "Neg", "Not", "Sqrt", "Reciprocal", "Exp", "Log", "Abs",
    "Relu", "Sigmoid", "Tanh", "Erf", "Softmax", "LogSoftmax", "IsNaN", "IsInf", "Sin", "Cos",
    "LayerNormalization", "Dropout", "Gelu", "Floor", "Ceil", "Round", "Sign",
})
_PROPAGATED = frozenset({
    *_ELEMENTWISE, *_SAME_SHAPE, "Where", "Constant", "Reshape", "Transpose", "Unsqueeze",
    "Squeeze", "Expand", "MatMul", "Gemm", "Concat", "Slice", "Gather", "Split",
})
