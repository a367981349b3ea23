"""The speed guard (`slimgraph.runtime.speed_guard`): the decision on given figures, the batch
sizes it times at, and real refusals and acceptances on small models made genuinely slower or
faster (no figure is hard-coded: a 16-fold amount of work is slower on any machine)."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import slimgraph as sg
from slimgraph.api._options import SpeedOptions
from slimgraph.errors import BadOptionError, VerificationError
from slimgraph.ir.metadata import SPEED_FALLBACK
from slimgraph.passes.quantize.speed_fallback import (
    FallbackLayer,
    SpeedFallback,
    dynamic_note,
    slow_layers,
)
from slimgraph.runtime.bench import Timing
from slimgraph.runtime.speed_guard import (
    DEFAULT_BATCHES,
    ENV_SKIP,
    LOSSLESS_BASELINE,
    TOLERANCE,
    channel_multiple,
    guard_batches,
    judge_speed,
    speed_guard,
)
from tests.kit.data import DIGITS

BASE = Timing("input", 10.0, 11.0, 1.0, 1.0, 1.0)


def _out(ratio: float, low: float, high: float) -> Timing:
    return Timing("output", 10.0 * ratio, 11.0 * ratio, ratio, low, high)


def chain(layers: int, width: int = 256, batch: int | str = "batch") -> ir.Model:
    """`layers` MatMuls of [width, width] one after the other: the work grows with `layers`."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(
        (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}")
        for i in range(layers)]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"y{i - 1}", f"w{i}"], [f"y{i}"])
             for i in range(layers)]  # fmt: skip
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info(f"y{layers - 1}", TensorProto.FLOAT, [batch, width])],
        weights,
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))


@pytest.fixture
def guard_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite turns the guard off (tests/conftest.py); these tests turn it back on."""
    monkeypatch.delenv(ENV_SKIP, raising=False)


def test_judge_refuses_only_an_interval_wholly_above_the_tolerance() -> None:
    edge = 1.0 + TOLERANCE
    check = judge_speed({1: (BASE, _out(1.3, 1.2, 1.4)), 64: (BASE, _out(0.6, 0.5, 0.7))},
                        rounds=20)  # fmt: skip
    assert check.slower and [b.slower for b in check.batches] == [True, False]
    assert check.batches[0].rounds == 20
    assert check.line() == (
        "latency of the output / the input on onnxruntime, batch 1: 1.30x (1.20-1.40), "
        "batch 64: 0.60x (0.50-0.70): slower beyond noise at batch 1"
    )
    # an interval that reaches down to the tolerance is noise, one just above it is not
    assert not judge_speed({64: (BASE, _out(1.2, edge, 1.3))}).slower
    assert judge_speed({64: (BASE, _out(1.2, edge + 1e-6, 1.3))}).slower
    # a median ratio above 1 whose interval contains 1.0 is within noise
    within = judge_speed([(1, BASE, _out(1.5, 0.9, 2.0))])
    assert not within.slower
    assert within.line().endswith(": not slower beyond noise")
    assert within.to_dict()["batches"] == [
        {"batch": 1, "input_ms": 10.0, "output_ms": 15.0, "ratio": 1.5, "low": 0.9, "high": 2.0,
         "rounds": 0, "slower": False, "input_as_given_ms": None,
         "ratio_to_input_as_given": None}]  # fmt: skip
    # judged against the lossless-optimized input, the input as given reported beside it
    given = Timing("input as given", 40.0, 44.0, 4.0, 3.9, 4.1)
    optimized = judge_speed([(1, BASE, _out(1.5, 1.4, 1.6), given)],
                            baseline=LOSSLESS_BASELINE)  # fmt: skip
    assert optimized.slower and optimized.to_dict()["baseline"] == LOSSLESS_BASELINE
    assert optimized.line() == (
        "latency of the output / the lossless-optimized input on onnxruntime, batch 1: 1.50x "
        "(1.40-1.60) [0.38x of the input as given]: slower beyond noise at batch 1")


def test_guard_batches_default_asked_and_fixed() -> None:
    assert guard_batches(chain(1)) == DEFAULT_BATCHES == (1, 64)
    assert guard_batches(chain(1), 8) == (8,)
    assert guard_batches(chain(1, batch=4)) == (4,)
    assert guard_batches(chain(1, batch=4), [4]) == (4,)
    with pytest.raises(BadOptionError, match="the model's batch is fixed to 4: cannot time it at "
                       "batch 64"):  # fmt: skip
        guard_batches(chain(1, batch=4), 64)
    with pytest.raises(BadOptionError, match=r"batch sizes must be at least 1, got \[0\]"):
        guard_batches(chain(1), 0)


def test_environment_variable_skips_the_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_SKIP, "1")
    assert speed_guard(chain(1), chain(16)) is None


def test_a_model_with_sixteen_times_the_work_is_refused(guard_on: None) -> None:
    reference, slower = chain(1), chain(16)
    with pytest.raises(VerificationError) as caught:
        speed_guard(reference, slower, batches=8, budget_s=1.0)
    message = str(caught.value)
    assert message.startswith("latency of the output / the input on onnxruntime, batch 8: ")
    assert "slower beyond noise at batch 8; nothing written (allow_slower=True writes it " in (
        message)
    assert "--allow-slower" in caught.value.cli_message
    allowed = speed_guard(reference, slower, batches=8, allow_slower=True, budget_s=1.0)
    assert allowed is not None and allowed.slower and allowed.allowed
    assert allowed.line().endswith("written anyway (--allow-slower)")
    assert allowed.batches[0].ratio > 2


def test_a_result_faster_than_the_raw_input_but_slower_than_its_optimized_form_is_refused(
    guard_on: None,
) -> None:
    raw, optimized, result = chain(16), chain(1), chain(4)
    assert not speed_guard(raw, result, batches=8, budget_s=1.0).slower  # the raw figure alone
    with pytest.raises(VerificationError) as caught:
        speed_guard(raw, result, baseline=optimized, batches=256, budget_s=1.0)
    assert str(caught.value).startswith(
        "latency of the output / the lossless-optimized input on onnxruntime, batch 256: ")
    # the input as given, 16x the work: timed alongside when one run of it costs at most half
    # a round (then the result is faster than it), else noted from one run (machine-dependent)
    message = str(caught.value)
    noted = "; the input as given not timed at batch 256: one run took " in message
    timed = re.search(r"\[(\d+\.\d+)x of the input as given\]", message)
    assert noted != bool(timed)
    assert timed is None or float(timed.group(1)) < 1.0
    cheap = speed_guard(chain(2), chain(1), baseline=chain(1), batches=8, budget_s=1.0)
    assert cheap is not None and cheap.baseline == LOSSLESS_BASELINE
    (figures,) = cheap.batches
    assert figures.given_ms is not None and figures.given_ratio is not None
    assert figures.given_ratio < 1.0  # half the work of the input as given


def test_verbs_judge_against_the_input_as_optimize_writes_it(guard_on: None) -> None:
    # the bundled digits CNN as exported runs about 2x slower than its lossless form (unfolded
    # BatchNorm, zero biases computed at run time): a "result" that is the export itself is
    # not slower than the input as given, and is slower than what `optimize` alone gives
    digits = sg.load(DIGITS)
    check = SpeedOptions(speed_check=True, allow_slower=True).guard(digits, digits.clone())
    assert check is not None and check.baseline == LOSSLESS_BASELINE
    assert check.slower and check.allowed
    # the input as given is the output here: timed alongside (1.0x), or noted from one run
    assert all(b.given_ratio is None or 0.7 < b.given_ratio < 1.4 for b in check.batches)
    assert "input as given" in check.line()


def test_a_faster_model_is_accepted_at_both_default_batches(guard_on: None) -> None:
    check = speed_guard(chain(16), chain(1), budget_s=2.0)
    assert check is not None and not check.slower
    assert [b.batch for b in check.batches] == [1, 64]
    assert all(b.low <= b.ratio <= b.high < 1.0 and b.rounds >= 9 for b in check.batches)
    assert check.seconds < 30


def test_python_verbs_guard_when_asked(guard_on: None) -> None:
    """Off by default in Python; `speed_check=True` times the result and reports it."""
    model = chain(2, width=128)
    _, report = sg.prune_with_report(model, ratio=0.5)
    assert report.speed is None
    pruned, report = sg.prune_with_report(model, ratio=0.5, speed_check=True, speed_batches=8)
    assert report.speed is not None and [b.batch for b in report.speed.batches] == [8]
    assert not report.speed.slower
    _, qreport = sg.quantize_with_report(model, speed_check=True, speed_batches=(8,))
    assert qreport.speed is not None and qreport.speed.batches[0].batch == 8


def test_channel_multiple_is_an_nchwc_block() -> None:
    assert channel_multiple() in (8, 16)


# --- static quantization's speed fallback (passes/quantize/speed_fallback.py) -----------------


def conv_net(batch: int | str = "batch") -> ir.Model:
    """Conv 3x3 (8 -> 16) then a 2-way MatMul head: the MACs are almost all the Conv's."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal((16, 2)).astype(np.float32), "h")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c"], ["p"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["p", "h"], ["y"])]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])], weights)
    return ir.from_proto(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))


def test_speed_fallback_keeps_the_slow_classes_float() -> None:
    fallback = SpeedFallback(1, [
        FallbackLayer(("n1", "n2"), ("a", "b"), "Conv", "x[1, 8, 4, 4] w[8, 1, 3, 3] group 8",
                      1.4, 1.2, 1.6, True),
        FallbackLayer(("n3",), ("c",), "Conv", "x[1, 8, 4, 4] w[64, 8, 1, 1]", 0.5, 0.4, 0.6,
                      False)], untimed=["n4"], seconds=2.0)  # fmt: skip
    assert fallback.kept_float == ["n1", "n2"]
    assert fallback.summary().splitlines() == [
        "speed fallback: 2 layer shape(s) timed at batch 1 in 2.0 s, 2 layer(s) kept float where "
        "int8 ran slower",
        "  Conv x[1, 8, 4, 4] w[8, 1, 3, 3] group 8 (a, b): int8 1.40x of float (1.20-1.60)",
        "  1 layer(s) not timed (budget), left int8"]
    assert fallback.to_dict()["kept_float"] == ["n1", "n2"]


def test_static_quantization_skips_the_timing_in_the_suite() -> None:
    calibration = {"x": np.random.default_rng(0).standard_normal((4, 8, 16, 16)).astype(
        np.float32)}
    quantized = sg.quantize(conv_net(), calibration=calibration)
    assert quantized.meta[SPEED_FALLBACK].skipped == f"{ENV_SKIP} is set"
    off = sg.quantize(conv_net(), calibration=calibration, speed_fallback=False)
    assert SPEED_FALLBACK not in off.meta


def test_slow_layers_times_one_class_per_shape(guard_on: None) -> None:
    model = chain(3, width=64)  # three MatMuls of one shape: one class
    fallback = slow_layers(model, [n.name or "" for n in model.graph], budget_s=1.0)
    assert len(fallback.classes) == 1 and not fallback.untimed
    timed = fallback.classes[0]
    assert timed.op_type == "MatMul" and len(timed.nodes) == 3
    assert timed.shape == "x[1, 64] w[64, 64]"
    assert timed.low <= timed.ratio <= timed.high
    assert fallback.kept_float == (list(timed.nodes) if timed.kept_float else [])


def test_dynamic_note_speaks_for_convolution_models_only() -> None:
    note = dynamic_note(conv_net())
    assert note is not None
    assert note.startswith("note: 100% of the MACs are convolutions, which dynamic int8 leaves "
                           "float")
    assert "--calib DATA.npz, or --zero-shot" in note
    assert dynamic_note(chain(2)) is None


def test_dynamic_note_counts_macs_at_the_exports_example_sizes() -> None:
    """An audio front end: at 1 sample the strided convolution leaves no frames and the MLP over
    frames counts nothing, so the MACs looked 100% convolution; at the export's 800 samples the
    MLP is most of them (the note was false advice on Wav2Vec2)."""
    torch = pytest.importorskip("torch")

    class Audio(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Sequential(torch.nn.Conv1d(1, 16, 3, padding=1),
                                            torch.nn.GELU(), torch.nn.Conv1d(16, 16, 10, stride=5))
            self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(),
                                           torch.nn.Linear(64, 64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mlp(self.conv(x.unsqueeze(1)).transpose(1, 2))

    dim = torch.export.Dim
    shapes = {"x": {0: dim("batch"), 1: dim("samples", min=20, max=100_000)}}
    model = sg.from_torch(Audio().eval(), (torch.randn(2, 800),), dynamic_shapes=shapes)
    assert dynamic_note(model) is None
    model.metadata_props.clear()  # no recorded sizes: counted at 1 sample, as before
    assert (dynamic_note(model) or "").startswith("note: 100% of the MACs are convolutions")
