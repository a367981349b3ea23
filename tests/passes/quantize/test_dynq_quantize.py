"""Dynamic int8 quantization: structure, weight scales and fidelity on onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import from_torch, layer_name
from slimgraph.passes._kit import traced_constant
from slimgraph.passes.quantize.dynamic import DynamicQuantizePass, quantize_dynamic
from slimgraph.runtime import compare, create_session, random_feeds, run
from tests import models as test_models
from tests.kit.exports import exported_model


def _feeds(name: str, model: ir.Model, batch: int = 1) -> dict[str, np.ndarray]:
    names = [value.name for value in model.graph.inputs]
    return {
        n: t.numpy() for n, t in zip(names, test_models.example_input(name, batch), strict=True)
    }


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def _weights_by_layer(model: ir.Model) -> dict[str, np.ndarray]:
    """The float weight [K, N] of every MatMul with a constant right operand, by layer name."""
    found = {}
    for node in model.graph:
        if node.op_type == "MatMul":
            weight = traced_constant(node.inputs[1])
            if weight is not None:
                found[layer_name(node)] = weight
    return found


def test_bert_dynamic_int8_keeps_cosine_and_leaves_mask_path_float() -> None:
    model = exported_model("bert")
    quantized = quantize_dynamic(model)
    ops = _ops(quantized)
    assert ops.count("MatMulInteger") == 12  # q, k, v, out, fc1, fc2 in two layers
    assert ops.count("MatMul") == 4  # attention scores and context: activations only
    assert ops.count("GatherBlockQuantized") == 2  # token and position embeddings
    assert ops.count("Where") == 1 and ops.count("Greater") == 1
    where = next(n for n in quantized.graph if n.op_type == "Where")
    assert all(v is not None and v.dtype != ir.DataType.UINT8 for v in where.inputs)
    fidelity = compare(model, quantized, _feeds("bert", model))
    assert fidelity.worst_cosine >= 0.995


def test_mlp_both_matmul_kernels_run_and_agree() -> None:
    model = exported_model("mlp")
    feeds = random_feeds(model, seed=3)
    integer = DynamicQuantizePass(matmul_kernel="integer")(model.clone()).model
    fused = DynamicQuantizePass(matmul_kernel="fused")(model.clone()).model
    assert _ops(fused).count("DynamicQuantizeMatMul") == 5
    assert "Add" in _ops(integer) and _ops(fused).count("Add") == 2  # biases fused, residuals kept
    for candidate in (integer, fused):
        assert compare(model, candidate, feeds).worst_cosine >= 0.995
    a = run(create_session(integer), feeds)
    b = run(create_session(fused), feeds)
    for name, value in a.items():
        # The same integer arithmetic in two kernels: equal up to float rounding (measured 0.0).
        np.testing.assert_allclose(b[name], value, rtol=1e-5, atol=1e-5 * np.abs(value).max())


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_scales_are_max_abs_over_127_per_output_channel(per_channel: bool) -> None:
    model = exported_model("mlp")
    originals = _weights_by_layer(model)
    quantized = quantize_dynamic(model, per_channel=per_channel)
    checked = 0
    for node in quantized.graph:
        if node.op_type != "MatMulInteger":
            continue
        codes = node.inputs[1].const_value.numpy()
        assert codes.dtype == np.int8
        weight = originals[layer_name(node)]
        cast = next(iter(node.outputs[0].uses())).node
        mul = next(iter(cast.outputs[0].uses())).node
        scales_node = mul.inputs[1].producer()
        scale = next(v.const_value.numpy() for v in scales_node.inputs if v.const_value is not None)
        if per_channel:
            assert scale.shape == (weight.shape[1],)
            expected = np.abs(weight).max(axis=0) / 127
        else:
            assert scale.shape == ()
            expected = np.abs(weight).max() / 127
        np.testing.assert_allclose(scale, expected, rtol=1e-6)
        assert np.all(np.abs(codes * scale - weight) <= scale / 2 * (1 + 1e-5))
        checked += 1
    assert checked == 5


def test_embeddings_are_stored_int8_with_per_row_scales() -> None:
    model = exported_model("bert")
    table = model.graph.initializers["embed.weight"].const_value.numpy()
    quantized = quantize_dynamic(model, op_types=["Gather"])
    gathers = [n for n in quantized.graph if n.op_type == "GatherBlockQuantized"]
    embed = next(n for n in gathers if layer_name(n) == "embed")
    codes = embed.inputs[0].const_value.numpy()
    scale = embed.inputs[2].const_value.numpy()
    assert codes.dtype == np.uint8 and codes.shape == table.shape  # int8 codes offset by 128
    assert scale.shape == (table.shape[0], 1)
    np.testing.assert_allclose(scale[:, 0], np.abs(table).max(axis=1) / 127, rtol=1e-6)
    rows = (codes.astype(np.float32) - 128) * scale
    assert np.all(np.abs(rows - table) <= scale / 2 * (1 + 1e-5))
    assert "embed.weight" not in quantized.graph.initializers
    assert _ops(quantized).count("MatMul") == 16  # op_types=["Gather"]: MatMuls untouched
    # the gathered rows are exactly the dequantized table rows
    ids = np.array([[0, 5, 999, 5]], np.int64)
    h = onnx.helper
    gather = h.make_node(
        "GatherBlockQuantized", ["q", "ids", "s"], ["y"], domain="com.microsoft", bits=8,
        gather_axis=0, quantize_axis=1, block_size=embed.attributes.get_int("block_size"),
    )  # fmt: skip
    graph = h.make_graph(
        [gather], "probe", [h.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(codes, "q"), onnx.numpy_helper.from_array(scale, "s")],
    )  # fmt: skip
    opsets = [h.make_opsetid("", 20), h.make_opsetid("com.microsoft", 1)]
    probe = ir.from_proto(h.make_model(graph, opset_imports=opsets, ir_version=10))
    got = run(create_session(probe), {"ids": ids})["y"]
    np.testing.assert_allclose(got[0], rows[ids[0]], rtol=1e-6, atol=1e-7)


def test_exclusion_by_layer_pattern_and_op_type() -> None:
    model = exported_model("mlp")
    result = DynamicQuantizePass(exclude=["blocks.0.*"])(model.clone())
    layers = {q.layer for q in result.quantized}
    assert layers == {"blocks.1.fc1", "blocks.1.fc2", "head"}
    assert {s.reason for s in result.skipped} == {"excluded by pattern 'blocks.0.*'"}
    kept = [layer_name(n) for n in result.model.graph if n.op_type == "MatMul"]
    assert sorted(kept) == ["blocks.0.fc1", "blocks.0.fc2"]
    bert = quantize_dynamic(exported_model("bert"), op_types=["MatMul"])
    assert "GatherBlockQuantized" not in _ops(bert) and _ops(bert).count("Gather") == 2


def test_node_name_pattern_excludes_too() -> None:
    model = exported_model("mlp")
    name = next(n.name for n in model.graph if n.op_type == "MatMul")
    result = DynamicQuantizePass(exclude=[name])(model.clone())
    assert len(result.quantized) == 4 and result.skipped[0].node == name


def test_input_model_is_not_modified() -> None:
    model = exported_model("bert")
    before = ir.to_proto(model).SerializeToString()
    quantize_dynamic(model)
    assert ir.to_proto(model).SerializeToString() == before


def test_bad_options_and_nothing_to_quantize() -> None:
    model = exported_model("mlp")
    with pytest.raises(BadOptionError, match="cannot quantize op type"):
        quantize_dynamic(model, op_types=["Softmax"])
    with pytest.raises(UnsupportedModelError, match="nothing to quantize dynamically"):
        quantize_dynamic(model, exclude=["*"])
    with pytest.raises(UnsupportedModelError, match="nothing to quantize dynamically"):
        quantize_dynamic(exported_model("bert"), op_types=["LSTM"])


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_quantized_model_is_not_quantized_again(mode: str) -> None:
    import slimgraph as sg

    once = sg.quantize(exported_model("mlp"), mode="dynamic", speed_check=False)
    ops = sorted(n.op_type for n in once.graph if n.op_type in (
        "DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"))
    found = ", ".join(f"{ops.count(op)} {op}" for op in sorted(set(ops)))
    with pytest.raises(UnsupportedModelError) as error:
        sg.quantize(once, mode=mode, speed_check=False)
    assert str(error.value) == (f"the model is already quantized ({found}): quantize the float "
                                "model it came from")


def _gemm_model() -> ir.Model:
    rng = np.random.default_rng(0)
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1, alpha=0.5, beta=2.0)],
        "gemm",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 24])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 16])],
        [
            onnx.numpy_helper.from_array(rng.standard_normal((16, 24)).astype(np.float32), "w"),
            onnx.numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "c"),
        ],
    )
    return ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=9))


@pytest.mark.parametrize("kernel", ["integer", "fused"])
def test_gemm_with_transposed_weight_alpha_beta(kernel: str) -> None:
    model = _gemm_model()
    quantized = DynamicQuantizePass(matmul_kernel=kernel)(model.clone()).model
    assert "Gemm" not in _ops(quantized)
    feeds = random_feeds(model, seed=1)
    ref = run(create_session(model), feeds)["y"]
    got = run(create_session(quantized), feeds)["y"]
    np.testing.assert_allclose(got, ref, rtol=0, atol=0.03 * np.abs(ref).max())


class _Recurrent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(16, 32)
        self.gru = torch.nn.GRU(32, 8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        z, _ = self.gru(y)
        return self.fc(z)


def test_lstm_becomes_dynamic_quantize_lstm_and_gru_is_skipped_with_reason() -> None:
    torch.manual_seed(0)
    model = from_torch(_Recurrent().eval(), (torch.randn(6, 2, 16),))
    result = DynamicQuantizePass()(model.clone())
    assert "DynamicQuantizeLSTM" in _ops(result.model) and "LSTM" not in _ops(result.model)
    assert {q.kernel for q in result.quantized} == {"DynamicQuantizeLSTM", "MatMulInteger"}
    assert [(s.op_type, s.reason) for s in result.skipped] == [
        ("GRU", "onnxruntime has no dynamic int8 kernel for GRU")
    ]
    assert compare(model, result.model, random_feeds(model, seed=2)).worst_cosine >= 0.995


def test_conv_integer_only_when_asked() -> None:
    model = exported_model("resnet")
    with pytest.raises(UnsupportedModelError, match="nothing to quantize"):
        quantize_dynamic(model, op_types=["MatMul"])  # ResNet's head is a Gemm
    default = quantize_dynamic(model)
    assert "ConvInteger" not in _ops(default) and "Conv" in _ops(default)
    with_conv = quantize_dynamic(model, op_types=["Conv", "Gemm"])
    assert _ops(with_conv).count("ConvInteger") == _ops(model).count("Conv")
    feeds = random_feeds(model, seed=4)
    assert compare(model, with_conv, feeds).worst_cosine >= 0.99


def _tied_model() -> ir.Model:
    """Two MatMuls reading one initializer through two different Transpose nodes."""
    rng = np.random.default_rng(0)
    h = onnx.helper
    graph = h.make_graph(
        [
            h.make_node("Transpose", ["w"], ["wt1"], perm=[1, 0]),
            h.make_node("Transpose", ["w"], ["wt2"], perm=[1, 0]),
            h.make_node("MatMul", ["x", "wt1"], ["a"]),
            h.make_node("Relu", ["a"], ["r"]),
            h.make_node("MatMul", ["x", "wt2"], ["b"]),
            h.make_node("Add", ["r", "b"], ["y"]),
        ],
        "tied",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 32])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 32])],
        [onnx.numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "w")],
    )
    return ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=9))


def test_tied_weights_are_quantized_once() -> None:
    from slimgraph.passes.quantize.weight_only import quantize_weight_only

    model = _tied_model()
    quantized = quantize_dynamic(model)
    matmuls = [n for n in quantized.graph if n.op_type == "MatMulInteger"]
    assert len(matmuls) == 2 and matmuls[0].inputs[1] is matmuls[1].inputs[1]
    assert len(quantized.graph.initializers) == 2  # one int8 weight, one scale vector
    assert compare(model, quantized, random_feeds(model)).worst_cosine >= 0.995
    nbits = quantize_weight_only(model, block_size=16)
    blobs = {id(n.inputs[1]) for n in nbits.graph if n.op_type == "MatMulNBits"}
    assert len(blobs) == 1


def test_old_opset_is_upgraded_by_the_function_and_refused_by_the_pass() -> None:
    h = onnx.helper
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    graph = h.make_graph(
        [h.make_node("MatMul", ["x", "w"], ["y"])], "old",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 16])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])],
        [onnx.numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 9)], ir_version=4))
    with pytest.raises(UnsupportedModelError, match="needs ONNX opset >= 11"):
        DynamicQuantizePass()(model.clone())
    quantized = quantize_dynamic(model)
    assert quantized.opset_imports[""] == 13 and model.opset_imports[""] == 9
    assert compare(model, quantized, random_feeds(model)).worst_cosine >= 0.995


def test_exclude_ops() -> None:
    result = DynamicQuantizePass(exclude_ops=["Gather"])(exported_model("bert"))
    assert {q.op_type for q in result.quantized} == {"MatMul"}
    assert [s.reason for s in result.skipped if s.op_type == "Gather"] == [
        "op type Gather excluded", "op type Gather excluded"
    ]
