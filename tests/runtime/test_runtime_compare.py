"""compare(): every fidelity figure against an independent numpy computation over several feeds."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimgraph.errors import BadDataError
from slimgraph.runtime import FidelityAccumulator, compare, compare_outputs, create_session
from slimgraph.runtime.session import model_bytes

RNG = np.random.default_rng(7)
W = RNG.standard_normal((6, 5)).astype(np.float32)


def _scores_model(weight: np.ndarray, feature_scale: float = 1.0) -> ir.Model:
    """scores = x @ weight ([batch, 5] class scores) and features = tanh(x) * s ([batch, 2, 3])."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["scores"]),
            helper.make_node("Tanh", ["x"], ["t"]),
            helper.make_node("Mul", ["t", "s"], ["m"]),
            helper.make_node("Reshape", ["m", "shape"], ["features"]),
        ],
        "scores",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 5]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 2, 3]),
        ],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.array(feature_scale, np.float32), "s"),
            numpy_helper.from_array(np.array([-1, 2, 3], np.int64), "shape"),
        ],
    )
    return ir.from_proto(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    )


FEEDS = [{"x": RNG.standard_normal((n, 6)).astype(np.float32)} for n in (4, 7, 3, 10)]


def _outputs(model: ir.Model) -> dict[str, np.ndarray]:
    """All feeds run with a plain onnxruntime session, outputs concatenated along the batch."""
    session = ort.InferenceSession(model_bytes(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    runs = [dict(zip(names, session.run(names, feed), strict=True)) for feed in FEEDS]
    return {name: np.concatenate([r[name] for r in runs]) for name in names}


def test_metrics_match_numpy() -> None:
    reference = _scores_model(W)
    noisy = W + RNG.standard_normal(W.shape).astype(np.float32) * 0.3
    candidate = _scores_model(noisy, feature_scale=1.1)
    fidelity = compare(reference, candidate, FEEDS)
    assert fidelity.batches == len(FEEDS)  # runs; samples counts rows
    assert fidelity.samples == sum(feed["x"].shape[0] for feed in FEEDS)
    ref, cand = _outputs(reference), _outputs(candidate)
    by_name = {o.name: o for o in fidelity.outputs}
    assert set(by_name) == {"scores", "features"}
    for name in ("scores", "features"):
        r = ref[name].astype(np.float64).ravel()
        c = cand[name].astype(np.float64).ravel()
        out = by_name[name]
        assert out.max_abs_error == pytest.approx(np.abs(r - c).max(), rel=1e-9)
        assert out.mean_abs_error == pytest.approx(np.abs(r - c).mean(), rel=1e-9)
        cosine = r @ c / (np.linalg.norm(r) * np.linalg.norm(c))
        assert out.cosine == pytest.approx(cosine, rel=1e-9)
        sqnr = 10 * np.log10((r @ r) / ((r - c) @ (r - c)))
        assert out.sqnr_db == pytest.approx(sqnr, rel=1e-9)
        assert out.reference_max_abs == pytest.approx(np.abs(r).max(), rel=1e-9)
        assert out.cosine < 1.0 and math.isfinite(out.sqnr_db)
    top1 = (ref["scores"].argmax(1) == cand["scores"].argmax(1)).mean()
    assert 0 < top1 < 1, "the noise must flip some but not all predictions for this test"
    assert by_name["scores"].top1_agreement == pytest.approx(top1, rel=1e-12)
    assert by_name["features"].top1_agreement is None  # rank 3: not class scores
    assert by_name["scores"].shape == (24, 5)  # every run's rows, stacked on axis 0
    assert fidelity.worst_cosine == min(o.cosine for o in fidelity.outputs)
    assert fidelity.worst_sqnr_db == min(o.sqnr_db for o in fidelity.outputs)
    as_dict = fidelity.to_dict()
    assert as_dict["samples"] == 24 and as_dict["batches"] == 4
    assert len(as_dict["outputs"]) == 2


def test_identical_models() -> None:
    model = _scores_model(W)
    fidelity = compare(model, create_session(model), FEEDS)
    for out in fidelity.outputs:
        assert out.sqnr_db == math.inf
        assert out.cosine == 1.0
        assert out.max_abs_error == 0.0 and out.mean_abs_error == 0.0
    assert fidelity.outputs[0].top1_agreement == 1.0


def test_one_feed_dict() -> None:
    fidelity = compare(_scores_model(W), _scores_model(W * 2), FEEDS[0])
    assert fidelity.samples == 4 and fidelity.batches == 1  # the dict's 4 rows, one run
    # scaling keeps direction: cosine 1, SQNR 0 dB (error as large as the signal)
    scores = next(o for o in fidelity.outputs if o.name == "scores")
    assert scores.cosine == pytest.approx(1.0, abs=1e-7)
    assert scores.sqnr_db == pytest.approx(0.0, abs=1e-5)
    assert scores.top1_agreement == 1.0


def test_zero_outputs() -> None:
    zeros = {"y": np.zeros((2, 3), np.float32)}
    same = compare_outputs([zeros], [zeros]).outputs[0]
    assert (same.cosine, same.sqnr_db) == (1.0, math.inf)
    off = compare_outputs([zeros], [{"y": np.ones((2, 3), np.float32)}]).outputs[0]
    assert (off.cosine, off.sqnr_db, off.max_abs_error) == (0.0, -math.inf, 1.0)


def test_nonfinite_candidate_fails_every_threshold() -> None:
    ref = {"y": np.ones((2, 3), np.float32)}
    cand = {"y": np.array([[1, np.nan, 1], [np.inf, 1, 1]], np.float32)}
    out = compare_outputs([ref, ref], [ref, cand]).outputs[0]
    assert out.nonfinite == 2
    assert (out.cosine, out.sqnr_db) == (-1.0, -math.inf)
    assert out.max_abs_error == math.inf and out.mean_abs_error == math.inf
    assert not out.cosine > 0.99 and not out.sqnr_db > 20
    clean = compare_outputs([ref], [ref]).outputs[0]
    assert clean.nonfinite == 0


def test_mismatched_outputs_are_errors() -> None:
    accumulator = FidelityAccumulator()
    with pytest.raises(BadDataError, match="the candidate model has no output 'y'"):
        accumulator.add({"y": np.zeros(3)}, {"z": np.zeros(3)})
    message = r"output 'y' has shape \[4\] in the candidate and \[3\]"
    with pytest.raises(BadDataError, match=message):
        accumulator.add({"y": np.zeros(3)}, {"y": np.zeros(4)})
    assert accumulator.samples == 0
    with pytest.raises(BadDataError, match="no samples were compared"):
        accumulator.result()
    with pytest.raises(BadDataError, match="no samples were compared"):
        compare(_scores_model(W), _scores_model(W), [])


def test_accumulator_memory_does_not_grow() -> None:
    """Sums only: 400 outputs of 40 kB each must not be kept (16 MB if they were)."""
    rng = np.random.default_rng(0)
    ref = {"y": rng.standard_normal((100, 100)).astype(np.float32)}
    cand = {"y": ref["y"] + 0.01}
    accumulator = FidelityAccumulator()
    accumulator.add(ref, cand)
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        for _ in range(400):
            accumulator.add(ref, cand)
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grown - baseline < 100_000
    assert accumulator.batches == 401 and accumulator.samples == 401 * 100  # runs, rows
    for value in vars(accumulator.sums["y"]).values():
        assert isinstance(value, (int, float, bool, tuple))
    assert accumulator.result().outputs[0].mean_abs_error == pytest.approx(0.01, rel=1e-3)
