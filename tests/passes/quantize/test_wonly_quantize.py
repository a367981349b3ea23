"""Weight-only int4/int8 block quantization: packing, per-block error bounds, both formats."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from slimgraph.errors import BadOptionError, UnsupportedModelError
from slimgraph.ir import layer_name
from slimgraph.passes._kit import traced_constant
from slimgraph.passes.quantize.weight_only import (
    WeightOnlyQuantizePass,
    quantize_weight_only,
)
from slimgraph.runtime import compare, create_session, random_feeds, run
from slimgraph.runtime.quant_math import pack_4bit, quantize_tensor, unpack_4bit, weight_spec
from tests.kit.exports import exported_model

_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), signed=st.booleans())
def test_pack_unpack_round_trip_and_onnx_layout(data: st.DataObject, signed: bool) -> None:
    low, high = (-8, 7) if signed else (0, 15)
    values = data.draw(
        hnp.arrays(np.int8 if signed else np.uint8, _shapes, elements=st.integers(low, high))
    )
    packed = pack_4bit(values)
    assert packed.dtype == np.uint8 and packed.shape[-1] == (values.shape[-1] + 1) // 2
    np.testing.assert_array_equal(unpack_4bit(packed, values.shape[-1], signed=signed), values)
    # The ONNX spec: element 2i in the low nibble of byte i, element 2i + 1 in the high nibble.
    flat = values.reshape(-1)
    proto = onnx.TensorProto(
        data_type=onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4,
        dims=[flat.size], raw_data=pack_4bit(flat).tobytes(),
    )  # fmt: skip
    decoded = onnx.numpy_helper.to_array(proto)
    np.testing.assert_array_equal(decoded.astype(np.int16), flat.astype(np.int16))


@settings(max_examples=40, deadline=None)
@given(
    weight=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 70), st.integers(1, 6)),
        elements=st.floats(-100, 100, width=32),
    ),
    bits=st.sampled_from([4, 8]),
    block_size=st.sampled_from([16, 32]),
    symmetric=st.booleans(),
)
def test_blockwise_dequantized_within_half_a_step(
    weight: np.ndarray, bits: int, block_size: int, symmetric: bool
) -> None:
    q = quantize_tensor(weight, weight_spec(bits, symmetric, block_size=block_size))
    k = weight.shape[0]
    blocks = -(-k // block_size)
    assert q.scale.shape == (blocks, weight.shape[1])
    step = np.repeat(q.scale, block_size, axis=0)[:k]
    error = np.abs(q.dequantize()[:k] - weight)
    assert np.all(error <= step / 2 * (1 + 1e-4) + 1e-30)
    if symmetric:
        assert q.zero_point is None and np.abs(q.codes).max() <= 2 ** (bits - 1) - 1
    else:
        assert q.codes.max() <= 2**bits - 1 and q.zero_point is not None


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {
        layer_name(n): traced_constant(n.inputs[1])
        for n in model.graph
        if n.op_type == "MatMul" and traced_constant(n.inputs[1]) is not None
    }


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmulnbits_blobs_decode_to_the_weight_within_half_a_step(
    bits: int, symmetric: bool
) -> None:
    model = exported_model("mlp")
    originals = _weights(model)
    quantized = quantize_weight_only(model, bits=bits, block_size=16, symmetric=symmetric,
                                     head_bits=None)
    nodes = [n for n in quantized.graph if n.op_type == "MatMulNBits"]
    assert len(nodes) == 5
    for node in nodes:
        weight = originals[layer_name(node)]
        k, n = weight.shape
        attrs = node.attributes
        assert (attrs.get_int("K"), attrs.get_int("N"), attrs.get_int("bits")) == (k, n, bits)
        blob = node.inputs[1].const_value.numpy()
        blocks = -(-k // 16)
        assert blob.shape == (n, blocks, 16 * bits // 8)
        codes = unpack_4bit(blob, 16, signed=False) if bits == 4 else blob
        codes = codes.reshape(n, blocks * 16)[:, :k].astype(np.float32)
        scale = node.inputs[2].const_value.numpy().reshape(n, blocks)
        if symmetric:
            assert len(node.inputs) < 4 or node.inputs[3] is None
            zero = np.full((n, blocks), 2 ** (bits - 1), np.float32)
        else:
            packed = node.inputs[3].const_value.numpy().reshape(n, -1)
            zero = unpack_4bit(packed, blocks, signed=False) if bits == 4 else packed
        step = np.repeat(scale, 16, axis=1)[:, :k]
        dequantized = (codes - np.repeat(zero, 16, axis=1)[:, :k]) * step
        assert np.all(np.abs(dequantized - weight.T) <= step / 2 * (1 + 1e-5))


@pytest.mark.parametrize("bits", [4, 8])
def test_both_formats_run_and_agree(bits: int) -> None:
    model = exported_model("bert")
    feeds = {
        "input_ids": np.random.default_rng(0).integers(0, 1000, (1, 16)).astype(np.int64),
        "attention_mask": np.ones((1, 16), np.int64),
    }
    # accuracy level 0: float activations, as the "dq" form computes without graph fusions
    nbits = quantize_weight_only(model, bits=bits, fmt="matmulnbits", accuracy_level=0)
    dq = quantize_weight_only(model, bits=bits, fmt="dq")
    assert [n.op_type for n in nbits.graph].count("MatMulNBits") == 12
    assert [n.op_type for n in nbits.graph].count("GatherBlockQuantized") == 2  # embeddings
    assert [n.op_type for n in dq.graph].count("DequantizeLinear") == 14
    assert dq.opset_imports[""] == 21 and model.opset_imports[""] == 20
    dq_node = next(n for n in dq.graph if n.op_type == "DequantizeLinear" and any(
        use.node.op_type == "MatMul" for use in n.outputs[0].uses()))
    expected = ir.DataType.UINT4 if bits == 4 else ir.DataType.UINT8  # zero points by default
    assert dq_node.inputs[0].const_value.dtype == expected
    assert dq_node.attributes.get_int("block_size") == 32
    minimum = 0.99 if bits == 4 else 0.9999
    for candidate in (nbits, dq):
        assert compare(model, candidate, feeds).worst_cosine >= minimum
    levels = {n.attributes.get_int("accuracy_level") for n in nbits.graph
              if n.op_type == "MatMulNBits"}
    if bits == 8:  # 8-bit MatMulNBits run at level 4 whatever was asked: the only fast kernel
        assert levels == {4}
        return
    assert levels == {None}  # level 0: the attribute's default, not written
    # Same weights: without graph fusions the two formats compute the same float MatMuls. (At
    # level "all" onnxruntime turns DQ -> MatMul into MatMulNBits with int8 activations.)
    a = run(create_session(nbits, optimization="basic"), feeds)
    b = run(create_session(dq, optimization="basic"), feeds)
    for name, value in a.items():
        np.testing.assert_allclose(b[name], value, rtol=1e-4, atol=1e-5 * np.abs(value).max())


def test_asymmetric_dq_has_uint4_zero_points() -> None:
    model = exported_model("mlp")
    quantized = quantize_weight_only(model, fmt="dq", symmetric=False)
    node = next(n for n in quantized.graph if n.op_type == "DequantizeLinear")
    assert node.inputs[0].const_value.dtype == ir.DataType.UINT4
    assert node.inputs[2].const_value.dtype == ir.DataType.UINT4
    assert compare(model, quantized, random_feeds(model, seed=1)).worst_cosine >= 0.995


def test_exclusions_and_untouched_input() -> None:
    model = exported_model("mlp")
    before = ir.to_proto(model).SerializeToString()
    result = WeightOnlyQuantizePass(exclude=["head"])(model.clone())
    assert {q.layer for q in result.quantized} == {
        "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"
    }
    assert [s.reason for s in result.skipped] == ["excluded by pattern 'head'"]
    quantize_weight_only(model, fmt="dq")
    assert ir.to_proto(model).SerializeToString() == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": 3}, r"supports bits 4 or 8 \(got 3\)"),
        ({"block_size": 24}, r"block_size must be a power of two >= 16 \(got 24\)"),
        ({"block_size": 8}, r"block_size must be a power of two >= 16 \(got 8\)"),
        ({"fmt": "gptq"}, r"unknown weight-only format 'gptq'"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(BadOptionError, match=message):
        quantize_weight_only(exported_model("mlp"), **options)  # type: ignore[arg-type]
    with pytest.raises(BadOptionError, match=message):
        WeightOnlyQuantizePass(**options)(exported_model("mlp"))  # type: ignore[arg-type]


def test_nothing_to_quantize_and_old_opset_for_dq() -> None:
    # the exported ResNet's classifier is a Gemm (a Linear with bias): quantized as a MatMul now
    ops = [n.op_type for n in quantize_weight_only(exported_model("resnet")).graph]
    assert "Gemm" not in ops and "MatMulNBits" in ops
    conv_only = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Conv", ["x", "w"], ["y"])], "conv",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            [onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    with pytest.raises(UnsupportedModelError, match="nothing to quantize weight-only"):
        quantize_weight_only(ir.from_proto(conv_only))  # Conv only
    with pytest.raises(UnsupportedModelError, match="needs opset >= 21"):
        WeightOnlyQuantizePass(fmt="dq")(exported_model("mlp"))


@pytest.mark.parametrize("fmt", ["matmulnbits", "dq"])
@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True)])
def test_embedding_rows_equal_the_dequantized_table(fmt: str, bits: int, symmetric: bool) -> None:
    model = exported_model("bert")
    table = model.graph.initializers["embed.weight"].const_value.numpy()
    quantized = quantize_weight_only(model, bits=bits, fmt=fmt, symmetric=symmetric,
                                     embedding_bits=bits)
    assert "embed.weight" not in quantized.graph.initializers
    embed = next(
        n for n in quantized.graph
        if layer_name(n) == "embed" and n.op_type in ("Gather", "GatherBlockQuantized")
    )  # fmt: skip
    quantized.graph.outputs.append(embed.outputs[0])
    ids = np.array([[3, 999, 0, 3, 512, 7, 8, 9, 1, 2, 4, 5, 6, 10, 11, 12]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, 16), np.int64)}
    rows = run(create_session(quantized), feeds)[embed.outputs[0].name][0]
    q = quantize_tensor(table.T, weight_spec(bits, symmetric, block_size=32))
    expected = q.dequantize().T[ids[0]]
    np.testing.assert_allclose(rows, expected, rtol=1e-6, atol=1e-7)
    step = np.repeat(q.scale.T, 32, axis=1)[ids[0]]
    assert np.all(np.abs(rows - table[ids[0]]) <= step / 2 * (1 + 1e-5))


def test_embeddings_can_be_left_float() -> None:
    model = exported_model("bert")
    result = WeightOnlyQuantizePass(embeddings=False)(model.clone())
    assert {q.kernel for q in result.quantized} == {"MatMulNBits"}
    assert "embed.weight" in result.model.graph.initializers


def test_exclude_ops() -> None:
    only_tables = quantize_weight_only(exported_model("bert"), exclude_ops=["MatMul"])
    ops = [n.op_type for n in only_tables.graph]
    assert ops.count("GatherBlockQuantized") == 2 and "MatMulNBits" not in ops
    only_matmuls = quantize_weight_only(exported_model("bert"), exclude_ops=["Gather"])
    ops = [n.op_type for n in only_matmuls.graph]
    assert "GatherBlockQuantized" not in ops and ops.count("MatMulNBits") == 12


def _matmuls(*ks: int, n: int = 24) -> ir.Model:
    """x [3, K0] -> MatMul(K0 x K1) -> ... : one MatMul per consecutive pair of sizes."""
    h = onnx.helper
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    sizes = [*ks, n]
    for index, (k, out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        inits.append(onnx.numpy_helper.from_array(
            rng.standard_normal((k, out)).astype(np.float32), f"w{index}"))
        nodes.append(h.make_node("MatMul", ["x" if index == 0 else f"y{index - 1}", f"w{index}"],
                                 [f"y{index}"]))
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, ks[0]])],
        [h.make_tensor_value_info(f"y{len(ks) - 1}", onnx.TensorProto.FLOAT, [3, n])], inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


@pytest.mark.parametrize("fmt", ["matmulnbits", "dq"])
def test_k_not_a_multiple_of_the_block_size_is_padded(fmt: str) -> None:
    model = _matmuls(64, 40)  # K = 64 and K = 40 with blocks of 32: the second one padded
    quantized = quantize_weight_only(model, fmt=fmt, bits=8, block_size=32, head_bits=None)
    if fmt == "matmulnbits":
        padded = next(n for n in quantized.graph if n.op_type == "MatMulNBits"
                      and n.attributes.get_int("K") == 40)
        assert padded.inputs[1].const_value.shape == (24, 2, 32)  # [N, blocks, block bytes]
    else:
        assert [n.op_type for n in quantized.graph].count("DequantizeLinear") == 2
    feeds = random_feeds(model, seed=5)
    assert compare(model, quantized, feeds).worst_cosine >= 0.9999


def test_a_block_size_that_divides_no_k_is_an_error() -> None:
    with pytest.raises(BadOptionError, match=r"^block_size 32 does not divide K of any MatMul "
                       r"\(K = 40\): choose a block size that divides K$"):
        quantize_weight_only(_matmuls(40), block_size=32)


def test_the_head_is_what_reaches_an_output_through_bias_adds_only() -> None:
    """8 bits for the head (MatMul -> Add(bias) -> output); a MatMul whose output is summed with
    another activation on the way (a residual) is a layer like the others: 4 bits."""
    h = onnx.helper
    rng = np.random.default_rng(0)
    graph = h.make_graph(
        [
            h.make_node("MatMul", ["x", "w1"], ["a"], name="layer"),
            h.make_node("Add", ["a", "x"], ["r"]),  # residual
            h.make_node("MatMul", ["r", "w2"], ["b"], name="head"),
            h.make_node("Add", ["b", "bias"], ["y"]),  # bias
        ],
        "heads",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 32])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 32]),
         h.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [2, 32])],
        [onnx.numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), name)
         for name in ("w1", "w2")] + [onnx.numpy_helper.from_array(np.ones(32, np.float32),
                                                                  "bias")],
    )  # fmt: skip
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)]))
    quantized = quantize_weight_only(model, block_size=16)
    bits = {n.name: n.attributes.get_int("bits") for n in quantized.graph
            if n.op_type == "MatMulNBits"}
    assert bits == {"layer_nbits": 4, "head_nbits": 8}
