"""Channels traced through views computed from symbolic dimensions, and weights shared by nodes.

The view graph is GPT-2's Conv1D in miniature, in the form the dynamo exporter writes it:
`x.view(-1, c) @ W + b` as a Gemm on a flattened view, then `.view(b, s, n)` with a shape built by
`Shape -> Gather -> Concat` from the symbolic batch and sequence. Two FFN branches read the same
shape tensor (as after CSE), so pruning them to different widths must give each its own copy.
The shared graph runs two inputs through one weight (ALBERT's sharing in miniature).
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from slimgraph import runtime
from slimgraph.api.prune import prune_with_report
from slimgraph.errors import UnsupportedModelError
from slimgraph.ir.analysis import parameter_count
from tests.kit.asserts import assert_same_outputs, check_valid, raises_exactly
from tests.kit.graphs import make_model, node_named
from tests.passes.prune.prune_helpers import zero_channels


def _views_model() -> object:
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "i0"], ["b"], name="batch"),
        helper.make_node("Gather", ["s", "i1"], ["t"], name="seq"),
        helper.make_node("Concat", ["b", "t", "c16"], ["shape16"], axis=0, name="cat16"),
        helper.make_node("Concat", ["b", "t", "c8"], ["shape8"], axis=0, name="cat8"),
        helper.make_node("Mul", ["b", "t"], ["bt"], name="bt"),
        helper.make_node("Concat", ["bt", "minus1"], ["flat"], axis=0, name="flat"),  # [b*s, -1]
        helper.make_node("Reshape", ["x", "rows8"], ["v0"], name="view0"),
    ]
    for k, act in ((1, "Relu"), (2, "Tanh")):
        nodes += [
            helper.make_node("Gemm", ["v0", f"w{k}", f"b{k}"], [f"h{k}"], name=f"fc{k}"),
            helper.make_node("Reshape", [f"h{k}", "shape16"], [f"h{k}v"], name=f"view{k}a"),
            helper.make_node(act, [f"h{k}v"], [f"a{k}"], name=f"act{k}"),
            helper.make_node("Reshape", [f"a{k}", "flat"], [f"a{k}f"], name=f"view{k}b"),
            helper.make_node("Gemm", [f"a{k}f", f"p{k}", f"q{k}"], [f"y{k}"], name=f"proj{k}"),
            helper.make_node("Reshape", [f"y{k}", "shape8"], [f"y{k}v"], name=f"view{k}c"),
        ]
    nodes.append(helper.make_node("Add", ["y1v", "y2v"], ["y"], name="sum"))
    arrays = {
        "i0": np.array([0], np.int64), "i1": np.array([1], np.int64),
        "c16": np.array([16], np.int64), "c8": np.array([8], np.int64),
        "minus1": np.array([-1], np.int64), "rows8": np.array([-1, 8], np.int64),
        "w1": w(8, 16), "b1": w(16), "p1": w(16, 8), "q1": w(8),
        "w2": w(8, 16), "b2": w(16), "p2": w(16, 8), "q2": w(8),
    }  # fmt: skip
    return make_model(nodes, [("x", ["batch", "seq", 8])], ["y"], arrays)


def _feeds(batch: int = 3, seq: int = 5) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((batch, seq, 8)).astype(np.float32)}


def test_prune_views_each_reshape_gets_its_own_width() -> None:
    model = _views_model()
    pruned, report = prune_with_report(model, layer_ratios={"fc1": 0.5, "fc2": 0.25})
    assert [(g.producers, g.kept) for g in report.groups if g.kept < g.channels] == [
        (("fc1",), 8),
        (("fc2",), 12),
    ]
    check_valid(pruned)
    for k, width in ((1, 8), (2, 12)):
        assert node_named(pruned, f"fc{k}").inputs[1].shape == (8, width)
        view = node_named(pruned, f"view{k}a")  # b, s from the input's shape, then the width
        shape = view.inputs[1].producer()
        assert shape is not None and shape.op_type == "Concat"
        assert shape.inputs[2].const_value.numpy().tolist() == [width]
        assert shape.inputs[0].producer().name == "batch"  # still computed: batch stays symbolic
    # the shared shape tensor was copied for one branch, never rewritten for both
    assert len({id(node_named(pruned, f"view{k}a").inputs[1]) for k in (1, 2)}) == 2
    assert [str(v.shape) for v in pruned.graph.outputs] == ["[batch,seq,8]"]
    out = runtime.run(runtime.create_session(pruned, threads=1), _feeds())
    assert out["y"].shape == (3, 5, 8)


def test_prune_views_exact_on_zeroed_channels() -> None:
    zeroed, _, count = zero_channels(_views_model(), 0.5, pad=False, seed=2)
    pruned, report = prune_with_report(zeroed, ratio=0.5)
    assert count == 16 and sum(g.channels - g.kept for g in report.groups) == count
    assert_same_outputs(zeroed, pruned, _feeds())
    assert_same_outputs(zeroed, pruned, _feeds(batch=1, seq=7))


def _shared_model() -> object:
    """out = relu(x1 @ W + c) @ V + relu(x2 @ W + c) @ V: W, c and V read twice."""
    rng = np.random.default_rng(3)
    nodes = []
    for k in (1, 2):
        nodes += [
            helper.make_node("MatMul", [f"x{k}", "W"], [f"h{k}"], name=f"up{k}"),
            helper.make_node("Add", [f"h{k}", "c"], [f"g{k}"], name=f"bias{k}"),
            helper.make_node("Relu", [f"g{k}"], [f"r{k}"], name=f"relu{k}"),
            helper.make_node("MatMul", [f"r{k}", "V"], [f"y{k}"], name=f"down{k}"),
        ]
    nodes.append(helper.make_node("Add", ["y1", "y2"], ["out"], name="sum"))
    arrays = {
        "W": rng.standard_normal((8, 16)).astype(np.float32),
        "c": rng.standard_normal(16).astype(np.float32),
        "V": rng.standard_normal((16, 4)).astype(np.float32),
    }
    return make_model(nodes, [("x1", ["batch", 8]), ("x2", ["batch", 8])], ["out"], arrays)


def test_prune_shared_weight_pruned_once_and_kept_shared() -> None:
    model = _shared_model()
    pruned, report = prune_with_report(model, ratio=0.5)
    (group,) = [g for g in report.groups if g.channels == 16]
    assert (group.kept, group.producers) == (8, ("up1", "up2"))
    up1, up2 = node_named(pruned, "up1"), node_named(pruned, "up2")
    assert up1.inputs[1] is up2.inputs[1] and up1.inputs[1].shape == (8, 8)
    assert node_named(pruned, "down1").inputs[1] is node_named(pruned, "down2").inputs[1]
    assert parameter_count(pruned) == report.params_after == 8 * 8 + 8 + 8 * 4
    assert report.params_before == parameter_count(model) == 8 * 16 + 16 + 16 * 4
    feeds = {f"x{k}": np.ones((2, 8), np.float32) * k for k in (1, 2)}
    zeroed, _, count = zero_channels(model, 0.5, pad=False, seed=5)
    assert count == 8
    assert_same_outputs(zeroed, prune_with_report(zeroed, ratio=0.5)[0], feeds)


def test_prune_shared_weight_with_an_excluded_reader_is_left_alone() -> None:
    model = _shared_model()
    message = (  # V's rows are down2's input channels too, which up2's exclusion keeps
        "nothing to prune: no channel group can shrink (V is shared with down2, which is not "
        "pruned with it; W is shared with up2, which is not pruned with it; c is shared with "
        "bias2, which is not pruned with it)"
    )
    with raises_exactly(UnsupportedModelError, message):
        prune_with_report(model, ratio=0.5, exclude=["up2"])


def _layer_norm_model(axis: int) -> object:
    """conv(4 -> 8, k1) -> LayerNormalization(axis) -> conv(8 -> 5, k1), over [batch, C, 6]."""
    rng = np.random.default_rng(6)
    arrays = {
        "w1": rng.standard_normal((8, 4, 1)).astype(np.float32),
        "w2": rng.standard_normal((5, 8, 1)).astype(np.float32),
        "g": rng.uniform(0.5, 1.5, 6 if axis == -1 else (8, 6)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
        helper.make_node("LayerNormalization", ["c", "g"], ["n"], axis=axis, name="norm"),
        helper.make_node("Conv", ["n", "w2"], ["y"], name="conv2"),
    ]
    return make_model(nodes, [("x", ["batch", 4, 6])], ["y"], arrays)


def test_prune_layer_norm_passes_channels_before_its_axes_only() -> None:
    pruned, _ = prune_with_report(_layer_norm_model(-1), ratio=0.5)
    assert node_named(pruned, "conv2").inputs[1].shape == (5, 4, 1)
    assert node_named(pruned, "norm").inputs[1].shape == (6,)  # over time: not per channel
    out = runtime.run(runtime.create_session(pruned, threads=1), {"x": np.ones((2, 4, 6), "f")})
    assert out["y"].shape == (2, 5, 6)
    message = (
        "nothing to prune: no channel group can shrink (LayerNormalization norm normalizes over "
        "the channels; y is a graph output)"
    )
    with raises_exactly(UnsupportedModelError, message):
        prune_with_report(_layer_norm_model(1), ratio=0.5)
