"""Structural + onnxruntime tests of each fusion pass on hand-built graphs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from slimgraph.ir import metadata
from slimgraph.passes import fuse
from tests.kit.asserts import assert_same_outputs
from tests.kit.graphs import batchnorm_params, initializer, make_model, ops

RNG = np.random.default_rng(0)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def bn_node(x: str, y: str, prefix: str, eps: float = 1e-5):
    return helper.make_node(
        "BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y],
        epsilon=eps,
    )


def run_pass(pass_, model):
    reference = model.clone()
    result = pass_(model)
    return reference, result


def test_bn_folds_into_conv_and_keeps_output_name() -> None:
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "y", "bn")],
        [("x", [1, 3, 8, 8])],
        ["y"],
        [initializer("w", rand(4, 3, 3, 3)), *batchnorm_params("bn", 4, RNG)],
    )
    reference, result = run_pass(fuse.FuseBatchNormPass(), model)
    assert result.modified
    assert ops(result.model) == {"Conv": 1}
    assert result.model.graph.outputs[0].name == "y"
    assert result.fused == {"conv/convtranspose/gemm": 1}
    assert_same_outputs(reference, result.model)


def test_bn_folds_into_grouped_conv_transpose_on_weight_axis_1() -> None:
    # weight (C_in=4, C_out/group=3, k, k) with group=2: 6 output channels
    model = make_model(
        [
            helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], group=2, strides=[2, 2]),
            bn_node("c", "y", "bn", eps=1e-3),
        ],
        [("x", [1, 4, 5, 5])],
        ["y"],
        [initializer("w", rand(4, 3, 3, 3)), initializer("b", rand(6)),
         *batchnorm_params("bn", 6, RNG)],
    )
    reference, result = run_pass(fuse.FuseBatchNormPass(), model)
    assert ops(result.model) == {"ConvTranspose": 1}
    assert_same_outputs(reference, result.model)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_folds_into_gemm(trans_b: int) -> None:
    weight = rand(5, 6) if trans_b else rand(6, 5)
    model = make_model(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=trans_b, beta=0.5, alpha=2.0),
            bn_node("g", "y", "bn"),
        ],
        [("x", [3, 6])],
        ["y"],
        [initializer("w", weight), initializer("b", rand(5)), *batchnorm_params("bn", 5, RNG)],
    )
    reference, result = run_pass(fuse.FuseBatchNormPass(), model)
    assert ops(result.model) == {"Gemm": 1}
    assert_same_outputs(reference, result.model)


def test_bn_folds_into_2d_matmul_as_gemm() -> None:
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), bn_node("m", "y", "bn")],
        [("x", [3, 6])],
        ["y"],
        [initializer("w", rand(6, 5)), *batchnorm_params("bn", 5, RNG)],
    )
    reference, result = run_pass(fuse.FuseBatchNormPass(), model)
    assert ops(result.model) == {"Gemm": 1}
    assert result.fused == {"matmul": 1}
    assert_same_outputs(reference, result.model)


def test_bn_not_folded_when_conv_output_has_another_reader() -> None:
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            bn_node("c", "y", "bn"),
            helper.make_node("Relu", ["c"], ["z"]),
        ],
        [("x", [1, 3, 6, 6])],
        ["y", "z"],
        [initializer("w", rand(4, 3, 1, 1)), *batchnorm_params("bn", 4, RNG)],
    )
    result = fuse.FuseBatchNormPass()(model)
    assert not result.modified
    assert ops(result.model)["BatchNormalization"] == 1
    assert len(result.skipped) == 1 and "other readers" in result.skipped[0].reason


def test_bn_not_folded_when_conv_output_is_graph_output() -> None:
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y", "bn")],
        [("x", [1, 3, 6, 6])],
        ["y", "c"],
        [initializer("w", rand(4, 3, 1, 1)), *batchnorm_params("bn", 4, RNG)],
    )
    assert not fuse.FuseBatchNormPass()(model).modified


def test_bn_with_shared_conv_bias_is_folded_without_touching_the_other_conv() -> None:
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"]),
            bn_node("c", "y", "bn"),
            helper.make_node("Conv", ["x", "w", "b"], ["z"]),
        ],
        [("x", [1, 3, 6, 6])],
        ["y", "z"],
        [initializer("w", rand(4, 3, 1, 1)), initializer("b", rand(4)),
         *batchnorm_params("bn", 4, RNG)],
    )
    reference, result = run_pass(fuse.FuseBatchNormPass(), model)
    assert ops(result.model) == {"Conv": 2}
    assert_same_outputs(reference, result.model)


def test_fold_affine_mul_add_after_conv() -> None:
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("Mul", ["k", "c"], ["m"]),  # constant on the left
            helper.make_node("Add", ["m", "t"], ["a"]),
            helper.make_node("Sub", ["a", "s"], ["y"]),
        ],
        [("x", [2, 3, 6, 6])],
        ["y"],
        [
            initializer("w", rand(4, 3, 3, 3)),
            initializer("k", rand(1, 4, 1, 1)),
            initializer("t", rand(4, 1, 1)),
            initializer("s", np.float32(0.25).reshape(())),
        ],
    )
    reference, result = run_pass(fuse.FoldAffinePass(), model)
    assert ops(result.model) == {"Conv": 1}
    assert result.fused == {"mul/add": 3}
    assert_same_outputs(reference, result.model)


def test_fold_affine_after_gemm_and_batchnorm() -> None:
    model = make_model(
        [
            helper.make_node("Gemm", ["x", "w"], ["g"], transB=1),
            helper.make_node("Mul", ["g", "k"], ["m"]),
            bn_node("x4", "n", "bn"),
            helper.make_node("Mul", ["n", "k4"], ["n2"]),
            helper.make_node("Add", ["n2", "t4"], ["z"]),
        ],
        [("x", [3, 6]), ("x4", [2, 4, 3, 3])],
        ["m", "z"],
        [
            initializer("w", rand(5, 6)),
            initializer("k", rand(5)),
            *batchnorm_params("bn", 4, RNG),
            initializer("k4", rand(4, 1, 1)),
            initializer("t4", rand(4, 1, 1)),
        ],
    )
    reference, result = run_pass(fuse.FoldAffinePass(), model)
    assert ops(result.model) == {"Gemm": 1, "BatchNormalization": 1}
    assert [v.name for v in result.model.graph.outputs] == ["m", "z"]
    assert_same_outputs(reference, result.model)


def test_fold_affine_leaves_constants_that_vary_spatially() -> None:
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "k"], ["y"])],
        [("x", [1, 3, 4, 4])],
        ["y"],
        [initializer("w", rand(2, 3, 1, 1)), initializer("k", rand(2, 4, 4))],
    )
    assert not fuse.FoldAffinePass()(model).modified


def test_standalone_batchnorm_becomes_mul_add() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "y", "bn")],
        [("x", [2, 4, 5, 5])],
        ["y"],
        batchnorm_params("bn", 4, RNG),
    )
    reference, result = run_pass(fuse.BatchNormToAffinePass(), model)
    assert ops(result.model) == {"Relu": 1, "Mul": 1, "Add": 1}
    assert result.model.graph.outputs[0].name == "y"
    assert_same_outputs(reference, result.model)


@pytest.mark.parametrize("opset", [9, 18])
def test_zero_pad_folds_into_conv(opset: int) -> None:
    pads = [0, 0, 1, 2, 0, 0, 3, 0]
    if opset < 11:
        pad = helper.make_node("Pad", ["x"], ["p"], pads=pads, mode="constant", value=0.0)
        inits = []
    else:  # opset 18: only the spatial axes listed, negative axis numbers
        pad = helper.make_node("Pad", ["x", "pads", "", "axes"], ["p"], mode="constant")
        inits = [
            initializer("pads", np.array([1, 2, 3, 0], np.int64)),
            initializer("axes", np.array([-2, -1], np.int64)),
        ]
    model = make_model(
        [pad, helper.make_node("Conv", ["p", "w"], ["y"], pads=[1, 1, 1, 1])],
        [("x", [1, 3, 6, 7])],
        ["y"],
        [initializer("w", rand(2, 3, 3, 3)), *inits],
        opset=opset,
    )
    reference, result = run_pass(fuse.FusePadPass(), model)
    assert ops(result.model) == {"Conv": 1}
    conv = next(iter(result.model.graph))
    assert list(conv.attributes.get_ints("pads")) == [2, 3, 4, 1]
    assert_same_outputs(reference, result.model)


@pytest.mark.parametrize(
    ("pads", "value", "reason"),
    [([0, 1, 1, 1, 0, 0, 1, 1], 0.0, "batch/channel"), ([0, 0, 1, 1, 0, 0, 1, 1], 1.0, "not zero")],
)
def test_pad_not_folded_when_not_equivalent(pads: list[int], value: float, reason: str) -> None:
    model = make_model(
        [
            helper.make_node("Pad", ["x"], ["p"], pads=pads, value=value),
            helper.make_node("Conv", ["p", "w"], ["y"]),
        ],
        [("x", [1, 3, 6, 6])],
        ["y"],
        [initializer("w", rand(2, 4 if pads[1] else 3, 3, 3))],
        opset=9,
    )
    result = fuse.FusePadPass()(model)
    assert not result.modified
    assert reason in result.skipped[0].reason


def test_sum_of_two_becomes_add_and_sum_of_one_goes() -> None:
    model = make_model(
        [
            helper.make_node("Sum", ["x", "z"], ["s"]),
            helper.make_node("Sum", ["s"], ["y"]),
        ],
        [("x", [2, 3]), ("z", [2, 3])],
        ["y"],
    )
    reference, result = run_pass(fuse.SumToAddPass(), model)
    assert ops(result.model) == {"Add": 1}
    assert result.model.graph.outputs[0].name == "y"
    assert_same_outputs(reference, result.model)


def test_matmul_add_becomes_gemm_only_when_2d() -> None:
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Add", ["b", "m"], ["y"]),
            helper.make_node("MatMul", ["x3", "w"], ["m3"]),
            helper.make_node("Add", ["m3", "b"], ["y3"]),
            helper.make_node("MatMul", ["x", "w"], ["mb"]),
            helper.make_node("Add", ["mb", "b3"], ["yb"]),
        ],
        [("x", [3, 6]), ("x3", [2, 3, 6])],
        ["y", "y3", "yb"],
        [initializer("w", rand(6, 5)), initializer("b", rand(5)), initializer("b3", rand(2, 1, 5))],
    )
    reference, result = run_pass(fuse.MatMulAddToGemmPass(), model)
    assert ops(result.model) == {"Gemm": 1, "MatMul": 2, "Add": 2}
    assert_same_outputs(reference, result.model)


def test_mark_units_records_layer_and_activation() -> None:
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv1"),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
            helper.make_node("Clip", ["c2"], ["y"]),
            helper.make_node("Sigmoid", ["c2"], ["z"]),
        ],
        [("x", [1, 3, 4, 4])],
        ["y", "z"],
        [initializer("w", rand(3, 3, 1, 1)), initializer("w2", rand(3, 3, 1, 1))],
    )
    result = fuse.MarkUnitsPass()(model)
    assert result.modified
    units = {f"{n.op_type}:{n.name}": n.metadata_props.get(metadata.UNIT) for n in model.graph}
    assert units["Conv:conv1"] == "conv1"
    assert [n.metadata_props.get(metadata.UNIT) for n in model.graph if n.op_type == "Relu"] == [
        "conv1"
    ]
    assert units["Conv:conv2"] is None  # two readers: not a unit
    assert not fuse.MarkUnitsPass()(model).modified  # idempotent


def test_bn_with_statistics_outputs_is_training_mode_and_stays() -> None:
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node(
                "BatchNormalization",
                ["c", "bn_g", "bn_b", "bn_m", "bn_v"],
                ["y", "mean", "var", "saved_mean", "saved_var"],
            ),
        ],
        [("x", [2, 3, 4, 4])],
        ["y"],
        [initializer("w", rand(4, 3, 1, 1)), *batchnorm_params("bn", 4, RNG)],
        opset=9,
    )
    assert not fuse.FuseBatchNormPass()(model).modified
    assert not fuse.BatchNormToAffinePass()(model).modified


def test_gemm_from_matmul_add_keeps_the_matmul_name() -> None:
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
            helper.make_node("Add", ["m", "b"], ["y"]),
        ],
        [("x", [3, 6])],
        ["y"],
        [initializer("w", rand(6, 5)), initializer("b", rand(5))],
    )
    fuse.MatMulAddToGemmPass()(model)
    assert [(n.op_type, n.name) for n in model.graph] == [("Gemm", "fc")]
    assert model.graph.outputs[0].name == "y"


def test_standalone_batchnorm_as_depthwise_conv() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "y", "bn")],
        [("x", [2, 4, 5, 5])],
        ["y"],
        batchnorm_params("bn", 4, RNG),
    )
    reference, result = run_pass(fuse.BatchNormToAffinePass(form="conv"), model)
    assert ops(result.model) == {"Relu": 1, "Conv": 1}
    conv = [n for n in result.model.graph if n.op_type == "Conv"][0]
    assert conv.attributes.get_int("group") == 4 and conv.inputs[1].shape == [4, 1, 1, 1]
    assert_same_outputs(reference, result.model)
    with pytest.raises(ValueError, match="form must be"):
        fuse.BatchNormToAffinePass(form="dw")
