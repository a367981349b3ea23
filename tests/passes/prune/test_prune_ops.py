"""Channels traced through the less common channel-preserving ops, on a hand-built graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimgraph.api.prune import prune_with_report
from slimgraph.passes.prune import prepare_for_pruning
from slimgraph.passes.prune.channels import analyze_channels
from tests.kit.asserts import assert_same_outputs, check_valid
from tests.passes.prune.prune_helpers import zero_channels


def _ops_model(seed: int = 0) -> ir.Model:
    """conv(8) -> BN -> Clip -> Mul, Add per-channel -> Div scalar -> MaxPool -> Resize x2 ->
    Transpose to NHWC and back -> Dropout -> conv(6) -> Sigmoid*x (SiLU) -> GlobalAveragePool ->
    Squeeze -> Unsqueeze -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)

    def f32(array) -> np.ndarray:
        return np.asarray(array, np.float32)

    inits = {
        "w1": f32(rng.standard_normal((8, 3, 3, 3))), "b1": f32(rng.standard_normal(8)),
        "gamma": f32(rng.random(8) + 0.5), "beta": f32(rng.standard_normal(8)),
        "mean": f32(rng.standard_normal(8) * 0.1), "var": f32(rng.random(8) + 0.5),
        "lo": f32(0.0), "hi": f32(6.0), "scale": f32(rng.random((1, 8, 1, 1)) + 0.5),
        "shift": f32(rng.standard_normal((8, 1, 1))), "two": f32(2.0), "roi": f32([]),
        "scales": f32([1, 1, 2, 2]),
        "w2": f32(rng.standard_normal((6, 8, 1, 1))),
        "axes23": np.array([2, 3], np.int64), "wfc": f32(rng.standard_normal((4, 6))),
        "bfc": f32(rng.standard_normal(4)),
    }  # fmt: skip
    make = helper.make_node
    nodes = [
        make("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        make("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"]),
        make("Clip", ["bn", "lo", "hi"], ["clip"]),
        make("Mul", ["clip", "scale"], ["mul"]),
        make("Add", ["mul", "shift"], ["add"]),
        make("Div", ["add", "two"], ["div"]),
        make("MaxPool", ["div"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        make("Resize", ["pool", "roi", "scales"], ["up"], mode="nearest"),
        make("Transpose", ["up"], ["nhwc"], perm=[0, 2, 3, 1]),
        make("Transpose", ["nhwc"], ["nchw"], perm=[0, 3, 1, 2]),
        make("Dropout", ["nchw"], ["drop"]),
        make("Conv", ["drop", "w2"], ["c2"]),
        make("Sigmoid", ["c2"], ["sig"]),
        make("Mul", ["c2", "sig"], ["silu"]),
        make("GlobalAveragePool", ["silu"], ["gap"]),
        make("Squeeze", ["gap", "axes23"], ["sq"]),
        make("Unsqueeze", ["sq", "axes23"], ["unsq"]),
        make("Flatten", ["unsq"], ["flat"]),
        make("Gemm", ["flat", "wfc", "bfc"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "ops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def test_prune_ops_groups_traced_through_every_op() -> None:
    model = prepare_for_pruning(_ops_model())
    groups = analyze_channels(model.graph).groups
    sizes = sorted(g.size for g in groups if g.prunable)
    assert sizes == [6, 8]
    first = next(g for g in groups if g.size == 8)
    names = {m.value.name for m in first.members}
    # (Dropout is folded away by the preparation)
    assert {"bn", "clip", "mul", "add", "div", "pool", "up", "nhwc", "nchw"} <= names
    nhwc = next(m for m in first.members if m.value.name == "nhwc")
    assert nhwc.axis == 3
    second = next(g for g in groups if g.size == 6)
    assert {"silu", "gap", "sq", "unsq", "flat"} <= {m.value.name for m in second.members}


@pytest.mark.parametrize("pad", [False, True])
def test_prune_ops_exact(pad: bool) -> None:
    outputs = ["y"] if pad else []  # the logits shrink (padded back) only when named
    zeroed, _, count = zero_channels(_ops_model(seed=3), 0.5, pad=pad, seed=7,
                                     prune_outputs=outputs)  # fmt: skip
    pruned, report = prune_with_report(zeroed, ratio=0.5, pad=pad, prune_outputs=outputs)
    assert sum(g.channels - g.kept for g in report.groups) == count == (4 + 3 + (2 if pad else 0))
    check_valid(pruned)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert_same_outputs(zeroed, pruned, {"x": x})
