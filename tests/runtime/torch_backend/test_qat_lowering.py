"""QAT on the QDQ graph: fake quantization equals onnxruntime's QuantizeLinear/DequantizeLinear
exactly (ties, saturation, per-tensor/per-axis/blocked, int8/uint8/int4/uint4), the
straight-through and LSQ gradients, and re-quantization on write-back."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimgraph as sg
from slimgraph.runtime import quant_math
from slimgraph.runtime.quant_math import type_grid
from tests.kit.asserts import outputs_of
from tests.kit.data import DATA, digits_arrays
from tests.runtime.torch_backend.backend_helpers import torch_outputs

torch = pytest.importorskip("torch")

from slimgraph.runtime.torch_backend import _ops, lower, write_back  # noqa: E402

# (ONNX type, zero point, integer range): int4/uint4 need opset 21.
DTYPES = [
    (TensorProto.INT8, 0, (-128, 127)),
    (TensorProto.INT8, -3, (-128, 127)),
    (TensorProto.UINT8, 128, (0, 255)),
    (TensorProto.UINT8, 0, (0, 255)),
    (TensorProto.INT4, 0, (-8, 7)),
    (TensorProto.UINT4, 8, (0, 15)),
]


def _ties(scale: float, qmin: int, qmax: int, zp: int) -> np.ndarray:
    """Every half-way point k + 0.5 (k from below the range to above it) times the scale, its
    negatives, exact values, and far saturating values: all exactly representable."""
    k = np.arange(qmin - zp - 4, qmax - zp + 4, dtype=np.float32)
    values = np.concatenate([(k + 0.5) * scale, k * scale, -(k + 0.5) * scale,
                             np.array([1e6, -1e6, 0.0], np.float32)])
    return values.astype(np.float32)


def _qdq_model(
    x_shape: list[int], scale: np.ndarray, zp: np.ndarray, dtype: int, axis: int = 1,
    block: int = 0, opset: int = 21,
) -> ir.Model:
    """x -> QuantizeLinear -> q (an output) -> DequantizeLinear -> y, scale/zp initializers."""
    attrs = {"axis": axis}
    if block:
        attrs["block_size"] = block
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant", **attrs),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dequant", **attrs),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)],
        [
            numpy_helper.from_array(scale.astype(np.float32), "s"),
            helper.make_tensor("z", dtype, zp.shape, zp.reshape(-1).tolist()),
        ],
    )
    return ir.from_proto(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    )


@pytest.mark.parametrize(("dtype", "zp", "bounds"), DTYPES)
def test_per_tensor_ties_and_saturation_equal_onnxruntime(dtype, zp, bounds):
    scale = 0.25
    x = _ties(scale, *bounds, zp)
    model = _qdq_model([x.size], np.array(scale), np.array(zp), dtype)
    want = outputs_of(model, {"x": x}, "disable")["y"]
    got = torch_outputs(lower(model), {"x": x})["y"]
    np.testing.assert_array_equal(got, want)
    # Half to even, as ONNX defines it: 0.5 -> 0, 1.5 -> 2, -0.5 -> 0, -2.5 -> -2 (then + zp).
    codes = np.clip(np.round(x / scale) + zp, *bounds)
    np.testing.assert_array_equal(want, (codes - zp) * scale)
    assert set(np.round(x / scale)[np.abs(x / scale) < 3].tolist()) >= {0.0, 2.0, -2.0}


@pytest.mark.parametrize(("dtype", "zp", "bounds"), DTYPES[:3])
def test_quantize_codes_leaving_the_graph_equal_onnxruntime(dtype, zp, bounds):
    scale = 0.5
    x = _ties(scale, *bounds, zp)
    model = _qdq_model([x.size], np.array(scale), np.array(zp), dtype, opset=13)
    model.graph.outputs.append(next(n for n in model.graph if n.name == "quant").outputs[0])
    want = outputs_of(model, {"x": x}, "disable")["q"]
    got = torch_outputs(lower(model), {"x": x})["q"]
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("dtype", "zp", "bounds"), [DTYPES[0], DTYPES[2], DTYPES[4]])
def test_per_axis_and_blocked_equal_onnxruntime(dtype, zp, bounds):
    rng = np.random.default_rng(0)
    scales = np.array([0.25, 0.5, 0.125], np.float32)
    x = np.stack([_ties(s, *bounds, zp)[:40] * rng.choice([1, -1], 40) for s in scales], 0)
    # [2, 3, 20]: channel c holds the ties of scales[c]
    x = np.ascontiguousarray(x.T.reshape(2, 20, 3).transpose(0, 2, 1)).astype(np.float32)
    per_axis = _qdq_model(list(x.shape), scales, np.full(3, zp), dtype, axis=1)
    want = outputs_of(per_axis, {"x": x}, "disable")["y"]
    np.testing.assert_array_equal(torch_outputs(lower(per_axis), {"x": x})["y"], want)
    block_scales = np.abs(rng.standard_normal((2, 3, 5))).astype(np.float32) + 0.1
    blocked = _qdq_model(list(x.shape), block_scales, np.full((2, 3, 5), zp), dtype, axis=2,
                         block=4)
    want = outputs_of(blocked, {"x": x}, "disable")["y"]
    np.testing.assert_array_equal(torch_outputs(lower(blocked), {"x": x})["y"], want)


@pytest.mark.parametrize("dtype", [ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4,
                                   ir.DataType.UINT4, ir.DataType.INT16, ir.DataType.UINT16])
def test_fake_quantization_codes_are_quant_maths(dtype):
    """The torch backend's QuantizeLinear gives `quant_math.quantize_values`'s codes on the grid
    `type_grid` names (the whole type): ties round to even, both ends saturate. The scale is a
    power of two, so x / scale is exact in float32 and float64 alike."""
    spec = type_grid(dtype)
    qmin, qmax = spec.qrange
    assert (qmin, qmax) == quant_math.integer_range(dtype)
    scale, zp = np.float32(0.25), (qmin + qmax + 1) // 2
    steps = np.arange(2 * qmin - 8, 2 * qmax + 9, dtype=np.float64) / 2 - zp  # every half step
    x = (steps * scale).astype(np.float32)
    want = quant_math.quantize_values(x, scale, np.int64(zp), spec)
    got = _ops.quantize_values(torch.from_numpy(x), torch.tensor(scale), torch.tensor(zp), spec)
    np.testing.assert_array_equal(got.numpy().astype(np.int64), want.astype(np.int64))
    assert got.min() == qmin and got.max() == qmax


def test_straight_through_gradient_is_one_inside_and_zero_outside():
    r = type_grid(ir.DataType.INT8)
    scale, zp = torch.tensor(0.1), torch.tensor(3)
    x = torch.tensor([-20.0, -13.0, -12.0, -5.04, 0.0, 0.05, 1.26, 12.0, 12.5, 30.0],
                     requires_grad=True)
    y = _ops.fake_quantize(x, scale, zp, r)
    y.backward(torch.ones_like(y))
    # code = round(x / 0.1) + 3 inside [-128, 127] <=> x in [-13.1, 12.4] (up to rounding)
    inside = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(x.grad, inside)
    torch.testing.assert_close(y.detach()[[0, -1]], torch.tensor([-13.1, 12.4]))


def test_gradient_flows_through_a_lowered_qdq_graph():
    model = _qdq_model([6], np.array(0.5), np.array(0), TensorProto.INT8, opset=13)
    lowered = lower(model)
    lowered.train()
    x = torch.tensor([-100.0, -0.75, 0.25, 1.0, 3.3, 100.0], requires_grad=True)
    lowered(x)[0].sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_learned_scale_gets_the_lsq_gradient_and_is_written_back():
    scale, zp = 0.5, 0
    model = _qdq_model([6], np.array(scale), np.array(zp), TensorProto.INT8, opset=13)
    lowered = lower(model, learn_scales=True)
    assert list(lowered.weight_names().values()) == ["s"]
    lowered.train()
    x = torch.tensor([-100.0, -0.7, 0.2, 1.1, 3.3, 100.0])
    lowered(x)[0].sum().backward()
    v = x / scale
    inside = (v.round() >= -128) & (v.round() <= 127)
    per_element = torch.where(inside, v.round() - v, torch.where(v < 0, -128.0, 127.0))
    factor = 1.0 / np.sqrt(x.numel() * 127)
    (param,) = lowered.parameters()
    torch.testing.assert_close(param.grad, per_element.sum() * factor, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        param.copy_(torch.tensor(0.375))
    out = write_back(model, lowered)
    assert out.graph.initializers["s"].const_value.numpy().tolist() == 0.375
    assert out.graph.initializers["s"].const_value.shape == ()
    assert not lower(model).weight_names()  # fixed scales are buffers by default


@pytest.fixture(scope="module")
def digits_qdq():
    model = sg.load(DATA / "digits_cnn.onnx")
    return sg.quantize(model, calibration=digits_arrays("digits_calib.npz"), progress=False)


def test_quantize_nodes_reproduce_onnxruntime_codes_on_real_activations(digits_qdq):
    """Given onnxruntime's own float input, each QuantizeLinear's codes are identical; a full
    run can still differ where float accumulation order moves a value across a rounding
    boundary (rare: counted below)."""
    quants = [n for n in digits_qdq.graph if n.op_type == "QuantizeLinear"]
    probe = ir.from_proto(ir.to_proto(digits_qdq))
    by_name = {n.name: n for n in probe.graph}
    for q in quants:
        for v in (by_name[q.name].inputs[0], by_name[q.name].outputs[0]):
            if not v.is_graph_output() and not v.is_graph_input():
                probe.graph.outputs.append(v)
    feeds = {"image": digits_arrays(rows=450)["image"]}
    ref = outputs_of(probe, feeds, "disable")
    lowered = lower(digits_qdq, extra_outputs=[q.outputs[0].name for q in quants])
    full = torch_outputs(lowered, feeds)
    differing = total = 0
    for q in quants:
        x = torch.from_numpy(ref[q.inputs[0].name] if q.inputs[0].name in ref else feeds["image"])
        zp_value = q.inputs[2]
        r = type_grid(zp_value.dtype)
        codes = _ops.quantize_values(
            x, torch.from_numpy(q.inputs[1].const_value.numpy()),
            torch.from_numpy(zp_value.const_value.numpy().astype(np.int64)), r,
        )
        want = ref[q.outputs[0].name]
        np.testing.assert_array_equal(codes.numpy().astype(want.dtype), want)
        differing += int((full[q.outputs[0].name] != want).sum())
        total += want.size
    assert differing / total < 1e-3


def test_qdq_digits_outputs_agree_with_onnxruntime(digits_qdq):
    feeds = {"image": digits_arrays(rows=450)["image"]}
    want = outputs_of(digits_qdq, feeds, "disable")["linear"]
    got = torch_outputs(lower(digits_qdq), feeds)["linear"]
    assert (got.argmax(1) == want.argmax(1)).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=0.01 * np.abs(want).max())


def test_qdq_round_trip_is_exact(digits_qdq):
    out = write_back(digits_qdq, lower(digits_qdq))
    assert ir.to_proto(out).SerializeToString() == ir.to_proto(digits_qdq).SerializeToString()


def test_qat_steps_requantize_weights_and_keep_the_graph(digits_qdq):
    lowered = lower(digits_qdq)
    int_weights = {
        n: v.const_value.dtype for n, v in digits_qdq.graph.initializers.items()
        if v.const_value.dtype in (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT32)
    }
    assert set(lowered.weight_names().values()) >= {
        n for n in int_weights if any(u.node.op_type == "DequantizeLinear"
                                      and u.idx == 0
                                      for u in digits_qdq.graph.initializers[n].uses())
    }
    batch = digits_arrays("digits_train.npz", rows=128)
    x, y = torch.from_numpy(batch["image"]), torch.from_numpy(batch["labels"]).long()
    optimizer = torch.optim.SGD(lowered.parameters(), lr=0.02)
    lowered.train()
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(lowered(x)[0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    lowered.eval()
    out = write_back(digits_qdq, lowered)
    ops = Counter(n.op_type for n in out.graph)
    assert ops == Counter(n.op_type for n in digits_qdq.graph)
    for name, dtype in int_weights.items():
        assert out.graph.initializers[name].const_value.dtype == dtype
    changed = [n for n in int_weights if out.graph.initializers[n].const_value.tobytes()
               != digits_qdq.graph.initializers[n].const_value.tobytes()]
    assert changed
    feeds = {"image": digits_arrays(rows=200)["image"]}
    want = torch_outputs(lowered, feeds)["linear"]
    got = outputs_of(out, feeds, "disable")["linear"]
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.99
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=0.01 * np.abs(want).max())


def test_quantized_embedding_table_trains_through_gather_then_dequantize():
    from tests import models
    from tests.kit.exports import exported_model

    ids, mask = models.example_input("bert", 2)
    feeds = {"input_ids": ids.numpy()[:1], "attention_mask": mask.numpy()[:1]}
    model = sg.quantize(exported_model("bert"), calibration=[feeds], progress=False)
    gather = next(
        n for n in model.graph
        if n.op_type == "Gather" and n.inputs[0].const_value is not None
        and n.inputs[0].const_value.dtype == ir.DataType.INT8
    )
    table = gather.inputs[0].name
    lowered = lower(model)
    assert table in lowered.weight_names().values()
    lowered.train()
    optimizer = torch.optim.SGD(lowered.parameters(), lr=0.5)
    out = lowered(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
    out[0].pow(2).sum().backward()
    optimizer.step()
    lowered.eval()
    written = write_back(model, lowered)
    before = model.graph.initializers[table].const_value.numpy()
    after = written.graph.initializers[table].const_value.numpy()
    assert after.dtype == before.dtype and (after != before).any()
    rows = np.unique(feeds["input_ids"])
    untouched = np.setdiff1d(np.arange(before.shape[0]), rows)
    np.testing.assert_array_equal(after[untouched], before[untouched])  # only gathered rows move
    want = torch_outputs(lowered, feeds)
    got = outputs_of(written, feeds, "disable")
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], rtol=1e-4,
                                   atol=0.01 * np.abs(value).max())
