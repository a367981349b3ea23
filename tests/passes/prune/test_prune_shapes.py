"""Shapes at fixed symbolic sizes, and where an entry of a computed shape tensor comes from."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import helper

from slimgraph.ir import metadata
from slimgraph.passes.prune._shapes import (
    annotate_static_shapes,
    dims,
    forget_static_shapes,
    shape_entry,
)
from tests.kit.graphs import make_model, node_named


def _view_model() -> ir.Model:
    """y = x.view(b, s, 2, 4) with the shape built from Shape(x) as exporters write it, plus
    probes: Shape with a start, a negative Gather, an unsqueezed scalar and arithmetic."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["b"], name="batch"),
        helper.make_node("Slice", ["s", "one", "two"], ["t"], name="seq"),
        helper.make_node("Unsqueeze", ["two_scalar", "zero"], ["heads"], name="heads"),
        helper.make_node("Concat", ["b", "t", "heads", "four"], ["shape4"], axis=0, name="cat"),
        helper.make_node("Reshape", ["x", "shape4"], ["y"], name="view"),
        helper.make_node("Shape", ["x"], ["tail"], start=1, name="tail"),
        helper.make_node("Gather", ["s", "minus1"], ["c"], name="last"),
        helper.make_node("Mul", ["b", "t"], ["bt"], name="bt"),
        helper.make_node("Concat", ["bt", "c", "tail"], ["probe"], axis=0, name="probe"),
        helper.make_node("Reshape", ["x", "probe"], ["z"], name="probe_view", allowzero=0),
    ]
    arrays = {
        "zero": np.array([0], np.int64), "one": np.array([1], np.int64),
        "two": np.array([2], np.int64), "minus1": np.array([-1], np.int64),
        "two_scalar": np.array(2, np.int64), "four": np.array([4], np.int64),
    }  # fmt: skip
    return make_model(nodes, [("x", ["batch", "seq", 8])], ["y", "z"], arrays, check=False)


def test_shape_entry_follows_concat_gather_slice_and_shape() -> None:
    model = _view_model()
    view, cat = node_named(model, "view"), node_named(model, "cat")
    x = model.graph.inputs[0]
    batch, seq = shape_entry(view, 1, 0), shape_entry(view, 1, 1)
    assert (batch.source, batch.axis, seq.source, seq.axis) == (x, 0, x, 1)
    heads = shape_entry(view, 1, 2)  # an unsqueezed scalar constant
    unsqueeze = node_named(model, "heads")
    assert (heads.constant, heads.index) == (2, 0)
    assert heads.path == ((view, 1), (cat, 2), (unsqueeze, 0))
    width = shape_entry(view, 1, 3)
    assert (width.constant, width.path, width.index) == (4, ((view, 1), (cat, 3)), 0)


def test_shape_entry_names_what_computes_it() -> None:
    model = _view_model()
    probe = node_named(model, "probe_view")
    x = model.graph.inputs[0]
    assert shape_entry(probe, 1, 0).reason == "Mul bt computes it"
    last = shape_entry(probe, 1, 1)  # Gather(Shape(x), [-1])
    assert (last.source, last.axis) == (x, 2)
    tail = shape_entry(probe, 1, 3)  # Shape(x, start=1), second entry
    assert (tail.source, tail.axis, tail.constant) == (x, 2, None)
    assert shape_entry(probe, 1, 4).reason == "Concat probe is shorter than entry 4"


def test_static_shapes_recorded_and_forgotten() -> None:
    model = _view_model()
    y = model.graph.outputs[0]
    assert annotate_static_shapes(model, {"batch": 3}) > 0
    assert y.meta[metadata.STATIC_SHAPE] == (3, 1, 2, 4)
    assert dims(y) == [3, 1, 2, 4]
    four = node_named(model, "cat").inputs[3]
    assert dims(four) == [1]  # a static shape of its own is read as it is
    forget_static_shapes(model.graph)
    assert metadata.STATIC_SHAPE not in y.meta
    assert dims(y) == (None if y.shape is None else list(y.shape))
