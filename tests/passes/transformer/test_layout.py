"""The matcher's building blocks on hand-built graphs: symbolic shapes through run-time shape
computations, and layouts (which source element each element of a moved tensor is) checked
element by element against numpy for random chains of Reshape, Transpose, Slice, Unsqueeze,
Squeeze and Expand (hypothesis)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from hypothesis import given, settings
from hypothesis import strategies as st

from slimgraph.passes.transformer._layout import Layout, step
from slimgraph.passes.transformer._symbolic import Dim, ShapeInfo, all_true, scalar


def _const(array: np.ndarray) -> ir.Value:
    return ir.Value(name=None, const_value=ir.tensor(array), shape=ir.Shape(array.shape),
                    type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))


def _apply(ops: list[tuple[str, object]], shape: tuple[int, ...]) -> tuple[np.ndarray, Layout]:
    """Run `ops` on numpy (the data: each element's own source index) and on a layout."""
    data = np.arange(int(np.prod(shape))).reshape(shape)
    source = ir.Value(name="x", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.INT64))
    shapes = ShapeInfo()
    layout = Layout.identity(tuple(Dim(d) for d in shape))
    value = source
    for op, arg in ops:
        if op == "Transpose":
            node = ir.node("Transpose", [value], attributes={"perm": list(arg)})  # type: ignore[arg-type]
            data = np.transpose(data, arg)  # type: ignore[arg-type]
        elif op == "Reshape":
            node = ir.node("Reshape", [value, _const(np.array(arg, np.int64))])
            data = data.reshape(arg)  # type: ignore[arg-type]
        elif op == "Slice":
            axis, start, end = arg  # type: ignore[misc]
            node = ir.node("Slice", [value, _const(np.array([start])), _const(np.array([end])),
                                     _const(np.array([axis]))])
            data = np.take(data, range(start, end), axis=axis)
        elif op == "Unsqueeze":
            node = ir.node("Unsqueeze", [value, _const(np.array([arg], np.int64))])
            data = np.expand_dims(data, arg)  # type: ignore[arg-type]
        else:  # Expand a size-1 axis
            target = [1] * data.ndim
            target[arg] = 3  # type: ignore[index]
            node = ir.node("Expand", [value, _const(np.array(target, np.int64))])
            data = np.broadcast_to(data, np.broadcast_shapes(data.shape, tuple(target)))
        layout = step(layout, node, node.outputs[0], shapes)
        value = node.outputs[0]
    return data, layout


def _predicted(layout: Layout, shape: tuple[int, ...]) -> np.ndarray:
    """The source index of every element, read off the layout."""
    sizes = [int(np.prod([a.size.coef for a in axis])) if axis else 1 for axis in layout.axes]
    out = np.zeros(sizes, np.int64)
    for index in np.ndindex(*sizes):
        position = list(layout.offsets)
        for axis, i in zip(layout.axes, index, strict=True):
            for atom in reversed(axis):
                i, within = divmod(i, atom.size.coef)
                if atom.axis is not None:
                    position[atom.axis] += within * atom.stride.coef
        out[index] = np.ravel_multi_index(position, shape)
    return out


@st.composite
def chains(draw: st.DrawFn) -> tuple[tuple[int, ...], list[tuple[str, object]]]:
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4, 6]), min_size=1, max_size=3)))
    current = list(shape)
    ops: list[tuple[str, object]] = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["Transpose", "Reshape", "Slice", "Unsqueeze", "Expand"]))
        if kind == "Transpose":
            perm = draw(st.permutations(range(len(current))))
            ops.append((kind, tuple(perm)))
            current = [current[p] for p in perm]
        elif kind == "Reshape":
            total = int(np.prod(current))
            dims = []
            while total > 1 and len(dims) < 3:
                factors = [f for f in (2, 3, 4, 6) if total % f == 0]
                if not factors:
                    break
                factor = draw(st.sampled_from(factors))
                dims.append(factor)
                total //= factor
            dims.append(total)
            dims = draw(st.permutations(dims))
            ops.append((kind, list(dims)))
            current = list(dims)
        elif kind == "Slice":
            axis = draw(st.integers(0, len(current) - 1))
            start = draw(st.integers(0, current[axis] - 1))
            end = draw(st.integers(start + 1, current[axis]))
            ops.append((kind, (axis, start, end)))
            current[axis] = end - start
        elif kind == "Unsqueeze":
            axis = draw(st.integers(0, len(current)))
            ops.append((kind, axis))
            current.insert(axis, 1)
        else:
            ones = [i for i, d in enumerate(current) if d == 1]
            if not ones:
                continue
            axis = draw(st.sampled_from(ones))
            ops.append((kind, axis))
            current[axis] = 3
    return shape, ops


@settings(max_examples=150, deadline=None)
@given(chains())
def test_layout_predicts_every_element_of_a_moved_tensor(chain) -> None:  # noqa: ANN001
    shape, ops = chain
    try:
        data, layout = _apply(ops, shape)
    except Exception as error:  # a Reshape mixing a sliced axis: the layout refuses, never lies
        assert type(error).__name__ == "LayoutError", error
        return
    np.testing.assert_array_equal(_predicted(layout, shape), data)


def test_symbolic_shapes_follow_runtime_shape_computations() -> None:
    """`Reshape(x, Concat(Shape(x)[0:1], [-1], [8]))` on x [batch, seq, 32] is
    [batch, 4 * seq, 8]: the -1 is a monomial of the graph's symbols."""
    x = ir.Value(name="x", shape=ir.Shape(["batch", "seq", 32]),
                 type=ir.TensorType(ir.DataType.FLOAT))
    shape = ir.node("Shape", [x], attributes={"start": 0, "end": 1})
    target = ir.node("Concat", [shape.outputs[0], _const(np.array([-1, 8], np.int64))],
                     attributes={"axis": 0})
    reshape = ir.node("Reshape", [x, target.outputs[0]])
    info = ShapeInfo()
    assert info.shape(reshape.outputs[0]) == (Dim(1, ("batch",)), Dim(4, ("seq",)), Dim(8))
    layout = step(Layout.identity(info.shape(x)), reshape, reshape.outputs[0], info)  # type: ignore[arg-type]
    # the sequence axis and the features' first quarter merged: the heads are not split out
    assert [len(axis) for axis in layout.axes] == [1, 2, 1]


def test_scalars_and_always_true_masks_are_read_through_exporter_arithmetic() -> None:
    half = _const(np.array(0.25, np.float32))
    like = ir.Value(name="q", type=ir.TensorType(ir.DataType.FLOAT))
    sqrt = ir.node("Sqrt", [ir.node("CastLike", [half, like]).outputs[0]])
    assert scalar(sqrt.outputs[0]) == 0.5
    positions = ir.node("Range", [_const(np.array(0)), ir.Value(name="n"), _const(np.array(1))])
    shifted = ir.node("Add", [positions.outputs[0], _const(np.array(0))])
    ge = ir.node("GreaterOrEqual", [shifted.outputs[0], _const(np.array(0))])
    assert all_true(ge.outputs[0])
    lt = ir.node("Less", [shifted.outputs[0], _const(np.array(3))])
    assert not all_true(lt.outputs[0])
