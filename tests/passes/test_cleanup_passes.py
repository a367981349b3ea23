"""Structural + onnxruntime tests of each cleanup pass on hand-built graphs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from slimgraph.passes import cleanup
from tests.kit.asserts import assert_same_outputs
from tests.kit.graphs import initializer, make_model, ops

RNG = np.random.default_rng(1)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def old_style_model():
    """Opset 9, IR 3: weight built by ConstantOfShape, initializers also listed as inputs."""
    fill = helper.make_tensor("value", TensorProto.FLOAT, [1], [0.5])
    return make_model(
        [
            helper.make_node("ConstantOfShape", ["w_shape"], ["w"], value=fill),
            helper.make_node("Conv", ["x", "w", "b"], ["c"]),
            helper.make_node("Dropout", ["c"], ["d"], ratio=0.3),
            helper.make_node("Relu", ["d"], ["y"]),
        ],
        [("x", [1, 3, 5, 5])],
        ["y"],
        [initializer("w_shape", np.array([4, 3, 3, 3], np.int64)), initializer("b", rand(4))],
        opset=9,
        ir_version=3,
        initializers_as_inputs=True,
    )


def test_cleanup_materializes_constant_of_shape_weights_of_old_exports() -> None:
    model = old_style_model()
    reference = model.clone()
    result = cleanup.CleanupPass()(model)
    assert result.modified
    assert ops(model) == {"Conv": 1, "Relu": 1}
    weight = next(iter(model.graph)).inputs[1]
    assert weight.is_initializer() and weight.const_value.numpy().shape == (4, 3, 3, 3)
    assert np.all(weight.const_value.numpy() == 0.5)
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert model.ir_version == 4
    assert {"initializer-inputs", "constant-of-shape", "remove-dropout"} <= set(result.changed_by)
    assert_same_outputs(reference, model)


def test_keep_initializer_inputs_leaves_overridable_weights_alone() -> None:
    model = old_style_model()
    cleanup.CleanupPass(keep_initializer_inputs=True)(model)
    assert ops(model)["ConstantOfShape"] == 1  # its shape is an input the user may override
    assert model.ir_version == 3
    assert len(model.graph.inputs) == 3


def test_constant_of_shape_size_limit_skips_large_tensors() -> None:
    model = old_style_model()
    cleanup.InitializerInputsPass()(model)
    result = cleanup.MaterializeConstantOfShapePass(size_limit=10, weight_limit=10)(model)
    assert not result.modified
    assert result.skipped[0].reason == "108 elements"
    # a Conv weight has its own, larger limit: the fusions need it as an initializer
    assert cleanup.MaterializeConstantOfShapePass(size_limit=10)(model).modified


@pytest.mark.parametrize("opset", [9, 13])
def test_remove_dropout(opset: int) -> None:
    nodes = [
        helper.make_node("Dropout", ["x"], ["d"], ratio=0.5)
        if opset < 12
        else helper.make_node("Dropout", ["x", "r"], ["d"]),
        helper.make_node("Dropout", ["d"], ["y", "mask"]),  # mask read: stays
        helper.make_node("Dropout", ["x"], ["z"]),  # graph output: keeps its name
    ]
    inits = [initializer("r", np.array(0.5, np.float32))] if opset >= 12 else []
    model = make_model(
        nodes, [("x", [2, 3])], ["y", "mask", "z"], inits, opset=opset,
        output_types={"mask": TensorProto.BOOL} if opset >= 10 else None,  # Dropout-7: float
        check=opset >= 10,  # Dropout-7's mask gets no inferred shape: the checker wants one
    )
    reference = model.clone()
    result = cleanup.RemoveDropoutPass()(model)
    assert result.modified
    assert ops(model) == {"Dropout": 1, "Identity": 1}
    assert [s.reason for s in result.skipped] == ["its mask output is used"]
    assert [v.name for v in model.graph.outputs] == ["y", "mask", "z"]
    feeds = {"x": rand(2, 3)}
    assert_same_outputs(reference, model, feeds)


def test_dropout_in_training_mode_stays() -> None:
    model = make_model(
        [helper.make_node("Dropout", ["x", "", "t"], ["y"])],
        [("x", [2, 3])],
        ["y"],
        [initializer("t", np.array(True))],
        opset=13,
    )
    result = cleanup.RemoveDropoutPass()(model)
    assert not result.modified
    assert "training_mode" in result.skipped[0].reason


def test_reshape_and_transpose_chains_collapse() -> None:
    model = make_model(
        [
            helper.make_node("Reshape", ["x", "s1"], ["r1"]),
            helper.make_node("Reshape", ["r1", "s2"], ["r2"]),
            helper.make_node("Transpose", ["r2"], ["t1"], perm=[1, 0, 2]),
            helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1]),
            helper.make_node("Transpose", ["t2"], ["t3"], perm=[0, 2, 1]),
            helper.make_node("Transpose", ["t3"], ["y"], perm=[1, 0, 2]),
            helper.make_node("Transpose", ["x"], ["u1"], perm=[1, 0]),
            helper.make_node("Transpose", ["u1"], ["z"], perm=[1, 0]),
        ],
        [("x", [6, 4])],
        ["y", "z"],
        [
            initializer("s1", np.array([24], np.int64)),
            initializer("s2", np.array([2, 3, 4], np.int64)),
        ],
    )
    reference = model.clone()
    result = cleanup.SimplifyShapeChainsPass()(model)
    assert result.modified
    assert ops(model) == {"Reshape": 1, "Identity": 1}  # y = reshape(x); z = x needs an Identity
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
    assert_same_outputs(reference, model)


def test_transposes_compose_into_one() -> None:
    model = make_model(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[2, 0, 1]),
            helper.make_node("Transpose", ["t"], ["y"], perm=[0, 2, 1]),
        ],
        [("x", [2, 3, 4])],
        ["y"],
    )
    reference = model.clone()
    cleanup.SimplifyShapeChainsPass()(model)
    assert ops(model) == {"Transpose": 1}
    assert list(next(iter(model.graph)).attributes.get_ints("perm")) == [2, 1, 0]
    assert_same_outputs(reference, model)


def test_fold_constants_cse_identity_and_unused_initializers() -> None:
    model = make_model(
        [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),  # constant: folded
            helper.make_node("MatMul", ["x", "wt"], ["m"]),
            helper.make_node("Relu", ["m"], ["r1"]),
            helper.make_node("Relu", ["m"], ["r2"]),  # same as r1: CSE
            helper.make_node("Identity", ["r2"], ["i"]),
            helper.make_node("Add", ["r1", "i"], ["y"]),
            helper.make_node("Neg", ["x"], ["dead"]),
        ],
        [("x", [2, 4])],
        ["y"],
        [initializer("w", rand(3, 4)), initializer("unused", rand(5))],
    )
    reference = model.clone()
    result = cleanup.CleanupPass()(model)
    assert ops(model) == {"MatMul": 1, "Relu": 1, "Add": 1}
    assert "unused" not in model.graph.initializers and "w" not in model.graph.initializers
    assert {"fold-constants", "cse", "remove-unused"} <= set(result.changed_by)
    assert_same_outputs(reference, model)
    assert not cleanup.CleanupPass()(model).modified  # a fixed point


def test_cleanup_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="max_rounds must be >= 1"):
        cleanup.CleanupPass(max_rounds=0)


def test_wrapped_onnx_ir_passes_dedupe_shape_inference_and_sort() -> None:
    import onnx_ir as ir

    from slimgraph.passes import run_pipeline

    same = rand(3)
    model = make_model(
        [
            helper.make_node("Add", ["x", "a"], ["s"]),
            helper.make_node("Mul", ["s", "b"], ["y"]),
        ],
        [("x", [2, 3])],
        ["y"],
        [initializer("a", same), initializer("b", same.copy())],
    )
    # shuffle the nodes out of order and forget the intermediate shape
    nodes = list(model.graph)
    for node in nodes:
        model.graph.remove(node)
    model.graph.extend(reversed(nodes))
    nodes[0].outputs[0].shape = None
    result = run_pipeline(
        model, ["topological-sort", "shape-inference", "dedupe-initializers"], verify=True
    )
    optimized = result.model
    assert [n.op_type for n in optimized.graph] == ["Add", "Mul"]
    assert next(iter(optimized.graph)).outputs[0].shape == ir.Shape([2, 3])
    assert len(optimized.graph.initializers) == 1
    assert [r.modified for r in result.records] == [True, True, True]
    assert_same_outputs(make_model(
        [helper.make_node("Add", ["x", "a"], ["s"]), helper.make_node("Mul", ["s", "a"], ["y"])],
        [("x", [2, 3])],
        ["y"],
        [initializer("a", same)],
    ), optimized)


def test_constant_of_shape_that_is_a_graph_output_keeps_its_name() -> None:
    fill = helper.make_tensor("value", TensorProto.FLOAT, [1], [2.0])
    model = make_model(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["c"], value=fill),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        [("x", [2, 3])],
        ["y", "c"],
        [initializer("shape", np.array([2, 3], np.int64))],
    )
    reference = model.clone()
    assert cleanup.MaterializeConstantOfShapePass()(model).modified
    assert [v.name for v in model.graph.outputs] == ["y", "c"]
    assert ops(model) == {"Add": 1, "Identity": 1}
    assert_same_outputs(reference, model)


def test_cleanup_inlines_local_functions_so_their_nodes_can_be_cleaned() -> None:
    import onnx
    import onnx_ir as ir

    function = helper.make_function(
        "local",
        "AddThenIdentity",
        ["a", "b"],
        ["c"],
        [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Identity", ["s"], ["c"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("AddThenIdentity", ["x", "x"], ["y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    proto = helper.make_model(
        graph,
        functions=[function],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
    )
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    model = ir.from_proto(proto)
    reference = model.clone()
    result = cleanup.CleanupPass()(model)
    assert "inline-functions" in result.changed_by
    assert ops(model) == {"Add": 1} and not model.functions
    assert_same_outputs(reference, model)
