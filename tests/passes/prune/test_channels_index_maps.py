"""Property tests: channel index maps across Concat, Split, Slice and Flatten, and exact removal."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from slimgraph.api.prune import prune_with_report
from slimgraph.passes.prune import prepare_for_pruning
from slimgraph.passes.prune.channels import ChannelGroup, analyze_channels, reshape_channel_map
from tests.kit.asserts import assert_same_outputs, check_valid
from tests.passes.prune.prune_helpers import zero_channels


@st.composite
def concat_split_flatten(draw):
    a, b = draw(st.integers(2, 6)), draw(st.integers(2, 6))
    h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    total = a + b
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), max_size=2)))
    sizes = [hi - lo for lo, hi in zip([0, *cuts], [*cuts, total], strict=True)]
    lo = draw(st.integers(0, total - 1))
    hi = draw(st.integers(lo + 1, total))
    return a, b, h, w, sizes, (lo, hi)


def _build(a, b, h, w, sizes, bounds, seed=0) -> ir.Model:
    """x -> convA, convB -> Concat -> Relu -> Split -> Flatten -> Gemm (summed), plus
    Concat -> Slice -> ReduceMean -> MatMul (added): one output y of 5 features."""
    rng = np.random.default_rng(seed)
    out = 5
    inits = [
        numpy_helper.from_array(rng.standard_normal((a, 3, 1, 1)).astype(np.float32), "wa"),
        numpy_helper.from_array(rng.standard_normal((b, 3, 1, 1)).astype(np.float32), "wb"),
        numpy_helper.from_array(rng.standard_normal(a).astype(np.float32), "ba"),
        numpy_helper.from_array(np.array(sizes, np.int64), "split"),
        numpy_helper.from_array(np.array([bounds[0]], np.int64), "lo"),
        numpy_helper.from_array(np.array([bounds[1]], np.int64), "hi"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "spatial"),
        numpy_helper.from_array(
            rng.standard_normal((bounds[1] - bounds[0], out)).astype(np.float32), "wm"
        ),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["A"], name="convA"),
        helper.make_node("Conv", ["x", "wb"], ["B"], name="convB"),
        helper.make_node("Concat", ["A", "B"], ["C"], axis=1, name="cat"),
        helper.make_node("Relu", ["C"], ["R"], name="relu"),
        helper.make_node("Split", ["R", "split"], [f"P{k}" for k in range(len(sizes))], axis=1,
                         name="split"),  # fmt: skip
        helper.make_node("Slice", ["C", "lo", "hi", "axis1"], ["S"], name="slice"),
        helper.make_node("ReduceMean", ["S", "spatial"], ["M"], keepdims=0, name="mean"),
        helper.make_node("MatMul", ["M", "wm"], ["Ym"], name="mm"),
    ]
    terms = ["Ym"]
    for k, size in enumerate(sizes):
        weight = rng.standard_normal((out, size * h * w)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"wg{k}"))
        nodes += [
            helper.make_node("Flatten", [f"P{k}"], [f"F{k}"], axis=1, name=f"flat{k}"),
            helper.make_node("Gemm", [f"F{k}", f"wg{k}"], [f"Y{k}"], transB=1, name=f"fc{k}"),
        ]
        terms.append(f"Y{k}")
    nodes.append(helper.make_node("Sum", terms, ["y"], name="sum"))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", out])],
        inits,
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def _group_of(groups: list[ChannelGroup], producer: str) -> ChannelGroup:
    return next(g for g in groups if any(n.name == producer for n in g.producers))


def _map(group: ChannelGroup, value_name: str) -> np.ndarray:
    return next(m.index_map for m in group.members if m.value.name == value_name)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(concat_split_flatten())
def test_channels_index_maps_concat_split_flatten(case) -> None:
    a, b, h, w, sizes, bounds = case
    model = prepare_for_pruning(_build(a, b, h, w, sizes, bounds))
    groups = analyze_channels(model.graph).groups
    group_a, group_b = _group_of(groups, "convA"), _group_of(groups, "convB")
    assert (group_a.size, group_b.size) == (a, b)
    assert group_a.prunable and group_b.prunable
    concat = {
        "A": np.r_[np.arange(a), -np.ones(b, int)],
        "B": np.r_[-np.ones(a, int), np.arange(b)],
    }
    for group, name in ((group_a, "A"), (group_b, "B")):
        np.testing.assert_array_equal(_map(group, name), np.arange(group.size))
        np.testing.assert_array_equal(_map(group, "C"), concat[name])
        np.testing.assert_array_equal(_map(group, "R"), concat[name])
        start = 0
        for k, size in enumerate(sizes):
            part = concat[name][start : start + size]
            start += size
            if (part < 0).all():
                assert not any(m.value.name == f"P{k}" for m in group.members)
                continue
            np.testing.assert_array_equal(_map(group, f"P{k}"), part)
            np.testing.assert_array_equal(_map(group, f"F{k}"), np.repeat(part, h * w))
        sliced = concat[name][bounds[0] : bounds[1]]
        if (sliced >= 0).any():
            np.testing.assert_array_equal(_map(group, "S"), sliced)
            np.testing.assert_array_equal(_map(group, "M"), sliced)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(concat_split_flatten(), st.integers(0, 1000), st.booleans())
def test_channels_removal_exact_through_concat_split_flatten(case, seed, pad) -> None:
    a, b, h, w, sizes, bounds = case
    model = _build(a, b, h, w, sizes, bounds, seed=seed)
    zeroed, _, count = zero_channels(model, 0.5, pad=pad, seed=seed)
    pruned, report = prune_with_report(zeroed, ratio=0.5, pad=pad)
    assert sum(g.channels - g.kept for g in report.groups) == count
    check_valid(pruned)
    x = np.random.default_rng(seed).standard_normal((2, 3, h, w)).astype(np.float32)
    assert_same_outputs(zeroed, pruned, {"x": x})


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=3),
    st.integers(2, 5),
    st.lists(st.integers(1, 4), min_size=0, max_size=2),
)
def test_channels_reshape_map_merges_trailing_axes(lead, channels, trail) -> None:
    dims = [*lead, channels, *trail]
    axis = len(lead)
    inner = int(np.prod(trail)) if trail else 1
    flat = [*lead, channels * inner]
    out_axis, positions = reshape_channel_map(dims, axis, flat)
    # a tensor whose value is its channel index: reshaping must put channel c at positions[c]
    tensor = np.broadcast_to(
        np.arange(channels).reshape([1] * axis + [channels] + [1] * len(trail)), dims
    ).reshape(flat)
    taken = np.moveaxis(tensor, out_axis, -1).reshape(-1, flat[out_axis])[0]
    for c in range(channels):
        assert (taken[positions[c]] == c).all()
    # splitting the channel axis (a channel shuffle, attention heads) is refused
    split = [*lead, 2, channels, *trail]
    assert reshape_channel_map([*lead, channels * 2, *trail], axis, split) is None
