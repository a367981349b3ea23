"""The shared editing kit: layouts, constants, names, initializers, copy-on-share, folding."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimgraph.passes._kit import (
    LAYOUTS,
    Names,
    OpLayout,
    PrepareWeightsPass,
    add_initializer,
    constant_array,
    layout,
    set_constant,
    traced_constant,
)
from tests.kit.asserts import assert_same_outputs
from tests.kit.graphs import make_model

RNG = np.random.default_rng(0)


def _node(op_type: str, inputs: int = 3, **attributes: object) -> ir.Node:
    values = [ir.Value(name=f"i{k}") for k in range(inputs)]
    return ir.node(op_type, values, attributes=attributes)


# ---------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    ("op_type", "attributes", "expected"),
    [
        ("Conv", {}, (1, 2, (1, 2), 0, 1, True, 1)),
        ("Conv", {"group": 4}, (1, 2, (1, 2), 0, 1, True, 4)),
        ("ConvTranspose", {}, (1, 2, (1, 2), 1, 0, True, 1)),
        ("ConvTranspose", {"group": 2}, (1, 2, (1, 2), 1, 0, True, 2)),
        ("Gemm", {}, (1, 2, (1, 2), 1, 0, False, 1)),
        ("Gemm", {"transB": 1}, (1, 2, (1, 2), 0, 1, False, 1)),
        ("Gemm", {"transB": 0}, (1, 2, (1, 2), 1, 0, False, 1)),
        ("MatMul", {}, (1, None, (1,), 1, 0, False, 1)),
        ("BatchNormalization", {}, (1, 2, (1, 2, 3, 4), 0, None, False, 1)),
        ("InstanceNormalization", {}, (1, 2, (1, 2), 0, None, False, 1)),
        ("LayerNormalization", {}, (1, 2, (1, 2), None, None, False, 1)),
        ("Gather", {}, (0, None, (0,), 1, None, False, 1)),
    ],
)
def test_layout_of_each_op(op_type: str, attributes: dict, expected: tuple) -> None:
    found = layout(_node(op_type, **attributes))
    assert found is not None
    got = (found.weight, found.bias, found.params, found.out_axis, found.in_axis,
           found.grouped, found.group)
    assert got == expected
    assert found.op_type == op_type


def test_layout_of_other_ops_and_domains_is_none() -> None:
    assert layout(_node("Relu", 1)) is None
    assert layout(ir.node("Conv", [ir.Value(name="x")], domain="com.microsoft")) is None
    assert isinstance(LAYOUTS["Conv"], OpLayout)
    with pytest.raises(TypeError):
        LAYOUTS["Foo"] = LAYOUTS["Conv"]  # type: ignore[index]


def test_gemm_trans_b_axes_match_the_weight_it_multiplies() -> None:
    # Y = X @ B' with X (M, K) = (2, 3); N = 5 output channels either way
    for trans_b, shape in ((0, (3, 5)), (1, (5, 3))):
        found = layout(_node("Gemm", transB=trans_b))
        assert found is not None and found.trans_b == trans_b
        assert found.out_channels(shape) == 5
        assert found.in_channels(shape) == 3


def test_grouped_and_depthwise_conv_channels() -> None:
    conv = layout(_node("Conv", group=4))  # C_in 8, C_out 12: weight (12, 2, 3, 3)
    assert conv is not None
    assert conv.out_channels((12, 2, 3, 3)) == 12
    assert conv.in_channels((12, 2, 3, 3)) == 8
    assert not conv.is_depthwise((12, 2, 3, 3))
    depthwise = layout(_node("Conv", group=8))  # weight (8, 1, 3, 3)
    assert depthwise is not None and depthwise.is_depthwise((8, 1, 3, 3))
    assert not layout(_node("Conv")).is_depthwise((8, 1, 3, 3))  # type: ignore[union-attr]


def test_grouped_and_depthwise_conv_transpose_channels() -> None:
    # ConvTranspose weight (C_in, C_out / group, k...): C_in 8, group 2, C_out 6 -> (8, 3, 3, 3)
    deconv = layout(_node("ConvTranspose", group=2))
    assert deconv is not None
    assert deconv.out_channels((8, 3, 3, 3)) == 6
    assert deconv.in_channels((8, 3, 3, 3)) == 8
    assert not deconv.is_depthwise((8, 3, 3, 3))
    depthwise = layout(_node("ConvTranspose", group=8))  # C_in 8 -> one input channel a group
    assert depthwise is not None and depthwise.is_depthwise((8, 1, 3, 3))
    assert depthwise.out_channels((8, 1, 3, 3)) == 8


# ---------------------------------------------------------------------------------- constants


def test_constant_array_reads_initializers_not_overridable_inputs() -> None:
    w = RNG.standard_normal((3, 4)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "d"], ["z"])],
        [("x", [2, 3]), ("d", [4])],
        ["z"],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(4, np.float32), "d")],
    )
    matmul, add = model.graph
    np.testing.assert_array_equal(constant_array(matmul.inputs[1]), w)
    assert constant_array(matmul.inputs[0]) is None
    assert constant_array(add.inputs[1]) is None  # a graph input with a default
    assert constant_array(None) is None


def test_traced_constant_follows_transpose_and_optionally_dequantize() -> None:
    w = RNG.standard_normal((4, 3)).astype(np.float32)
    q = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    model = make_model(
        [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("DequantizeLinear", ["q", "s"], ["dq"]),
            helper.make_node("MatMul", ["x", "wt"], ["y"]),
            helper.make_node("MatMul", ["x", "dq"], ["z"]),
        ],
        [("x", [2, 3])],
        ["y", "z"],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(q, "q"),
         numpy_helper.from_array(np.float32(0.5), "s")],
    )
    first, second = [n for n in model.graph if n.op_type == "MatMul"]
    np.testing.assert_array_equal(traced_constant(first.inputs[1]), w.T)
    assert traced_constant(second.inputs[1]) is None  # DequantizeLinear not followed by default
    through = {"DequantizeLinear"}
    np.testing.assert_array_equal(
        traced_constant(second.inputs[1], through=through), q.astype(np.float32) * 0.5
    )
    assert traced_constant(first.inputs[0]) is None
    assert len(model.graph) == 4  # nothing was folded


# ------------------------------------------------------------------------ names, initializers


def test_names_are_fresh_across_values_nodes_and_subgraph_free_graphs() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"], name="r")],
        [("x", [2])], ["y"],
        [numpy_helper.from_array(np.ones(2, np.float32), "w")],
    )
    names = Names(model.graph)
    assert [names.fresh("x"), names.fresh("y"), names.fresh("r"), names.fresh("w")] == [
        "x_1", "y_1", "r_1", "w_1",
    ]
    assert names.fresh("x") == "x_2"
    assert names.fresh("new") == "new"
    assert Names(model.graph, node_names=False).fresh("r") == "r"


def test_add_initializer_registers_a_unique_name_with_shape_and_type() -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])], [("x", [2])], ["y"],
        [numpy_helper.from_array(np.ones(2, np.float32), "w")],
    )
    graph = model.graph
    array = np.arange(6, dtype=np.int64).reshape(2, 3)[:, ::2]  # not contiguous
    value = add_initializer(graph, "w", array)
    assert value.name == "w_1" and graph.initializers["w_1"] is value
    assert value.shape == ir.Shape([2, 2]) and value.dtype == ir.DataType.INT64
    np.testing.assert_array_equal(value.const_value.numpy(), array)
    tensor = ir.tensor(np.zeros(3, np.float32), name="t")
    shared = add_initializer(graph, "y", tensor, names=Names(graph, node_names=False))
    assert shared.name == "y_1"  # "y" is a node output
    assert shared.const_value is tensor  # a tensor is shared, not copied


def _shared_weight_model() -> ir.Model:
    w = RNG.standard_normal((3, 4)).astype(np.float32)
    v = RNG.standard_normal((4, 2)).astype(np.float32)
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"], name="m0"),
            helper.make_node("MatMul", ["x", "w"], ["b"], name="m1"),
            helper.make_node("MatMul", ["a", "v"], ["y"], name="m2"),
        ],
        [("x", [2, 3])], ["y", "b"],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v, "v")],
    )


def test_set_constant_writes_in_place_when_the_node_is_the_only_reader() -> None:
    model = _shared_weight_model()
    m2 = model.graph.node("m2")
    before = m2.inputs[1]
    new = np.ones((4, 2), np.float16)
    result = set_constant(m2, 1, new)
    assert result is before and m2.inputs[1] is before
    assert model.graph.initializers["v"] is before
    assert before.dtype == ir.DataType.FLOAT16
    np.testing.assert_array_equal(before.const_value.numpy(), new)


def test_set_constant_copies_a_shared_initializer() -> None:
    model = _shared_weight_model()
    m0, m1 = model.graph.node("m0"), model.graph.node("m1")
    shared = m0.inputs[1]
    original = shared.const_value.numpy().copy()
    result = set_constant(m0, 1, np.zeros((3, 4), np.float32), base="w_pruned")
    assert result is m0.inputs[1] and result is not shared
    assert result.name == "w_pruned" and model.graph.initializers["w_pruned"] is result
    assert m1.inputs[1] is shared  # the other reader keeps the original
    np.testing.assert_array_equal(shared.const_value.numpy(), original)
    assert {use.node.name for use in shared.uses()} == {"m1"}
    # the last reader now owns `w`: written in place
    assert set_constant(m1, 1, np.ones((3, 4), np.float32)) is shared


def test_set_constant_copies_a_graph_output_or_input() -> None:
    model = _shared_weight_model()
    graph = model.graph
    m2 = graph.node("m2")
    v = m2.inputs[1]
    graph.outputs.append(v)  # the user reads `v`: it must keep its value
    new = set_constant(m2, 1, np.ones((4, 2), np.float32))
    assert new is not v and new.name == "v_1" and m2.inputs[1] is new
    assert graph.initializers["v"] is v and graph.outputs[-1] is v
    graph.outputs.pop()
    graph.inputs.append(new)  # an overridable default: not written in place either
    newer = set_constant(m2, 1, np.zeros((4, 2), np.float32))
    assert newer is not new and newer.name == "v_1_1"
    np.testing.assert_array_equal(new.const_value.numpy(), np.ones((4, 2), np.float32))


# ---------------------------------------------------------------------------- weight folding


def _computed_weights_model() -> tuple[ir.Model, dict[str, np.ndarray]]:
    """Conv with a DequantizeLinear weight and a ConstantOfShape bias; Gemm and MatMul read
    their weights through Transpose, Cast and Reshape; a QDQ activation stays."""
    q = RNG.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8)
    g = RNG.standard_normal((5, 36)).astype(np.float64)
    m = RNG.standard_normal((20, 3)).astype(np.float32)
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "q_scale"], ["conv_w"]),
        helper.make_node("ConstantOfShape", ["bias_shape"], ["conv_b"],
                         value=numpy_helper.from_array(np.array([0.25], np.float32))),
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Cast", ["g"], ["g32"], to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["f", "g32"], ["h"], transB=1, name="gemm"),
        helper.make_node("Transpose", ["m"], ["mt"], perm=[1, 0]),
        helper.make_node("Reshape", ["mt", "m_shape"], ["mr"]),
        helper.make_node("MatMul", ["x2", "mr"], ["y"], name="matmul"),
    ]
    initializers = [
        numpy_helper.from_array(q, "q"),
        numpy_helper.from_array(np.float32(0.01), "q_scale"),
        numpy_helper.from_array(np.array([4], np.int64), "bias_shape"),
        numpy_helper.from_array(g, "g"),
        numpy_helper.from_array(m, "m"),
        numpy_helper.from_array(np.array([3, 20], np.int64), "m_shape"),
    ]
    model = make_model(
        nodes, [("x", [2, 3, 3, 3]), ("x2", [2, 3])], ["h", "y"], initializers, opset=19
    )
    feeds = {
        "x": RNG.standard_normal((2, 3, 3, 3)).astype(np.float32),
        "x2": RNG.standard_normal((2, 3)).astype(np.float32),
    }
    return model, feeds


@pytest.mark.parametrize("scope", [("Conv", "Gemm", "MatMul"), "all"])
def test_prepare_weights_is_exact_on_onnxruntime(scope) -> None:
    model, feeds = _computed_weights_model()
    reference = model.clone()
    result = PrepareWeightsPass(scope=scope)(model)
    prepared = result.model
    assert prepared is model  # in place
    assert_same_outputs(reference, prepared, feeds)
    by_name = {node.name: node for node in prepared.graph}
    conv, gemm, matmul = by_name["conv"], by_name["gemm"], by_name["matmul"]
    assert gemm.inputs[1].const_value is not None
    assert matmul.inputs[1].const_value is not None
    assert conv.inputs[2].const_value is not None  # ConstantOfShape is folded in both scopes
    if scope == "all":
        # onnxscript's default rules keep DequantizeLinear outside the weights' own scope
        assert conv.inputs[1].producer().op_type == "DequantizeLinear"
        assert result.folded == 3
    else:
        assert conv.inputs[1].const_value is not None
        assert conv.inputs[1].const_value.dtype == ir.DataType.FLOAT
        assert result.folded == 4
        assert [node.op_type for node in prepared.graph] == ["Conv", "Flatten", "Gemm", "MatMul"]
    assert result.modified


def test_prepare_weights_scope_leaves_other_nodes() -> None:
    model, feeds = _computed_weights_model()
    result = PrepareWeightsPass(scope=("MatMul",))(model)
    assert result.folded == 1
    ops = [node.op_type for node in result.model.graph]
    assert ops == ["DequantizeLinear", "ConstantOfShape", "Conv", "Flatten", "Cast", "Gemm",
                   "MatMul"]
    by_predicate = PrepareWeightsPass(scope=lambda node: node.name == "gemm")(
        _computed_weights_model()[0]
    )
    assert by_predicate.folded == 1
    assert "Cast" not in [node.op_type for node in by_predicate.model.graph]


def test_prepare_weights_drops_initializer_inputs_in_its_cone_only() -> None:
    model, _ = _computed_weights_model()
    graph = model.graph
    graph.inputs.append(graph.initializers["m"])  # old exporters list weights as inputs
    graph.inputs.append(graph.initializers["g"])
    PrepareWeightsPass(scope=("MatMul",))(model)
    assert [value.name for value in graph.inputs] == ["x", "x2", "g"]


def test_prepare_weights_without_work_changes_nothing() -> None:
    model, _ = _computed_weights_model()
    first = PrepareWeightsPass(scope=("Conv", "Gemm", "MatMul"))(model)
    again = PrepareWeightsPass(scope=("Conv", "Gemm", "MatMul"))(first.model)
    assert again.folded == 0 and not again.modified


def test_prepare_weights_rejects_an_unknown_scope_word() -> None:
    with pytest.raises(ValueError, match="scope must be 'all'"):
        PrepareWeightsPass(scope="some")
