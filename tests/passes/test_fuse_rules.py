"""The fusions as rewrite rules: why a refused match was refused (FusionResult.skipped), which
nodes are not candidates at all, rewired edges by identity, copy-on-share of weights."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from slimgraph.passes import fuse, fuse_attention
from slimgraph.passes._kit import Names
from slimgraph.passes.base import Skipped
from slimgraph.passes.fuse_rules import RuleEdit, fusion_rules
from tests.kit.asserts import assert_rewired, assert_same_outputs
from tests.kit.graphs import batchnorm_params, initializer, make_model, node_named, ops

RNG = np.random.default_rng(1)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def bn_node(x: str, y: str, prefix: str, **attrs: object):
    inputs = [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"]
    return helper.make_node("BatchNormalization", inputs, [y], name=prefix, **attrs)


# ---------------------------------------------------------------- reasons in `skipped`


def test_bn_after_a_conv_read_twice_is_skipped_with_the_reason() -> None:
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            bn_node("c", "y", "bn"),
            helper.make_node("Relu", ["c"], ["z"], name="relu"),
        ],
        [("x", [1, 3, 6, 6])],
        ["y", "z"],
        [initializer("w", rand(4, 3, 1, 1)), *batchnorm_params("bn", 4, RNG)],
    )
    result = fuse.FuseBatchNormPass()(model)
    assert not result.modified and result.fused == {}
    reason = "the Conv output has other readers or is a graph output"
    assert result.skipped == [Skipped("bn", "BatchNormalization", reason)]


@pytest.mark.parametrize(
    ("attrs", "params", "reason"),
    [
        ({"training_mode": 1}, None, "BatchNormalization in training mode"),
        ({}, 3, "BatchNormalization parameters do not have one entry per channel (4)"),
    ],
)
def test_bn_refused_by_the_check_says_why(attrs: dict, params: int | None, reason: str) -> None:
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y", "bn", **attrs)],
        [("x", [1, 3, 6, 6])],
        ["y"],
        [initializer("w", rand(4, 3, 1, 1)), *batchnorm_params("bn", params or 4, RNG)],
        opset=17 if params is None else 13,
        check=False,  # training-mode outputs have no inferred shape
    )
    result = fuse.FuseBatchNormPass()(model)
    assert not result.modified
    assert result.skipped == [Skipped("bn", "BatchNormalization", reason)]


def test_bn_after_a_3d_matmul_is_skipped_and_a_bn_after_relu_is_not_a_candidate() -> None:
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
            bn_node("m", "y", "bn"),
            helper.make_node("Relu", ["x2"], ["r"], name="relu"),
            bn_node("r", "z", "bn2"),
        ],
        [("x", [2, 5, 6]), ("x2", [2, 5, 3])],
        ["y", "z"],
        [initializer("w", rand(6, 5)),
         *batchnorm_params("bn", 5, RNG), *batchnorm_params("bn2", 5, RNG)],
    )
    result = fuse.FuseBatchNormPass()(model)
    assert result.skipped == [
        Skipped("bn", "BatchNormalization", "MatMul is not 2-D with a constant weight")
    ]


def test_fold_affine_reports_a_constant_that_varies_spatially_not_a_computed_operand() -> None:
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("Mul", ["c", "k"], ["y"], name="mul"),
            helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2"),
            helper.make_node("Add", ["c2", "x4"], ["z"], name="residual"),
        ],
        [("x", [1, 3, 4, 4]), ("x4", [1, 2, 4, 4])],
        ["y", "z"],
        [initializer("w", rand(2, 3, 1, 1)), initializer("k", rand(2, 4, 4)),
         initializer("w2", rand(2, 3, 1, 1))],
    )
    result = fuse.FoldAffinePass()(model)
    assert not result.modified
    assert result.skipped == [
        Skipped("mul", "Mul", "the constant does not vary along the channel axis alone")
    ]


def test_pad_skip_names_the_pad_and_a_pad_read_twice_is_not_reported() -> None:
    model = make_model(
        [
            helper.make_node("Pad", ["x"], ["p"], pads=[0, 0, 1, 1, 0, 0, 1, 1], value=1.0,
                             name="pad"),
            helper.make_node("Conv", ["p", "w"], ["y"], name="conv"),
            helper.make_node("Pad", ["x"], ["q"], pads=[0, 0, 1, 1, 0, 0, 1, 1], name="pad2"),
            helper.make_node("Conv", ["q", "w"], ["z"], name="conv2"),
            helper.make_node("Relu", ["q"], ["r"], name="relu"),
        ],
        [("x", [1, 3, 6, 6])],
        ["y", "z", "r"],
        [initializer("w", rand(2, 3, 3, 3))],
        opset=9,
    )
    result = fuse.FusePadPass()(model)
    assert not result.modified
    assert result.skipped == [Skipped("pad", "Pad", "pad value 1.0 is not zero")]


def test_matmul_add_bias_that_grows_the_output_is_skipped_3d_is_not_a_candidate() -> None:
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
            helper.make_node("Add", ["m", "b"], ["y"], name="add"),
            helper.make_node("MatMul", ["x3", "w"], ["m3"], name="mm3"),
            helper.make_node("Add", ["m3", "b5"], ["y3"], name="add3"),
        ],
        [("x", [1, 6]), ("x3", [2, 3, 6])],
        ["y", "y3"],
        [initializer("w", rand(6, 5)), initializer("b", rand(2, 5)), initializer("b5", rand(5))],
    )
    result = fuse.MatMulAddToGemmPass()(model)
    assert not result.modified
    assert result.skipped == [
        Skipped("add", "Add", "the bias does not broadcast to the MatMul's output (M, N)")
    ]


def test_bias_gelu_reason_comes_from_onnxscripts_check() -> None:
    model = make_model(
        [
            helper.make_node("Add", ["x", "b"], ["a"], name="add"),
            helper.make_node("Gelu", ["a"], ["y"], name="gelu"),
        ],
        [("x", [2, 3, 4])],
        ["y"],
        [initializer("b", rand(3, 4))],
        opset=20,
    )
    result = fuse_attention.FuseBiasGeluPass()(model)
    assert not result.modified
    assert result.skipped == [Skipped("gelu", "Gelu", "bias is not of shape 1D tensor")]


def test_batchnorm_to_affine_reports_every_batchnorm_it_leaves() -> None:
    model = make_model(
        [
            bn_node("x", "y", "bn", training_mode=1),
            helper.make_node(
                "BatchNormalization", ["x", "g", "bn_b", "bn_m", "bn_v"], ["z"], name="bn_in"
            ),
            helper.make_node("Relu", ["x2"], ["r"], name="relu"),
            bn_node("r", "w", "bn2"),
        ],
        [("x", [2, 4, 3, 3]), ("g", [4]), ("x2", [2, 4])],
        ["y", "z", "w"],
        [*batchnorm_params("bn", 4, RNG), *batchnorm_params("bn2", 4, RNG)],
        check=False,  # training-mode outputs have no inferred shape
    )
    result = fuse.BatchNormToAffinePass(form="conv")(model)
    assert not result.modified
    assert result.skipped == [
        Skipped("bn", "BatchNormalization", "BatchNormalization in training mode"),
        Skipped("bn_in", "BatchNormalization", "parameters not constant"),
        Skipped("bn2", "BatchNormalization", "a depthwise Conv needs spatial axes"),
    ]


def test_batchnorm_with_its_statistics_read_is_skipped_with_the_reason() -> None:
    model = make_model(
        [
            helper.make_node(
                "BatchNormalization", ["x", "bn_g", "bn_b", "bn_m", "bn_v"],
                ["y", "mean", "var", "saved_mean", "saved_var"], name="bn",
            ),
        ],
        [("x", [2, 4, 3, 3])],
        ["y", "mean"],
        batchnorm_params("bn", 4, RNG),
        opset=9,
        check=False,  # the running statistics outputs have no inferred shape
    )
    result = fuse.BatchNormToAffinePass()(model)
    assert not result.modified
    reason = "the BatchNormalization outputs after the first are read"
    assert result.skipped == [Skipped("bn", "BatchNormalization", reason)]


# ---------------------------------------------------------------- rewired edges by identity


def test_batchnorm_to_affine_rewires_by_identity() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("r", "y", "bn")],
        [("x", [2, 4, 5, 5])],
        ["y"],
        batchnorm_params("bn", 4, RNG),
    )
    reference = model.clone()
    relu = node_named(model, "relu")
    result = fuse.BatchNormToAffinePass()(model)
    assert result.fused == {"batchnorm": 1} and result.skipped == []
    mul, add = node_named(model, "bn_mul"), node_named(model, "bn")
    assert (mul.op_type, add.op_type) == ("Mul", "Add")
    assert_rewired(mul, 0, relu.outputs[0])
    assert_rewired(add, 0, mul.outputs[0])
    assert mul.inputs[1].name == "bn_g_scale" and add.inputs[1].name == "bn_g_shift"
    assert model.graph.outputs[0] is add.outputs[0] and add.outputs[0].name == "y"
    assert_same_outputs(reference, model)


def test_bn_fold_rewires_by_identity_and_writes_a_private_weight_in_place() -> None:
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "cb"], ["c"], name="conv"), bn_node("c", "y", "bn")],
        [("x", [1, 3, 5, 5])],
        ["y"],
        [initializer("w", rand(4, 3, 3, 3)), initializer("cb", rand(4)),
         *batchnorm_params("bn", 4, RNG)],
    )
    reference = model.clone()
    x, w, cb = model.graph.inputs[0], model.graph.initializers["w"], model.graph.initializers["cb"]
    result = fuse.FuseBatchNormPass()(model)
    assert result.fused == {"conv/convtranspose/gemm": 1} and result.skipped == []
    (conv,) = model.graph
    assert conv.name == "conv"
    for index, value in enumerate((x, w, cb)):  # weight and bias rewritten in place
        assert_rewired(conv, index, value)
    assert model.graph.outputs[0] is conv.outputs[0] and conv.outputs[0].name == "y"
    assert_same_outputs(reference, model)


def test_bn_fold_copies_a_shared_weight_and_leaves_the_other_reader_alone() -> None:
    weight = rand(4, 3, 1, 1)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            bn_node("c", "y", "bn"),
            helper.make_node("Conv", ["x", "w"], ["z"], name="other"),
        ],
        [("x", [1, 3, 6, 6])],
        ["y", "z"],
        [initializer("w", weight), *batchnorm_params("bn", 4, RNG)],
    )
    reference = model.clone()
    w = model.graph.initializers["w"]
    fuse.FuseBatchNormPass()(model)
    conv, other = node_named(model, "conv"), node_named(model, "other")
    assert_rewired(other, 1, w)
    np.testing.assert_array_equal(w.const_value.numpy(), weight)  # untouched
    assert conv.inputs[1] is not w and conv.inputs[1].is_initializer()
    assert conv.inputs[2] is not None and conv.inputs[2].name == "w_bias"
    assert_same_outputs(reference, model)


def test_matmul_bn_becomes_gemm_with_the_matmul_name_and_input() -> None:
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), bn_node("m", "y", "bn")],
        [("x", [3, 6])],
        ["y"],
        [initializer("w", rand(6, 5)), *batchnorm_params("bn", 5, RNG)],
    )
    reference = model.clone()
    x = model.graph.inputs[0]
    result = fuse.FuseBatchNormPass()(model)
    assert result.fused == {"matmul": 1}
    (gemm,) = model.graph
    assert (gemm.op_type, gemm.name) == ("Gemm", "fc")
    assert_rewired(gemm, 0, x)
    assert_same_outputs(reference, model)


def test_affine_chain_folds_into_the_conv_with_identity_edges() -> None:
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("Mul", ["k", "c"], ["m"], name="mul"),
            helper.make_node("Sub", ["m", "s"], ["y"], name="sub"),
            helper.make_node("Relu", ["y"], ["r"], name="relu"),
        ],
        [("x", [2, 3, 6, 6])],
        ["r"],
        [initializer("w", rand(4, 3, 3, 3)), initializer("k", rand(1, 4, 1, 1)),
         initializer("s", rand(4, 1, 1))],
    )
    reference = model.clone()
    x = model.graph.inputs[0]
    result = fuse.FoldAffinePass()(model)
    assert result.fused == {"mul/add": 2} and result.skipped == []
    conv, relu = node_named(model, "conv"), node_named(model, "relu")
    assert ops(model) == {"Conv": 1, "Relu": 1}
    assert_rewired(conv, 0, x)
    assert_rewired(relu, 0, conv.outputs[0])
    assert_same_outputs(reference, model)


def test_pad_fold_rewires_the_conv_to_the_pad_input() -> None:
    model = make_model(
        [
            helper.make_node("Pad", ["x"], ["p"], pads=[0, 0, 1, 0, 0, 0, 0, 1], name="pad"),
            helper.make_node("Conv", ["p", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        ],
        [("x", [1, 3, 6, 7])],
        ["y"],
        [initializer("w", rand(2, 3, 3, 3))],
        opset=9,
    )
    reference = model.clone()
    x, w = model.graph.inputs[0], model.graph.initializers["w"]
    result = fuse.FusePadPass()(model)
    (conv,) = model.graph
    assert result.fused == {"pad": 1}
    assert conv.name == "conv"
    assert_rewired(conv, 0, x)
    assert_rewired(conv, 1, w)
    assert list(conv.attributes.get_ints("pads")) == [2, 1, 1, 2]
    assert_same_outputs(reference, model)


def test_sum_of_two_becomes_add_of_the_same_values() -> None:
    model = make_model(
        [helper.make_node("Sum", ["x", "z"], ["s"], name="sum"),
         helper.make_node("Relu", ["s"], ["y"], name="relu")],
        [("x", [2, 3]), ("z", [2, 3])],
        ["y"],
    )
    x, z = model.graph.inputs
    fuse.SumToAddPass()(model)
    add, relu = node_named(model, "sum"), node_named(model, "relu")
    assert add.op_type == "Add"
    assert_rewired(add, 0, x)
    assert_rewired(add, 1, z)
    assert_rewired(relu, 0, add.outputs[0])


def test_gemm_from_matmul_add_reads_the_same_values() -> None:
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
         helper.make_node("Add", ["b", "m"], ["y"], name="add")],
        [("x", [3, 6])],
        ["y"],
        [initializer("w", rand(6, 5)), initializer("b", rand(5))],
    )
    x, w, b = model.graph.inputs[0], model.graph.initializers["w"], model.graph.initializers["b"]
    result = fuse.MatMulAddToGemmPass()(model)
    assert result.fused == {"matmul+add": 1} and result.skipped == []
    (gemm,) = model.graph
    assert gemm.name == "fc"
    for index, value in enumerate((x, w, b)):
        assert_rewired(gemm, index, value)


# ---------------------------------------------------------------- the table


def test_one_rule_set_holds_every_family_and_names_its_rules() -> None:
    edit = RuleEdit(Names(ir.Graph([], [], nodes=[])))
    names = [rule.name for rule in fusion_rules(edit)]
    for family in ("fuse-batchnorm", "fold-affine", "fuse-pad", "sum-to-add"):
        assert any(name.startswith(f"{family}:") for name in names), family
    assert any("MatMulAddToGemm" in name for name in names)
    assert edit.report_shared == {
        *(f"fuse-batchnorm:{op}" for op in ("Conv", "ConvTranspose", "Gemm", "MatMul")),
        "batchnorm-to-affine:mul-add",
    }
    with pytest.raises(KeyError):
        fusion_rules(edit, "no-such-family")


def test_rules_fold_inside_if_branches_too() -> None:
    body = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        bn_node("c", "then_out", "bn"),
    ]
    then = helper.make_graph(
        body, "then", [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)]
    )
    other = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["else_out"])], "else", [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    model = make_model(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["positive"]),
            helper.make_node("If", ["positive"], ["y"], then_branch=then, else_branch=other),
        ],
        [("x", [1, 3, 4, 4])],
        ["y"],
        [initializer("zero", np.array(0, np.float32)), initializer("w", rand(3, 3, 1, 1)),
         *batchnorm_params("bn", 3, RNG)],
    )
    reference = model.clone()
    result = fuse.FuseBatchNormPass()(model)
    assert result.fused == {"conv/convtranspose/gemm": 1}
    branch = next(n for n in model.graph if n.op_type == "If").attributes["then_branch"].value
    assert [n.op_type for n in branch] == ["Conv"]
    x = np.abs(rand(1, 3, 4, 4))
    for sign in (1.0, -1.0):  # both branches
        assert_same_outputs(reference, model, {"x": sign * x})


def test_a_refused_fold_leaves_the_model_and_its_source_proto_alone() -> None:
    """As in a dynamo export: the Conv weight is also read by a Shape and the Conv bias is
    computed. The fold is refused; nothing may change, and serializing the model must not
    rename tensors it shares with the proto it was read from (the old pre-pass gave the Conv a
    copy of the weight sharing the tensor, and saving renamed the source's TensorProto)."""
    model = make_model(
        [
            helper.make_node("Identity", ["cb0"], ["cb"], name="bias"),
            helper.make_node("Conv", ["x", "w", "cb"], ["c"], name="conv"),
            bn_node("c", "y", "bn"),
            helper.make_node("Shape", ["w"], ["s"], name="shape"),
        ],
        [("x", [1, 3, 4, 4])],
        ["y", ("s", TensorProto.INT64, [4])],
        [initializer("w", rand(2, 3, 1, 1)), initializer("cb0", rand(2)),
         *batchnorm_params("bn", 2, RNG)],
    )
    proto = ir.to_proto(model)
    source = ir.from_proto(proto)
    names = [t.name for t in proto.graph.initializer]
    result = fuse.FuseBatchNormPass()(source)
    assert not result.modified
    reason = "the Conv bias is not a constant"
    assert result.skipped == [Skipped("bn", "BatchNormalization", reason)]
    assert sorted(source.graph.initializers) == sorted(names)
    ir.to_proto(source)
    assert [t.name for t in proto.graph.initializer] == names
    w = source.graph.initializers["w"]
    assert_rewired(node_named(source, "conv"), 1, w)
    assert_rewired(node_named(source, "shape"), 0, w)
