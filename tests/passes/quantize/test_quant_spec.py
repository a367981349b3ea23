"""The quantization vocabulary and plans: `QuantSpec`, the one integer-math module, frozen plans,
the explicit dispatch tables, and the public function running the pass once."""

from __future__ import annotations

import dataclasses

import hypothesis.extra.numpy as hnp
import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from slimgraph.api import quantize as public_api
from slimgraph.passes.quantize import modes as api
from slimgraph.passes.quantize.dynamic import (
    ACTIVATION_SPEC,
    MATERIALIZERS,
    DynamicPlan,
    _Builder,
    plan_dynamic,
)
from slimgraph.passes.quantize.options import QuantizeOptions, StaticOptions
from slimgraph.passes.quantize.policy import annotate
from slimgraph.passes.quantize.weight_only import FORMATS, WeightOnlyOptions, plan_weight_only
from slimgraph.passes.quantize.weight_only import MATERIALIZERS as WEIGHT_ONLY_MATERIALIZERS
from slimgraph.runtime.quant_math import (
    QuantSpec,
    quant_params,
    quantize_tensor,
    quantize_values,
    sqnr_db,
    valid_scale,
    weight_spec,
)
from tests.kit.data import linear_feeds
from tests.kit.graphs import linear_model, make_model

INT8, UINT8, INT4, UINT4 = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4,
                            ir.DataType.UINT4)


# --- QuantSpec and the integer math ---------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "grid"),
    [
        (QuantSpec(UINT8, False), (0, 255)),
        (QuantSpec(INT8, True), (-127, 127)),
        (QuantSpec(INT8, False), (-128, 127)),
        (QuantSpec(INT4, True), (-7, 7)),
        (QuantSpec(UINT4, False), (0, 15)),
        (QuantSpec(ir.DataType.INT32, True), (-(2**31) + 1, 2**31 - 1)),
    ],
)
def test_spec_grids(spec: QuantSpec, grid: tuple[int, int]) -> None:
    assert spec.qrange == grid


def test_spec_is_frozen_and_hashable() -> None:
    spec = weight_spec(4, block_size=32, axis=0)
    assert (spec.dtype, spec.symmetric, spec.block_size, spec.bits) == (INT4, True, 32, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.axis = 1  # type: ignore[misc]
    assert {spec: 1}[weight_spec(4, block_size=32, axis=0)] == 1
    assert weight_spec(8, symmetric=False).dtype == UINT8
    with pytest.raises(ValueError, match="no 3-bit integer grid"):
        weight_spec(3)


@pytest.mark.parametrize(
    ("qmin", "qmax", "symmetric"), [(0, 255, False), (-128, 127, False), (-127, 127, True),
                                    (0, 255, True)],
)
def test_zero_range_gets_scale_1_and_zero_point_0(qmin: int, qmax: int, symmetric: bool) -> None:
    # onnxruntime's quant_utils.compute_scale_zp: scale < float32 tiny -> (1.0, 0)
    scale, zero_point = quant_params(0.0, 0.0, qmin=qmin, qmax=qmax, symmetric=symmetric)
    assert scale.dtype == np.float32 and float(scale) == 1.0
    assert zero_point.dtype == np.int64 and int(zero_point) == 0
    # a range too narrow for a normal float32 scale is a zero range too
    scale, _ = quant_params(0.0, 1e-40, qmin=qmin, qmax=qmax, symmetric=symmetric)
    assert float(scale) == 1.0


def test_zero_channels_of_a_weight_get_scale_1_and_code_0() -> None:
    weight = np.zeros((3, 4), np.float32)
    weight[1] = [0.5, -1.0, 0.25, 0.0]
    q = quantize_tensor(weight, weight_spec(8, axis=0))
    np.testing.assert_array_equal(q.scale.ravel(), np.float32([1.0, 1.0 / 127, 1.0]))
    np.testing.assert_array_equal(q.codes[[0, 2]], 0)
    assert q.codes[1].tolist() == [64, -127, 32, 0]  # 63.5 rounds to even
    assert q.zero_point is None
    np.testing.assert_array_equal(valid_scale(np.float64(1e-30) * 1e-30), np.float32(1.0))


def test_codes_round_half_to_even_and_saturate() -> None:
    spec = QuantSpec(UINT8, False)
    codes = quantize_values(np.array([0.5, 1.5, 2.5, -3.0, 300.0]), np.float32(1.0),
                            np.int64(0), spec)
    assert codes.dtype == np.uint8 and codes.tolist() == [0, 2, 2, 0, 255]


@settings(max_examples=40, deadline=None)
@given(
    weight=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 5),
                                            st.integers(1, 8)),
                      elements=st.floats(-10, 10, width=32)),
)
def test_per_tensor_per_axis_within_half_a_step(weight: np.ndarray) -> None:
    for axis in (None, 0, 2):
        q = quantize_tensor(weight, weight_spec(8, axis=axis))
        assert q.scale.ndim == weight.ndim
        error = np.abs(q.dequantize() - weight)
        assert np.all(error <= q.scale / 2 * (1 + 1e-5) + 1e-12)


def test_sqnr_db() -> None:
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == float("inf")
    assert sqnr_db(0.0, 1.0) == float("-inf")


# --- frozen plans ---------------------------------------------------------------------------


def _every_dynamic_op() -> ir.Model:
    """MatMul, Gemm, Gather (embedding), LSTM and Conv with constant weights, one GRU."""
    rng = np.random.default_rng(0)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    inits = {
        "w_mm": r(8, 8), "w_gemm": r(8, 8), "table": r(10, 8), "w_lstm": r(1, 16, 8),
        "r_lstm": r(1, 16, 4), "w_conv": r(2, 3, 1, 1), "w_gru": r(1, 12, 8),
        "r_gru": r(1, 12, 4),
    }
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
        helper.make_node("MatMul", ["seq_in", "w_mm"], ["h0"], name="mm"),
        helper.make_node("Gemm", ["x", "w_gemm"], ["h1"], name="gemm"),
        helper.make_node("LSTM", ["seq_in", "w_lstm", "r_lstm"], ["seq", "h_last"], name="lstm",
                         hidden_size=4),
        helper.make_node("GRU", ["seq_in", "w_gru", "r_gru"], ["gseq"], name="gru", hidden_size=4),
        helper.make_node("Conv", ["img", "w_conv"], ["c"], name="conv"),
    ]
    return make_model(
        nodes,
        [("ids", TensorProto.INT64, [5, 1]), ("seq_in", TensorProto.FLOAT, [5, 1, 8]),
         ("x", TensorProto.FLOAT, [2, 8]),
         ("img", TensorProto.FLOAT, [1, 3, 4, 4])],
        [("emb", TensorProto.FLOAT, [5, 1, 8]), ("h0", TensorProto.FLOAT, [5, 1, 8]),
         ("seq", TensorProto.FLOAT, [5, 1, 1, 4]), ("h1", TensorProto.FLOAT, [2, 8]),
         ("gseq", TensorProto.FLOAT, [5, 1, 1, 4]), ("c", TensorProto.FLOAT, [1, 2, 4, 4])],
        inits,
    )


def test_dynamic_plan_is_frozen_and_leaves_the_graph_alone() -> None:
    model = _every_dynamic_op()
    before = ir.to_proto(model).SerializeToString()
    plan = plan_dynamic(model.graph, op_types=("MatMul", "Gemm", "Gather", "LSTM", "GRU",
                                               "Conv"))
    assert ir.to_proto(model).SerializeToString() == before
    assert isinstance(plan, DynamicPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.candidates = 0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.rewrites[0].kind = "conv"  # type: ignore[misc]
    kinds = {r.node.name: r.kind for r in plan.rewrites}
    assert kinds == {"gather": "gather", "mm": "matmul", "gemm": "matmul", "lstm": "lstm",
                     "conv": "conv"}
    assert [(s.node, s.reason) for s in plan.skipped] == [
        ("gru", "onnxruntime has no dynamic int8 kernel for GRU")
    ]
    specs = {r.node.name: r for r in plan.rewrites}
    assert specs["mm"].weight_spec == QuantSpec(INT8, True, axis=1)
    assert specs["conv"].weight_spec == QuantSpec(INT8, True, axis=0)
    assert specs["gather"].activation_spec is None
    assert specs["mm"].activation_spec == ACTIVATION_SPEC and ACTIVATION_SPEC.dynamic
    per_tensor = plan_dynamic(model.graph, per_channel=False, op_types=("MatMul", "LSTM"))
    axes = {r.node.name: r.weight_spec.axis for r in per_tensor.rewrites}
    assert axes == {"mm": None, "lstm": 0}


def test_dispatch_tables_cover_every_rewrite_the_old_getattr_reached() -> None:
    # the old dispatch built `rewrite_{kind}` names for these five kinds
    old_kinds = ("matmul", "attention", "gather", "lstm", "conv")
    assert set(MATERIALIZERS) == set(old_kinds)
    for kind in old_kinds:
        assert MATERIALIZERS[kind] is getattr(_Builder, f"rewrite_{kind}")
    assert set(WEIGHT_ONLY_MATERIALIZERS) == {(f, k) for f in FORMATS for k in ("matmul",
                                                                               "gather")}


def test_weight_only_plan_is_frozen_with_block_specs() -> None:
    model = _every_dynamic_op()
    # head_bits=None: "mm" feeds the graph output, a head, which stays 8-bit by default
    plan = plan_weight_only(model.graph, WeightOnlyOptions(block_size=16, bits=4, head_bits=None))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.rewrites = ()  # type: ignore[misc]
    assert [(r.node.name, r.kind) for r in plan.rewrites] == [("mm", "matmul")]  # not the Gemm:
    # the pass rewrites Gemms as MatMuls before it plans
    assert plan.rewrites[0].spec == QuantSpec(UINT4, False, axis=0, block_size=16)  # zero points
    assert [(s.node, s.reason) for s in plan.skipped] == [
        ("gather", "row length 8 is not a multiple of block_size 16")
    ]


def test_static_plan_is_frozen() -> None:
    plan = annotate(api.prepare(linear_model()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.nodes = ()  # type: ignore[misc]
    assert {w.value: w.spec.axis for w in plan.weights} == {"w0": 1, "w1": 0, "w2": 1}


# --- the public function and the pipeline step run the pass ---------------------------------


def test_quantize_runs_the_pass_once_and_the_step_never_calls_quantize(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[QuantizeOptions] = []
    original = api._quantize

    def counted(model: ir.Model, calibration: object, options: QuantizeOptions) -> ir.Model:
        calls.append(options)
        return original(model, calibration, options)  # type: ignore[arg-type]

    monkeypatch.setattr(api, "_quantize", counted)
    feeds = linear_feeds()
    public = public_api.quantize(linear_model(), calibration=feeds, per_channel=False)
    assert len(calls) == 1 and calls[0].per_channel is False

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the pipeline step must not call the public quantize()")

    monkeypatch.setattr(public_api, "quantize", refuse)
    step = api.StaticQuantizePass(calibration=feeds, per_channel=False)
    assert isinstance(step.options, QuantizeOptions) and step.options.progress is False
    result = step(linear_model())
    assert len(calls) == 2
    assert ir.to_proto(result.model).SerializeToString() == ir.to_proto(
        public).SerializeToString()


def test_static_step_options_are_the_static_options() -> None:
    assert api.StaticQuantizePass.options_from is StaticOptions
    with pytest.raises(TypeError, match="bits"):
        api.StaticQuantizePass(bits=4)


@pytest.mark.parametrize("per_channel", [True, False])
def test_lstm_scales_per_direction_and_gate_column(per_channel: bool) -> None:
    from slimgraph.passes.quantize.dynamic import _lstm_codes

    weight = np.random.default_rng(1).standard_normal((2, 5, 12)).astype(np.float32)
    codes, scale = _lstm_codes(weight, weight_spec(8, axis=1 if per_channel else 0))
    bound = np.abs(weight).max(axis=1) if per_channel else np.abs(weight).max(axis=(1, 2))
    np.testing.assert_array_equal(scale, (bound / 127).astype(np.float32))
    broadcast = scale[:, None, :] if per_channel else scale[:, None, None]
    np.testing.assert_array_equal(codes, np.rint(weight / broadcast.astype(np.float64)))
    assert codes.dtype == np.int8 and codes.flags.c_contiguous
