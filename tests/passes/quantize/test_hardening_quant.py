"""Issue 10, kinds 8-10: custom-domain ops (quantize without running the model), fixed-batch
models that declare a dynamic batch (one row per run), weight-only on Linear layers with bias."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimgraph as sg
from slimgraph.errors import SlimgraphError, UnsupportedModelError
from slimgraph.runtime import create_session, run
from slimgraph.tools.cli import main

RNG = np.random.default_rng(8)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _model(nodes, inputs, output, initializers, opsets=()) -> ir.Model:  # noqa: ANN001
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in initializers.items()],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), *opsets]
    )
    proto.ir_version = 8
    return ir.from_proto(proto)


def fancy_model(op: str = "FancyOp") -> ir.Model:
    """x -> MatMul(W[16,16]) -> my.domain::FancyOp -> y."""
    return _model(
        [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
         helper.make_node(op, ["m"], ["y"], domain="my.domain", name="fancy")],
        [("x", ["N", 16])], "y", {"W": rand(16, 16)}, [helper.make_opsetid("my.domain", 1)],
    )


# ---------------------------------------------------------------- kind 8: custom-domain ops


@pytest.mark.parametrize("mode", ["dynamic", "weight-only"])
def test_custom_op_without_verification_is_quantized(mode: str, tmp_path: Path) -> None:
    source, out = tmp_path / "fancy.onnx", tmp_path / "out.onnx"
    sg.save(fancy_model(), source)
    args = ["quantize", str(source), "-o", str(out), "--mode", mode, "--no-verify"]
    assert main(args) == 0
    ops = [n.op_type for n in sg.load(out).graph]
    assert "FancyOp" in ops and "MatMul" not in ops
    assert ("MatMulNBits" if mode == "weight-only" else "MatMulInteger") in ops
    # the relative: the op excluded by name makes no difference
    assert main([*args, "--exclude", "fancy"]) == 0


@pytest.mark.parametrize("mode", ["dynamic", "weight-only"])
def test_custom_op_with_verification_says_what_to_pass(
    mode: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "fancy.onnx", tmp_path / "out.onnx"
    sg.save(fancy_model(), source)
    assert main(["quantize", str(source), "-o", str(out), "--mode", mode]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "the model does not run on onnxruntime" in err and "--no-verify" in err
    assert not out.exists()
    with pytest.raises(UnsupportedModelError, match="verify=False"):
        sg.quantize(fancy_model("OtherOp"), mode=mode)
    assert sg.quantize(fancy_model("OtherOp"), mode=mode, verify=False) is not None


# ---------------------------------------------------------------- kind 9: fixed batch


def fixed_batch_model() -> ir.Model:
    """x[N,3,8,8] -> Conv -> Relu -> Reshape([1,-1]) -> MatMul(W[512,10]): runs at batch 1 only."""
    return _model(
        [
            helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Reshape", ["r", "shape"], ["f"]),
            helper.make_node("MatMul", ["f", "W"], ["y"]),
        ],
        [("x", ["N", 3, 8, 8])], "y",
        {"cw": rand(8, 3, 3, 3), "shape": np.array([1, -1], np.int64), "W": rand(512, 10)},
    )


def test_fixed_batch_model_is_calibrated_one_row_per_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = fixed_batch_model()
    data = {"x": rand(40, 3, 8, 8)}
    with caplog.at_level(logging.WARNING):
        quantized = sg.quantize(model, calibration=data, report=True)
    assert caplog.text.count("running one row per run") == 1  # said once, not per pass
    session_f, session_q = create_session(model), create_session(quantized)
    row = {"x": data["x"][:1]}
    ref, got = run(session_f, row)["y"], run(session_q, row)["y"]
    cosine = float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cosine > 0.99


def test_fixed_batch_model_through_the_cli(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    source, out, calib = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "c.npz"
    sg.save(fixed_batch_model(), source)
    np.savez(calib, x=rand(64, 3, 8, 8))
    assert main(["quantize", str(source), "-o", str(out), "--calib", str(calib)]) == 0
    assert "internal error" not in capfd.readouterr().err
    assert out.exists()


def test_a_model_that_fails_on_every_row_raises_our_error() -> None:
    """A relative: Reshape to a fixed [2, -1] fails at batch 1 too; never onnxruntime's class."""
    model = fixed_batch_model()
    shape = next(v for v in model.graph.initializers.values() if v.name == "shape")
    shape.const_value = ir.tensor(np.array([3, -1], np.int64), name="shape")
    with pytest.raises(SlimgraphError) as caught:
        sg.quantize(model, calibration={"x": rand(8, 3, 8, 8)})
    assert type(caught.value).__module__.startswith("slimgraph")


# ---------------------------------------------------------------- kind 10: weight-only Linear


def _linear_stack(layers: int, width: int) -> ir.Model:
    nodes, inits, x = [], {}, "x"
    for i in range(layers):
        inits[f"W{i}"] = rand(width, width) / np.float32(np.sqrt(width))
        inits[f"B{i}"] = rand(width)
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"])]
        x = f"a{i}"
    return _model(nodes, [("x", ["N", width])], x, inits)


@pytest.mark.parametrize("fmt", ["qoperator", "qdq"])
def test_weight_only_quantizes_matmul_add_layers(fmt: str) -> None:
    model = _linear_stack(3, 64)
    quantized = sg.quantize(model, mode="weight-only", fmt=fmt)
    ops = [n.op_type for n in quantized.graph]
    assert "Gemm" not in ops
    feeds = {"x": rand(5, 64)}
    ref = run(create_session(model), feeds)
    got = run(create_session(quantized), feeds)
    for name, expected in ref.items():
        cosine = np.dot(expected.ravel(), got[name].ravel()) / (
            np.linalg.norm(expected) * np.linalg.norm(got[name])
        )
        assert cosine > 0.99


def test_weight_only_quantizes_a_gemm_linear() -> None:
    """A relative: a Linear exported as Gemm(transB=1) with bias."""
    model = _model(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)],
        [("x", ["N", 64])], "y", {"W": rand(32, 64), "B": rand(32)},
    )
    quantized = sg.quantize(model, mode="weight-only")
    assert [n.op_type for n in quantized.graph] == ["MatMulNBits"]
    feeds = {"x": rand(3, 64)}
    got = run(create_session(quantized), feeds)["y"].ravel()
    ref = run(create_session(model), feeds)["y"].ravel()
    assert np.dot(got, ref) / (np.linalg.norm(got) * np.linalg.norm(ref)) > 0.98  # int4 blocks


def test_onnx_checker_accepts_weight_only_linear_with_bias() -> None:
    quantized = sg.quantize(_linear_stack(2, 32), mode="weight-only", fmt="qdq")
    onnx.checker.check_model(ir.to_proto(quantized))
