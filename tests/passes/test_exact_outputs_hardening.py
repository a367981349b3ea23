"""Issue 10, kinds 1-4: exact passes keep every output (names, order, types), MatMul+Add becomes
Gemm only when the Gemm is valid, values made by If keep their types, lossless never inflates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimgraph as sg
from slimgraph.passes import cleanup
from slimgraph.runtime import create_session, random_feeds, run
from slimgraph.tools.cli import main
from tests.kit.asserts import assert_same_outputs
from tests.kit.graphs import initializer, make_model, ops

RNG = np.random.default_rng(10)
ZOO = Path(onnx.__file__).parent / "backend/test/data/light"


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _check_all_ways(model: ir.Model, names: list[str]) -> None:
    """optimize (verified and not) and dynamic/weight-only quantize keep the names in order,
    and optimize keeps the outputs (exact tolerance) and a model onnx's checker accepts."""
    for verify in (True, False):
        out = sg.optimize(model, verify=verify)
        assert [v.name for v in out.graph.outputs] == names
        assert_same_outputs(model, out)
        onnx.checker.check_model(ir.to_proto(out), full_check=True)
    for mode in ("dynamic", "weight-only"):
        quantized = sg.quantize(model, mode=mode) if _has_weight(model) else None
        if quantized is not None:
            assert [v.name for v in quantized.graph.outputs] == names


def _has_weight(model: ir.Model) -> bool:
    return any(n.op_type == "MatMul" and n.inputs[1].is_initializer() for n in model.graph)


# ---------------------------------------------------------------- kind 1: output names


def test_identity_alias_of_an_output_keeps_both_names() -> None:
    """The dynamo export of `return h2, (h1, h2)`: Identity(linear_1) -> linear_1_alias_2."""
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["linear_1"]),
            helper.make_node("Identity", ["linear_1"], ["linear_1_alias_2"]),
        ],
        [("x", [2, 16])], ["linear_1", "linear_1_alias_2"], [initializer("W", rand(16, 16))],
    )
    _check_all_ways(model, ["linear_1", "linear_1_alias_2"])


@pytest.mark.parametrize(
    "case",
    ["cse", "one-input-sum", "dropout", "identity-transpose", "transpose-chain", "input-output"],
)
def test_outputs_sharing_a_value_after_a_rewrite_keep_their_names(case: str) -> None:
    nodes = {
        "cse": [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["b"])],
        "one-input-sum": [helper.make_node("Relu", ["x"], ["a"]),
                          helper.make_node("Sum", ["a"], ["b"])],
        "dropout": [helper.make_node("Relu", ["x"], ["a"]),
                    helper.make_node("Dropout", ["a"], ["b"])],
        "identity-transpose": [helper.make_node("Relu", ["x"], ["a"]),
                               helper.make_node("Transpose", ["a"], ["b"], perm=[0, 1])],
        "transpose-chain": [helper.make_node("Transpose", ["x"], ["a"], perm=[1, 0]),
                            helper.make_node("Transpose", ["a"], ["b"], perm=[1, 0])],
        "input-output": [helper.make_node("Identity", ["x"], ["a"]),
                         helper.make_node("Identity", ["a"], ["b"])],
    }[case]
    model = make_model(nodes, [("x", [4, 4])], ["b", "a"])
    _check_all_ways(model, ["b", "a"])


def test_a_slimgraph_pass_cannot_lose_an_output_name() -> None:
    """The guard in every SlimgraphPass: an Identity carries the second name."""
    model = make_model(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["b"])],
        [("x", [2, 3])], ["a", "b"],
    )
    result = cleanup.GuardedCommonSubexpressionEliminationPass()(model)
    assert result.modified
    assert [v.name for v in model.graph.outputs] == ["a", "b"]
    assert ops(model) == {"Relu": 1, "Identity": 1}


def test_torch_module_returning_an_output_twice(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)

        def forward(self, x):  # noqa: ANN001, ANN201
            h1 = self.a(x).reshape(-1, 8)  # a no-op view: optimize has something to remove
            h2 = self.b(h1)
            return h2, (h1, h2)

    source = tmp_path / "twice.onnx"
    program = torch.onnx.export(Twice().eval(), (torch.randn(2, 8),), dynamo=True, optimize=False)
    program.save(str(source))  # an output listed twice (older exporters: an Identity alias)
    names = [v.name for v in sg.load(source).graph.outputs]
    assert len(names) == 3
    for args in (["optimize"], ["quantize", "--mode", "dynamic"], ["quantize", "--mode",
                                                                    "weight-only"]):
        out = tmp_path / f"{args[-1]}.onnx"
        assert main([*args, str(source), "-o", str(out)]) == 0
        assert [v.name for v in sg.load(out).graph.outputs] == names


# ---------------------------------------------------------------- kind 2: MatMul+Add -> Gemm


@pytest.mark.parametrize(
    ("x_shape", "bias_shape", "bias_left", "fused"),
    [
        ([1, 3], [2, 5], False, False),  # the example: the Add broadcasts the output to [2, 5]
        ([1, 3], [2, 5], True, False),  # bias on the left
        ([1, 3], [2, 1], False, False),  # a [2, 1] bias also grows M
        ([4, 3], [4, 1], False, True),  # a [M, 1] bias is a valid Gemm C
        ([4, 3], [5], True, True),
    ],
)
def test_matmul_add_becomes_gemm_only_when_valid(
    x_shape: list[int], bias_shape: list[int], bias_left: bool, fused: bool
) -> None:
    add_inputs = ["B", "m"] if bias_left else ["m", "B"]
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", add_inputs, ["y"])],
        [("x", x_shape)], ["y"],
        [initializer("W", rand(3, 5)), initializer("B", rand(*bias_shape))],
    )
    for verify in (True, False):
        out = sg.optimize(model, verify=verify)
        assert ("Gemm" in ops(out)) == fused
        assert_same_outputs(model, out)  # runs on onnxruntime: a bad Gemm would be rejected


def test_add_of_a_matmul_with_itself_stays() -> None:
    """`x@W + x@W` after CSE: Add(m, m) used to crash the rule with 'still being used'."""
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"]),
            helper.make_node("MatMul", ["x", "W"], ["m2"]),
            helper.make_node("Add", ["m", "m2"], ["y"]),
        ],
        [("x", [4, 3])], ["y"], [initializer("W", rand(3, 5))],
    )
    out = sg.optimize(model)
    assert ops(out) == {"MatMul": 1, "Add": 1}
    assert_same_outputs(model, out)


# ---------------------------------------------------------------- kind 3: If/Loop types


def _branch(name: str, op: str) -> onnx.GraphProto:
    out = f"{name}_out"
    return helper.make_graph(
        [helper.make_node(op, ["x"], [out])], name, [],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
    )


def _if_model(tail: list[onnx.NodeProto]) -> ir.Model:
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["io"], then_branch=_branch("t", "Relu"),
                         else_branch=_branch("e", "Neg")),
    ]
    model = make_model(nodes + tail, [("x", [2, 4])], ["y"],
                       [initializer("zero", np.array(0, np.float32))])
    for node in model.graph:  # what exporters write: If/Sum outputs without a type
        for value in node.outputs:
            if node.op_type in ("If", "Sum") and not value.is_graph_output():
                value.type, value.shape = None, None
    return model


@pytest.mark.parametrize(
    "tail",
    [
        [helper.make_node("Sum", ["io", "x"], ["s2"]), helper.make_node("Relu", ["s2"], ["y"])],
        [helper.make_node("Sum", ["io"], ["y"])],
        [helper.make_node("Dropout", ["io"], ["y"])],  # a relative: another identity-like op
    ],
    ids=["sum-relu", "one-input-sum-output", "dropout-output"],
)
def test_values_made_by_if_keep_their_types(tail: list[onnx.NodeProto]) -> None:
    model = _if_model(tail)
    for verify in (True, False):
        out = sg.optimize(model, verify=verify)
        assert all(v.type is not None for v in out.graph.outputs)
        onnx.checker.check_model(ir.to_proto(out), full_check=True)
        feeds = {"x": np.abs(rand(2, 4))}
        assert_same_outputs(model, out, feeds)
        assert_same_outputs(model, out, {"x": -np.abs(rand(2, 4))})


# ---------------------------------------------------------------- kind 4: no inflation


def _inflating_model(shape: tuple[int, ...] = (1, 64, 256, 256)) -> ir.Model:
    """7.5 KB that builds [1,64,256,256] at run time: Mul by ConstantOfShape ones, Add of an
    expanded bias."""
    one = numpy_helper.from_array(np.array([1.0], np.float32))
    return make_model(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=one),
            helper.make_node("Expand", ["bias", "shape"], ["big_bias"]),
            helper.make_node("Mul", ["x", "ones"], ["m"]),
            helper.make_node("Add", ["m", "big_bias"], ["y"]),
        ],
        [("x", list(shape))], ["y"],
        [initializer("shape", np.array(shape, np.int64)), initializer("bias", rand(1, 64, 1, 1))],
    )


@pytest.mark.parametrize("command", [["optimize"], ["quantize", "--mode", "dynamic"]])
def test_run_time_constants_are_not_folded_into_the_file(
    command: list[str], tmp_path: Path
) -> None:
    source, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    sg.save(_inflating_model(), source)
    code = main([*command, str(source), "-o", str(out)])
    assert code in (0, 2)  # dynamic mode finds no weight to quantize: exit 2, nothing written
    if code == 0:
        assert out.stat().st_size <= source.stat().st_size + 1024


def test_static_quantize_does_not_inflate(tmp_path: Path) -> None:
    """The issue's static case: a Conv after the ConstantOfShape/Expand arithmetic."""
    model = _inflating_model()
    proto = ir.to_proto(model)
    proto.graph.initializer.append(numpy_helper.from_array(rand(4, 64, 1, 1), "cw"))
    proto.graph.node.append(helper.make_node("Conv", ["y", "cw"], ["z"], strides=[8, 8]))
    proto.graph.output[0].name = "z"
    source, out, calib = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "c.npz"
    onnx.save(proto, source)
    np.savez(calib, x=rand(2, 64, 256, 256))
    assert main(["quantize", str(source), "-o", str(out), "--calib", str(calib)]) == 0
    assert out.stat().st_size < 16 * 1024  # was 16.8 MB: the run-time tensors were stored


def test_a_huge_constant_of_shape_is_never_materialized() -> None:
    """[65536, 65536] float32 is 16 GiB: left as a node, even as a MatMul weight."""
    zero = numpy_helper.from_array(np.array([0.0], np.float32))
    model = make_model(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["w"], value=zero),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        [("x", [1, 65536])], ["y"], [initializer("shape", np.array([65536, 65536], np.int64))],
    )
    result = cleanup.MaterializeConstantOfShapePass()(model)
    assert not result.modified and "ConstantOfShape" in ops(model)
    out = sg.optimize(model, verify=False)
    assert "ConstantOfShape" in ops(out)


def test_light_resnet50_does_not_grow(tmp_path: Path) -> None:
    source = ZOO / "light_resnet50.onnx"
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(source), "-o", str(out)]) == 0
    assert out.stat().st_size <= source.stat().st_size
    assert "BatchNormalization" not in ops(sg.load(out))  # the fusion still happened
    feeds = random_feeds(sg.load(source), seed=5)
    expected = run(create_session(source, optimization="disable"), feeds)
    got = run(create_session(out, optimization="disable"), feeds)
    for name, ref in expected.items():
        atol = 1e-5 * max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=atol)


def test_compact_constants_round_trips_bits() -> None:
    """Uniform and per-row-uniform weights come back bit for bit from ConstantOfShape/Expand."""
    rows = np.repeat(rand(6, 1, 1, 1), 27, axis=1).reshape(6, 3, 3, 3)
    model = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"])],
        [("x", [1, 3, 5, 5])], ["y"],
        [initializer("w", rows), initializer("b", np.full(32, 0.25, np.float32)[:6])],
    )
    reference = model.clone()
    result = cleanup.CompactConstantsPass(min_elements=4, min_bytes=0, max_new_nodes=2)(model)
    assert result.modified
    assert ops(model)["Expand"] == 1 and ops(model)["ConstantOfShape"] == 1
    assert_same_outputs(reference, model)
    folded = sg.optimize(model, recipe=["cleanup"], verify=False)  # folds them back
    conv = next(node for node in folded.graph if node.op_type == "Conv")
    assert np.array_equal(conv.inputs[1].const_value.numpy(), rows)
