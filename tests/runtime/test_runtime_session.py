"""Sessions (threads, optimization level, no spinning, external data) and side-by-side timing."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimgraph.runtime.session as session_module
from slimgraph.errors import BadDataError, BadInputError, BadOptionError, UnsafeModelError
from slimgraph.ir import load, save
from slimgraph.runtime import BenchmarkResult, Timing, benchmark, create_session, run
from slimgraph.runtime.session import model_bytes
from tests.kit import protos
from tests.kit.files import write

OPSET = [helper.make_opsetid("", 18)]


def _chain_model(depth: int, size: int = 96) -> ir.Model:
    """y = x @ W @ W ... (depth MatMuls): more depth, more work."""
    weight = np.eye(size, dtype=np.float32) * 0.5 + 0.01
    nodes = []
    current = "x"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [current, "w"], [f"h{i}"]))
        current = f"h{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
        [numpy_helper.from_array(weight, "w")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=OPSET, ir_version=10))


X = {"x": np.random.default_rng(0).standard_normal((96, 96)).astype(np.float32)}


@pytest.fixture
def external_model(tmp_path: Path) -> Path:
    """y = (x + w) * Constant, w and the Constant in an external-data file."""
    big = np.arange(128, dtype=np.float32).reshape(2, 64) / 9
    return protos.external_add_mul(tmp_path, "w.bin", big, big + 1)


def _external_expected(x: np.ndarray) -> np.ndarray:
    big = np.arange(128, dtype=np.float32).reshape(2, 64) / 9
    return (x + big) * (big + 1)


X2 = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)


# ---------------------------------------------------------------- sessions


def test_session_options() -> None:
    session = create_session(_chain_model(1), threads=2, optimization="basic")
    options = session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session.get_providers() == ["CPUExecutionProvider"]
    for level in ("disable", "extended", "all"):
        out = run(create_session(_chain_model(2), optimization=level), X)["y"]
        weight = np.eye(96, dtype=np.float32) * 0.5 + 0.01
        np.testing.assert_allclose(out, X["x"] @ weight @ weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "feeds,message",
    [
        ({"x": np.zeros((96, 96))}, r"Unexpected input data type. Actual: \(tensor\(double\)\)"),
        ({"x": np.zeros((5, 96), np.float32)}, "Got invalid dimensions for input: x"),
        ({}, r"Required inputs \(\['x'\]\) are missing"),
        ({**X, "z": np.zeros(1)}, "Invalid input name: z"),
    ],
)
def test_run_rejects_bad_feeds(feeds: dict, message: str) -> None:
    session = create_session(_chain_model(1))
    expects = re.escape("it expects x: tensor(float)[96, 96]")
    pattern = f"^the inputs do not fit the model \\(.*{message}.*{expects}$"
    with pytest.raises(BadDataError, match=pattern):
        run(session, feeds)


def test_unknown_optimization_level() -> None:
    message = r"unknown optimization level 'fast' \(choose from disable, basic, extended, all\)"
    with pytest.raises(BadOptionError, match=message):
        create_session(_chain_model(1), optimization="fast")  # type: ignore[arg-type]
    assert issubclass(BadOptionError, BadInputError)


def test_session_for_model_with_external_data(external_model: Path) -> None:
    model = load(external_model)
    for session in (create_session(model), create_session(external_model)):
        np.testing.assert_allclose(run(session, {"x": X2})["y"], _external_expected(X2), rtol=1e-6)
    standalone = onnx.load_from_string(model_bytes(model))
    tensors = [*standalone.graph.initializer, standalone.graph.node[0].attribute[0].t]
    assert [t.data_location for t in tensors] == [TensorProto.DEFAULT] * 2
    assert b"w.bin" not in model_bytes(model)
    assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)


def test_large_model_session_goes_through_a_file(
    external_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "_IN_MEMORY_LIMIT", 0)
    session = create_session(load(external_model))
    np.testing.assert_allclose(run(session, {"x": X2})["y"], _external_expected(X2), rtol=1e-6)


def test_session_from_path_uses_the_safe_loader(tmp_path: Path) -> None:
    (tmp_path.parent / f"{tmp_path.name}-secret.bin").write_bytes(protos.W.tobytes())
    proto = protos.add_model(protos.external_tensor("w", f"../{tmp_path.name}-secret.bin"))
    path = write(tmp_path, proto)
    message = r"initializer 'w' has external data .*'\.\.' is not allowed"
    with pytest.raises(UnsafeModelError, match=message):
        create_session(path)


# ---------------------------------------------------------------- benchmark


def test_benchmark_times_models_side_by_side() -> None:
    small, large = _chain_model(1), _chain_model(40)
    labels = ["one", "forty", "one again"]
    result = benchmark([small, large, small], X, labels=labels, rounds=5, warmup=1, threads=1)
    assert isinstance(result, BenchmarkResult)
    assert [t.label for t in result.timings] == ["one", "forty", "one again"]
    assert all(isinstance(t, Timing) for t in result.timings)
    assert result.timings[0].ratio == 1.0
    for timing in result.timings:
        assert 0 < timing.median_ms <= timing.p90_ms
        assert timing.ratio == pytest.approx(timing.median_ms / result.timings[0].median_ms)
    assert result.timings[1].ratio > 3, "40 MatMuls must take clearly longer than one"
    assert (result.rounds, result.threads, result.optimization) == (5, 1, "all")
    as_dict = result.to_dict()
    assert [m["label"] for m in as_dict["models"]] == ["one", "forty", "one again"]


def test_benchmark_defaults_and_inputs(tmp_path: Path) -> None:
    path = save(_chain_model(1), tmp_path / "chain.onnx")
    session = create_session(_chain_model(2))
    result = benchmark([path, session], [X, X], rounds=2, warmup=0)
    assert [t.label for t in result.timings] == ["model 0", "model 1"]
    # ready sessions: the result reports what they were built with, not the defaults
    ready = [create_session(_chain_model(1), threads=1, optimization="basic")] * 2
    result = benchmark(ready, X, rounds=1, warmup=0)
    assert (result.threads, result.optimization) == (1, "basic")


def test_benchmark_rejects_feeds_that_do_not_fit() -> None:
    with pytest.raises(BadDataError, match="Invalid input name: z"):
        benchmark([_chain_model(1)], {**X, "z": np.zeros(1)}, rounds=1)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rounds": 0}, r"rounds must be >= 1 and warmup >= 0 \(got 0, 3\)"),
        ({"warmup": -1}, r"rounds must be >= 1 and warmup >= 0 \(got 20, -1\)"),
        ({"labels": ["a"]}, "1 labels given for 2 models"),
        ({"feeds": [X]}, "1 feed dicts given for 2 models"),
        ({"models": []}, "benchmark needs at least one model"),
    ],
)
def test_benchmark_rejects_bad_options(kwargs: dict, message: str) -> None:
    arguments = {"models": [_chain_model(1), _chain_model(1)], "feeds": X, **kwargs}
    with pytest.raises(BadOptionError, match=message):
        benchmark(arguments.pop("models"), arguments.pop("feeds"), **arguments)
