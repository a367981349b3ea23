"""TuckerConv: Tucker-2 of convolutions (and SVD of 1x1 convs), on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from slimgraph.errors import UnsupportedModelError
from slimgraph.passes.lowrank import TuckerConv, tucker2
from tests.kit.asserts import assert_close, outputs_of
from tests.kit.graphs import conv_model, initializer_array, make_model


def _w(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize(
    ("weight_shape", "x_shape", "attributes"),
    [
        ((16, 8, 3, 3), (2, 8, 12, 12), {"pads": [1, 1, 1, 1]}),
        ((12, 10, 3, 3), (1, 10, 13, 11), {"strides": [2, 2], "pads": [1, 0, 2, 1]}),
        ((8, 6, 3, 3), (1, 6, 14, 14), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
        ((8, 6, 5, 3), (1, 6, 11, 9), {"auto_pad": "SAME_UPPER", "strides": [2, 1]}),
        ((10, 4, 5), (2, 4, 20), {"pads": [2, 2], "strides": [3]}),  # 1-D conv
        ((6, 4, 3, 3, 3), (1, 4, 5, 6, 7), {"pads": [1] * 6}),  # 3-D conv
    ],
)
def test_full_rank_tucker_reproduces_the_conv(
    weight_shape: tuple[int, ...], x_shape: tuple[int, ...], attributes: dict[str, object]
) -> None:
    weight = _w(*weight_shape)
    bias = _w(weight_shape[0], seed=5)
    model = conv_model(weight, x_shape, bias=bias, **attributes)
    x = _w(*x_shape, seed=1)
    reference = outputs_of(model, {"x": x})["y"]
    result = TuckerConv(rank_ratio=1.0, allow_growth=True)(model)
    (layer,) = result.layers
    assert layer.method == "tucker2" and layer.rank == (weight_shape[1], weight_shape[0])
    assert [n.op_type for n in result.model.graph] == ["Conv", "Conv", "Conv"]
    first, core, last = result.model.graph
    assert list(first.attributes["kernel_shape"].value) == [1] * (len(weight_shape) - 2)
    assert list(core.attributes["kernel_shape"].value) == list(weight_shape[2:])
    assert len(last.inputs) == 3 and last.inputs[2].name == "b"  # the bias moves to the last
    assert layer.weight_error < 1e-6
    assert_close(reference, outputs_of(result.model, {"x": x})["y"])
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)


def test_truncated_tucker_chain_equals_the_conv_with_the_reconstructed_weight() -> None:
    """The three convs compute exactly the conv with W~ = G x_0 U_out x_1 U_in, and ||W - W~||
    obeys the HOSVD bound: ||W - W~||_F^2 <= dropped mode-0 + dropped mode-1 energy."""
    weight = _w(24, 16, 3, 3)
    bias = _w(24, seed=2)
    x = _w(2, 16, 10, 10, seed=1)
    model = conv_model(weight, (2, 16, 10, 10), bias=bias, pads=[1, 1, 1, 1], strides=[2, 2])
    result = TuckerConv(rank_ratio=0.5)(model.clone())
    (layer,) = result.layers
    assert layer.rank == (8, 12)
    assert layer.params_after == 8 * 16 + 12 * 8 * 9 + 24 * 12 + 24
    assert layer.params_before == 24 * 16 * 9 + 24
    u_in_t = initializer_array(result.model, ".tucker_in").reshape(8, 16).astype(np.float64)
    core = initializer_array(result.model, ".tucker_core").astype(np.float64)
    u_out = initializer_array(result.model, ".tucker_out").reshape(24, 12).astype(np.float64)
    approx = np.einsum("abhw,oa,bi->oihw", core, u_out, u_in_t)
    equivalent = conv_model(approx, (2, 16, 10, 10), bias=bias, pads=[1, 1, 1, 1], strides=[2, 2])
    assert_close(outputs_of(equivalent, {"x": x})["y"], outputs_of(result.model, {"x": x})["y"])
    w = weight.astype(np.float64)
    s0 = np.linalg.svd(w.reshape(24, -1), compute_uv=False)
    s1 = np.linalg.svd(np.swapaxes(w, 0, 1).reshape(16, -1), compute_uv=False)
    bound = np.sqrt(np.sum(s0[12:] ** 2) + np.sum(s1[8:] ** 2)) / np.linalg.norm(w)
    error = np.linalg.norm(w - approx) / np.linalg.norm(w)
    assert layer.weight_error == pytest.approx(error, rel=1e-5)
    assert error <= bound * (1 + 1e-6)
    # MACs: 1x1 at the input resolution, the core and the last 1x1 at the output's (5 x 5)
    assert layer.macs_before == 2 * 25 * 24 * 16 * 9
    assert layer.macs_after == 2 * 100 * 16 * 8 + 2 * 25 * (8 * 12 * 9 + 12 * 24)


def test_error_budget_holds_for_the_weight() -> None:
    weight = _w(32, 24, 3, 3)
    for budget in (0.3, 0.6, 0.9):
        result = TuckerConv(error_budget=budget, allow_growth=True)(
            conv_model(weight, (1, 24, 8, 8), pads=[1, 1, 1, 1])
        )
        assert result.layers[0].weight_error <= budget


def test_tucker2_matches_the_hosvd_definition() -> None:
    # Truncated ranks: any orthonormal bases would reconstruct W at full rank, so check that
    # each basis spans the leading left singular vectors of its unfolding (numpy's SVD), and
    # that the core is W projected on both.
    weight = _w(8, 6, 3, 3).astype(np.float64)
    u_out, core, u_in = tucker2(weight, 5, 4)
    for basis, mode, k in ((u_out, 0, 5), (u_in, 1, 4)):
        np.testing.assert_allclose(basis.T @ basis, np.eye(k), atol=1e-10)
        unfolding = np.moveaxis(weight, mode, 0).reshape(weight.shape[mode], -1)
        leading = np.linalg.svd(unfolding)[0][:, :k]
        np.testing.assert_allclose(basis @ basis.T, leading @ leading.T, atol=1e-8)
    expected = np.einsum("oihw,oa,ib->abhw", weight, u_out, u_in)
    np.testing.assert_allclose(core, expected, atol=1e-10)


@pytest.mark.parametrize(
    ("group", "weight_shape", "kind"),
    [(4, (16, 4, 3, 3), "grouped"), (16, (16, 1, 3, 3), "depthwise")],
)
def test_grouped_and_depthwise_convs_are_skipped_with_the_reason(
    group: int, weight_shape: tuple[int, ...], kind: str
) -> None:
    model = conv_model(_w(*weight_shape), (1, 16, 8, 8), group=group, pads=[1, 1, 1, 1])
    result = TuckerConv(rank_ratio=0.25)(model)
    assert not result.modified
    (skip,) = result.skipped
    assert skip.reason.startswith(f"{kind} conv (group={group})")


def test_pointwise_convs_are_skipped_unless_asked_then_split_by_svd() -> None:
    weight = _w(32, 24, 1, 1)
    bias = _w(32, seed=3)
    x = _w(1, 24, 9, 9, seed=1)
    model = conv_model(weight, (1, 24, 9, 9), bias=bias, strides=[2, 2], pads=[1, 1, 1, 1])
    skipped = TuckerConv(rank_ratio=0.25)(model.clone())
    assert "pointwise=True" in skipped.skipped[0].reason
    reference = outputs_of(model, {"x": x})["y"]
    full = TuckerConv(rank_ratio=1.0, pointwise=True, allow_growth=True)(model.clone())
    assert [n.op_type for n in full.model.graph] == ["Conv", "Conv"]
    assert full.layers[0].method == "svd" and full.layers[0].rank == (24,)
    assert_close(reference, outputs_of(full.model, {"x": x})["y"])
    low = TuckerConv(rank=6, pointwise=True)(model.clone())
    assert low.layers[0].params_after == 6 * (32 + 24) + 32


def test_non_constant_weight_skips_or_fails_when_included() -> None:
    model = conv_model(_w(8, 4, 3, 3), (1, 4, 6, 6))
    graph = model.graph
    weight = graph.initializers.pop("W")
    graph.inputs.append(weight)  # the weight becomes a run-time input
    weight.const_value = None
    result = TuckerConv(rank_ratio=0.5)(model.clone())
    assert "is not a constant" in result.skipped[0].reason
    with pytest.raises(
        UnsupportedModelError, match=r"layer 'conv' \(Conv\) was included but its weight 'W'"
    ):
        TuckerConv(rank_ratio=0.5, include=["conv"])(model)


def _conv_with_a_computed_bias() -> ir.Model:
    """A bias-free conv as torch exports it: a zero bias expanded to Shape(W)[0:1] at run time."""
    nodes = [
        onnx.helper.make_node("Shape", ["W"], ["c_out"], end=1),
        onnx.helper.make_node("Expand", ["zero", "c_out"], ["b"]),
        onnx.helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    return make_model(nodes, [("x", [1, 8, 6, 6])], ["y"],
                      {"W": _w(16, 8, 3, 3), "zero": np.zeros((1,), np.float32)})  # fmt: skip


@pytest.mark.parametrize("fold", [True, False])
def test_a_replaced_weight_read_by_shape_alone_leaves_the_model(fold: bool) -> None:
    # a pipeline step once kept W in the file for the bias's Shape(W) alone
    x = {"x": _w(1, 8, 6, 6, seed=3)}
    folded = _conv_with_a_computed_bias()
    assert TuckerConv(rank_ratio=0.5)(folded).modified
    model = _conv_with_a_computed_bias()
    result = TuckerConv(rank_ratio=0.5, fold=fold)(model)
    assert len(result.layers) == 1
    assert "W" not in model.graph.initializers
    assert [n.op_type for n in model.graph if n.op_type == "Shape"] == []
    assert_close(outputs_of(model, x)["y"], outputs_of(folded, x)["y"], rtol=1e-5, atol=1e-6)


def test_auto_ranks_are_aligned_and_cheap_enough() -> None:
    weight = _w(64, 64, 3, 3)
    result = TuckerConv(rank="auto")(conv_model(weight, (1, 64, 32, 32), pads=[1, 1, 1, 1]))
    (layer,) = result.layers
    assert all(rank % 16 == 0 for rank in layer.rank)
    assert layer.macs_after <= 0.8 * layer.macs_before
    # the next aligned ranks up would not be cheap enough
    r_in, r_out = layer.rank[0] + 16, layer.rank[1] + 16
    rows = 32 * 32
    assert rows * (64 * r_in + r_in * r_out * 9 + r_out * 64) > 0.8 * layer.macs_before
    stem = TuckerConv(rank="auto", rank_ratio=0.5)(
        conv_model(_w(64, 3, 3, 3), (1, 3, 32, 32), pads=[1, 1, 1, 1])
    )
    assert not stem.layers and stem.skipped[0].reason.startswith("auto: MACs fall only to")


def test_tied_conv_weight_is_decomposed_once() -> None:
    weight = _w(16, 16, 3, 3)
    model = conv_model(weight, (1, 16, 8, 8), pads=[1, 1, 1, 1])
    graph = model.graph
    first = next(iter(graph))
    bias = ir.Value(name="b2", shape=ir.Shape([16]), type=ir.TensorType(ir.DataType.FLOAT),
                    const_value=ir.tensor(_w(16, seed=4), name="b2"))  # fmt: skip
    graph.register_initializer(bias)
    second = ir.node("Conv", [first.outputs[0], first.inputs[1], bias], name="conv2",
                     attributes={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]})  # fmt: skip
    second.outputs[0].name = "y2"
    graph.append(second)
    graph.outputs[0] = second.outputs[0]
    x = _w(1, 16, 8, 8, seed=1)
    reference = outputs_of(model, {"x": x})["y2"]
    full = TuckerConv(rank_ratio=1.0, allow_growth=True)(model.clone())
    assert [layer.shared_with for layer in full.layers] == [None, "conv"]
    factors = [name for name in full.model.graph.initializers if ".tucker_" in name]
    assert len(factors) == 3 and "W" not in full.model.graph.initializers
    assert_close(reference, outputs_of(full.model, {"x": x})["y2"])


def test_a_mode_kept_whole_needs_no_1x1_conv() -> None:
    """r_in = C_in: the identity basis on the input side, so only core + 1x1 out (Tucker-1)."""
    weight = _w(32, 8, 3, 3)
    bias = _w(32, seed=6)
    x = _w(1, 8, 9, 9, seed=1)
    model = conv_model(weight, (1, 8, 9, 9), bias=bias, pads=[1, 1, 1, 1])
    result = TuckerConv(rank=8)(model.clone())
    (layer,) = result.layers
    assert layer.rank == (8, 8)
    kernels = [list(n.attributes["kernel_shape"].value) for n in result.model.graph]
    assert kernels == [[3, 3], [1, 1]]
    assert layer.params_after == 8 * 8 * 9 + 32 * 8 + 32
    assert layer.macs_after == 81 * (8 * 8 * 9 + 8 * 32)
    u_out = initializer_array(result.model, ".tucker_out").reshape(32, 8).astype(np.float64)
    projected = np.einsum("oa,pa,pihw->oihw", u_out, u_out, weight.astype(np.float64))
    equivalent = conv_model(projected, (1, 8, 9, 9), bias=bias, pads=[1, 1, 1, 1])
    assert_close(outputs_of(equivalent, {"x": x})["y"], outputs_of(result.model, {"x": x})["y"])
