"""Rewired edges asserted by identity (`is`), not only by op counts.

After a pass removes or inserts nodes, each reader must read the very `ir.Value` the rewrite
promises (the original producer's output, the surviving node's output, a DequantizeLinear's
output), with the IR's use lists agreeing (`tests.kit.asserts.assert_rewired`). Passes are run
by their registered names, as recipes and the command line name them; outputs are compared on
onnxruntime with the exact-pass tolerance where the pass is exact.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import helper

import slimgraph as sg
from slimgraph.passes import run_pipeline
from tests.kit.asserts import assert_fed_by, assert_rewired, assert_same_outputs, check_valid
from tests.kit.data import linear_feeds
from tests.kit.graphs import (
    batchnorm,
    initializer,
    linear_model,
    make_model,
    node_named,
    only_node,
    ops,
)

RNG = np.random.default_rng(12)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def run(model: ir.Model, *steps: str) -> ir.Model:
    """The model after the named passes (the input is left untouched), outputs checked equal."""
    result = run_pipeline(model, list(steps)).model
    assert_same_outputs(model, result)
    return result


def graph_input(model: ir.Model, name: str) -> ir.Value:
    return next(value for value in model.graph.inputs if value.name == name)


# -- cleanup ---------------------------------------------------------------------------------


def test_identity_elimination_reader_reads_the_original_value() -> None:
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Identity", ["r"], ["i"], name="id"),
            helper.make_node("Sigmoid", ["i"], ["y"], name="sigmoid"),
        ],
        [("x", [2, 3])],
        ["y"],
    )
    result = run(model, "eliminate-identity")
    assert "Identity" not in ops(result)
    assert_rewired(node_named(result, "sigmoid"), 0, node_named(result, "relu").outputs[0])


def test_identity_of_a_graph_input_is_bypassed_to_the_input_itself() -> None:
    model = make_model(
        [
            helper.make_node("Identity", ["x"], ["i"], name="id"),
            helper.make_node("Relu", ["i"], ["y"], name="relu"),
        ],
        [("x", [2, 3])],
        ["y"],
    )
    result = run(model, "eliminate-identity")
    assert_rewired(node_named(result, "relu"), 0, graph_input(result, "x"))


def test_dropout_removal_reader_reads_the_dropout_input() -> None:
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Dropout", ["r"], ["d"], name="drop"),
            helper.make_node("Sigmoid", ["d"], ["y"], name="sigmoid"),
        ],
        [("x", [2, 3])],
        ["y"],
    )
    result = run(model, "remove-dropout")
    assert "Dropout" not in ops(result)
    assert_rewired(node_named(result, "sigmoid"), 0, node_named(result, "relu").outputs[0])


def test_transpose_pair_that_cancels_leaves_the_reader_on_the_input() -> None:
    model = make_model(
        [
            helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 1]),
            helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1]),
            helper.make_node("Relu", ["t2"], ["y"], name="relu"),
        ],
        [("x", [2, 3, 4])],
        ["y"],
    )
    result = run(model, "simplify-reshape-transpose")
    assert "Transpose" not in ops(result)
    assert_rewired(node_named(result, "relu"), 0, graph_input(result, "x"))


def test_reshape_chain_collapses_to_one_reshape_of_the_input() -> None:
    model = make_model(
        [
            helper.make_node("Reshape", ["x", "s1"], ["a"]),
            helper.make_node("Reshape", ["a", "s2"], ["b"]),
            helper.make_node("Relu", ["b"], ["y"], name="relu"),
        ],
        [("x", [2, 3, 4])],
        ["y"],
        [
            initializer("s1", np.array([6, 4], np.int64)),
            initializer("s2", np.array([4, 6], np.int64)),
        ],
    )
    result = run(model, "simplify-reshape-transpose")
    reshape = assert_fed_by(node_named(result, "relu"), 0, "Reshape")
    assert_rewired(reshape, 0, graph_input(result, "x"))
    assert ops(result)["Reshape"] == 1


def test_cse_gives_both_readers_one_value() -> None:
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r1"], name="relu1"),
            helper.make_node("Relu", ["x"], ["r2"], name="relu2"),
            helper.make_node("Add", ["r1", "r2"], ["y"], name="add"),
        ],
        [("x", [2, 3])],
        ["y"],
    )
    result = run(model, "cse")
    add = node_named(result, "add")
    relu = assert_fed_by(add, 0, "Relu")
    assert_rewired(add, 1, relu.outputs[0])
    assert ops(result)["Relu"] == 1


# -- fusions ---------------------------------------------------------------------------------


def test_conv_batchnorm_fusion_reader_of_the_bn_reads_the_conv() -> None:
    bn, params = batchnorm("c", "n", "bn", 4, RNG)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            bn,
            helper.make_node("Relu", ["n"], ["y"], name="relu"),
        ],
        [("x", [1, 3, 6, 6])],
        ["y"],
        [initializer("w", rand(4, 3, 3, 3)), *params],
    )
    result = run(model, "fuse-batchnorm")
    assert "BatchNormalization" not in ops(result)
    conv = only_node(result, "Conv")
    assert_rewired(node_named(result, "relu"), 0, conv.outputs[0])
    assert_rewired(conv, 0, graph_input(result, "x"))
    bias = conv.inputs[2]  # the folded bias is a registered initializer of the graph
    assert bias is not None and result.graph.initializers[str(bias.name)] is bias


def test_conv_batchnorm_fusion_conv_output_becomes_the_graph_output() -> None:
    bn, params = batchnorm("c", "y", "bn", 2, RNG)
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn],
        [("x", [1, 3, 5, 5])],
        ["y"],
        [initializer("w", rand(2, 3, 1, 1)), *params],
    )
    result = run(model, "fuse-batchnorm")
    assert result.graph.outputs[0] is only_node(result, "Conv").outputs[0]
    assert result.graph.outputs[0].name == "y"


def test_affine_fold_reader_of_the_add_reads_the_conv() -> None:
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("Mul", ["c", "scale"], ["m"], name="mul"),
            helper.make_node("Add", ["m", "shift"], ["a"], name="add"),
            helper.make_node("Relu", ["a"], ["y"], name="relu"),
        ],
        [("x", [1, 3, 5, 5])],
        ["y"],
        [
            initializer("w", rand(4, 3, 3, 3)),
            initializer("scale", rand(1, 4, 1, 1)),
            initializer("shift", rand(4, 1, 1)),
        ],
    )
    result = run(model, "fold-affine")
    assert ops(result) == {"Conv": 1, "Relu": 1}
    assert_rewired(node_named(result, "relu"), 0, only_node(result, "Conv").outputs[0])


def test_zero_pad_fusion_conv_reads_the_unpadded_input() -> None:
    model = make_model(
        [
            helper.make_node("Pad", ["x", "pads"], ["p"], name="pad"),
            helper.make_node("Conv", ["p", "w"], ["y"], name="conv"),
        ],
        [("x", [1, 2, 5, 5])],
        ["y"],
        [
            initializer("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
            initializer("w", rand(3, 2, 3, 3)),
        ],
    )
    result = run(model, "fuse-pad")
    assert "Pad" not in ops(result)
    assert_rewired(node_named(result, "conv"), 0, graph_input(result, "x"))


def test_matmul_add_to_gemm_reader_reads_the_gemm() -> None:
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
            helper.make_node("Add", ["m", "b"], ["a"], name="add"),
            helper.make_node("Relu", ["a"], ["y"], name="relu"),
        ],
        [("x", [2, 4])],
        ["y"],
        [initializer("w", rand(4, 3)), initializer("b", rand(3))],
    )
    result = run(model, "matmul-add-to-gemm")
    gemm = assert_fed_by(node_named(result, "relu"), 0, "Gemm")
    assert_rewired(gemm, 0, graph_input(result, "x"))
    assert ops(result) == {"Gemm": 1, "Relu": 1}


def test_sum_of_one_input_goes_and_its_reader_reads_that_input() -> None:
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Sum", ["r"], ["s"], name="sum"),
            helper.make_node("Sigmoid", ["s"], ["y"], name="sigmoid"),
        ],
        [("x", [2, 3])],
        ["y"],
    )
    result = run(model, "sum-to-add")
    assert "Sum" not in ops(result)
    assert_rewired(node_named(result, "sigmoid"), 0, node_named(result, "relu").outputs[0])


# -- pruning surgery -------------------------------------------------------------------------


def _two_convs() -> ir.Model:
    """x[N,3,6,6] -> conv1(3->8) -> Relu -> conv2(8->4, bias) -> y."""
    return make_model(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2"),
        ],
        [("x", ["N", 3, 6, 6])],
        ["y"],
        [
            initializer("w1", rand(8, 3, 3, 3)),
            initializer("b1", rand(8)),
            initializer("w2", rand(4, 8, 1, 1)),
            initializer("b2", rand(4)),
        ],
    )


def test_prune_surgery_keeps_edges_and_registers_the_shrunk_weights() -> None:
    pruned = sg.prune(_two_convs(), ratio=0.5)
    conv1, relu, conv2 = (node_named(pruned, n) for n in ("conv1", "relu", "conv2"))
    assert_rewired(conv1, 0, graph_input(pruned, "x"))
    assert_rewired(relu, 0, conv1.outputs[0])
    assert_rewired(conv2, 0, relu.outputs[0])
    assert pruned.graph.outputs[0] is conv2.outputs[0]
    shrunk = ((conv1, 1, (4, 3, 3, 3)), (conv1, 2, (4,)), (conv2, 1, (4, 4, 1, 1)))
    for node, index, shape in shrunk:
        weight = node.inputs[index]
        assert weight is not None and pruned.graph.initializers[str(weight.name)] is weight
        assert weight.const_value is not None and weight.const_value.shape == shape
    check_valid(pruned)


def test_prune_padding_graph_output_is_the_gather_of_the_pad_of_the_pruned_layer() -> None:
    """A pruned graph output is padded back: output <- Gather <- Pad <- the pruned Gemm."""
    model = make_model(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2"], ["logits"], name="fc2", transB=1),
        ],
        [("x", ["N", 6])],
        ["logits"],
        [initializer("w1", rand(8, 6)), initializer("w2", rand(10, 8))],
    )
    pruned = sg.prune(model, ratio=0.5, pad=True, prune_outputs=["logits"])
    output = pruned.graph.outputs[0]
    assert output.name == "logits"
    gather = output.producer()
    assert gather is not None and gather.op_type == "Gather"
    pad = assert_fed_by(gather, 0, "Pad")
    assert_rewired(pad, 0, node_named(pruned, "fc2").outputs[0])
    assert output.shape is not None and [str(d) for d in output.shape] == ["N", "10"]
    check_valid(pruned)


# -- quantization ----------------------------------------------------------------------------


def test_qdq_reader_of_a_quantized_activation_reads_the_dequantize_output() -> None:
    model = linear_model()
    quantized = sg.quantize(model, calibration=linear_feeds())
    sources = {  # consumer -> the value whose quantized copy it must read
        "mm0": graph_input(quantized, "x"),
        "gemm1": node_named(quantized, "relu0").outputs[0],
        "gemm2": node_named(quantized, "gemm1").outputs[0],
    }
    for consumer_name, source in sources.items():
        consumer = node_named(quantized, consumer_name)
        dq = assert_fed_by(consumer, 0, "DequantizeLinear")
        q = assert_fed_by(dq, 0, "QuantizeLinear")
        assert_rewired(q, 0, source)
        # one scale and zero point, shared by the pair (not two equal copies)
        assert_rewired(dq, 1, q.inputs[1])
        assert_rewired(dq, 2, q.inputs[2])
        weight_dq = assert_fed_by(consumer, 1, "DequantizeLinear")
        assert weight_dq.inputs[0] is not None and weight_dq.inputs[0].is_initializer()
    # the float readers of the activations are the Q nodes and nothing else
    relu_out = node_named(quantized, "relu0").outputs[0]
    assert {use.node.op_type for use in relu_out.uses()} == {"QuantizeLinear"}
    assert quantized.graph.outputs[0] is node_named(quantized, "gemm2").outputs[0]
