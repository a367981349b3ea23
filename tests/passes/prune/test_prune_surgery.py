"""The channel tracer's typed records and handler table, and the surgery that applies them:
hand-built graphs, rewired edges asserted by identity, outputs compared on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from slimgraph.api.prune import prune_with_report
from slimgraph.errors import BadOptionError
from slimgraph.passes.prune import PruneOptions, PrunePass, prepare_for_pruning
from slimgraph.passes.prune._channel_records import (
    ConvGroupRewrite,
    ShapeEntryRewrite,
    SplitRewrite,
)
from slimgraph.passes.prune.channels import Role, analyze_channels
from tests.kit.asserts import assert_fed_by, assert_rewired, assert_same_outputs, check_valid
from tests.kit.graphs import make_model, node_named
from tests.passes.prune.prune_helpers import zero_channels


def _model(nodes, inits: dict[str, np.ndarray]) -> ir.Model:  # noqa: ANN001
    """A graph `x [1, 4, 6, 6] -> ... -> y` of `nodes` (onnx.helper) and initializers."""
    return make_model(nodes, [("x", [1, 4, 6, 6])], ["y"], inits)


def _weights(*shapes: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]


def _conv_relu_conv(unknown: str | None = None) -> ir.Model:
    """x -> Conv c1 (4->8) -> Relu -> [an op the tracer does not know] -> Conv c2 (8->4) -> y."""
    w1, w2 = _weights((8, 4, 3, 3), (4, 8, 1, 1))
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
    ]
    source = "r"
    if unknown is not None:
        nodes.append(helper.make_node(unknown, ["r"], ["u"], name="odd"))
        source = "u"
    nodes.append(helper.make_node("Conv", [source, "w2"], ["y"], name="c2"))
    return _model(nodes, {"w1": w1, "w2": w2})


def test_uses_carry_typed_roles_and_the_weight_axes() -> None:
    prepared = prepare_for_pruning(_conv_relu_conv())
    analysis = analyze_channels(prepared.graph)
    uses = {(use.node.name, use.role): use for use in analysis.weight_uses}
    producer, consumer = uses["c1", Role.PRODUCER], uses["c2", Role.CONSUMER]
    assert (producer.input_index, producer.axis, consumer.axis) == (1, 0, 1)
    assert producer.role == "producer" and isinstance(producer.role, Role)
    assert producer.array().shape == (8, 4, 3, 3)
    (group,) = analysis.prunable_groups
    assert [n.name for n in group.producers] == ["c1"] and group.size == 8


def test_an_op_without_a_handler_blocks_its_group_with_the_reason() -> None:
    prepared = prepare_for_pruning(_conv_relu_conv(unknown="LpNormalization"))
    analysis = analyze_channels(prepared.graph)
    group = next(g for g in analysis.groups if g.size == 8)
    assert group.reasons == ["LpNormalization odd is not understood"]
    assert not analysis.prunable_groups


def test_pad_rewires_the_excluded_consumer_to_the_scatter() -> None:
    model = _conv_relu_conv()
    zeroed, _, count = zero_channels(model, 0.5, pad=False, seed=1)
    assert count == 4
    pruned, report = prune_with_report(zeroed, ratio=0.5, pad=True, exclude=["c2"])
    (group,) = [g for g in report.groups if g.producers == ("c1",)]
    assert (group.channels, group.kept, group.padded) == (8, 4, 1)
    relu, c2 = node_named(pruned, "relu"), node_named(pruned, "c2")
    gather = assert_fed_by(c2, 0, "Gather")  # the excluded conv reads the scatter back
    pad = assert_fed_by(gather, 0, "Pad")
    assert_rewired(pad, 0, relu.outputs[0])
    assert node_named(pruned, "c1").inputs[1].const_value.shape == (4, 4, 3, 3)
    assert c2.inputs[1].const_value.shape == (4, 8, 1, 1)  # excluded: keeps its width
    check_valid(pruned)
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)
    assert_same_outputs(zeroed, pruned, {"x": x})


def test_grouped_conv_and_reshape_records_are_applied() -> None:
    """c1 (4->8) -> grouped Conv (8->8, 4 groups) -> Reshape 6x6 to 3x12 -> Conv c2."""
    w1, wg, w2 = _weights((8, 4, 1, 1), (8, 2, 1, 1), (4, 8, 1, 1), seed=3)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
        helper.make_node("Conv", ["a", "wg"], ["g"], group=4, name="gconv"),
        helper.make_node("Reshape", ["g", "shape"], ["r"], name="reshape"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="c2"),
    ]
    inits = {"w1": w1, "wg": wg, "w2": w2, "shape": np.array([1, 8, 3, 12], np.int64)}
    model = _model(nodes, inits)
    analysis = analyze_channels(prepare_for_pruning(model).graph)
    assert {type(r) for r in analysis.rewrites} == {ConvGroupRewrite, ShapeEntryRewrite}
    conv_group = next(r for r in analysis.rewrites if isinstance(r, ConvGroupRewrite))
    assert (conv_group.node.name, conv_group.out_per_group) == ("gconv", 2)
    shape_entry = next(r for r in analysis.rewrites if isinstance(r, ShapeEntryRewrite))
    assert (shape_entry.node.name, shape_entry.input, shape_entry.axis) == ("reshape", 1, 1)
    zeroed, _, count = zero_channels(model, 0.5, pad=False, seed=0)
    assert count == 2  # two of the four conv groups, two channels each
    pruned = PrunePass(PruneOptions(ratio=0.5))(zeroed).model
    after = {n.name: n for n in pruned.graph}
    assert after["gconv"].attributes.get_int("group") == 2
    assert after["gconv"].inputs[1].const_value.shape == (4, 2, 1, 1)
    assert after["reshape"].inputs[1].const_value.numpy().tolist() == [1, 4, 3, 12]
    assert_rewired(after["gconv"], 0, after["c1"].outputs[0])
    assert_rewired(after["reshape"], 0, after["gconv"].outputs[0])
    check_valid(pruned)
    x = np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32)
    assert_same_outputs(zeroed, pruned, {"x": x})


def test_split_record_sets_the_sizes_of_both_halves() -> None:
    """c1 (4->8) -> Split [4, 4] on the channels -> Concat (halves swapped) -> Conv c2."""
    w1, w2 = _weights((8, 4, 1, 1), (4, 8, 1, 1), seed=4)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="c1"),
        helper.make_node("Split", ["a", "split"], ["s0", "s1"], axis=1, name="split"),
        helper.make_node("Concat", ["s1", "s0"], ["cat"], axis=1, name="cat"),
        helper.make_node("Conv", ["cat", "w2"], ["y"], name="c2"),
    ]
    model = _model(nodes, {"w1": w1, "w2": w2, "split": np.array([4, 4], np.int64)})
    analysis = analyze_channels(prepare_for_pruning(model).graph)
    splits = sorted(r.output for r in analysis.rewrites if isinstance(r, SplitRewrite))
    assert splits == [0, 1]
    zeroed, _, count = zero_channels(model, 0.5, pad=False, seed=5)
    assert count == 4
    pruned, report = prune_with_report(zeroed, ratio=0.5)
    kept = next(layer.kept for layer in report.layers if layer.layer == "c1")
    expected = [sum(k < 4 for k in kept), sum(k >= 4 for k in kept)]
    after = {n.name: n for n in pruned.graph}
    assert after["split"].inputs[1].const_value.numpy().tolist() == expected
    assert_rewired(after["cat"], 0, after["split"].outputs[1])
    assert_rewired(after["cat"], 1, after["split"].outputs[0])
    check_valid(pruned)
    x = np.random.default_rng(2).standard_normal((1, 4, 6, 6)).astype(np.float32)
    assert_same_outputs(zeroed, pruned, {"x": x})


def test_options_are_checked_when_the_pass_runs() -> None:
    options = PruneOptions(ratio=0.5, exclude=["c*"], scope="sideways")
    assert options.exclude == ("c*",)
    with pytest.raises(BadOptionError) as error:
        PrunePass(options)(_conv_relu_conv())
    assert str(error.value) == "scope must be one of local, global, got 'sideways'"
    assert PrunePass(ratio=0.5).options == PruneOptions(ratio=0.5)
