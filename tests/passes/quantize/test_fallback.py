"""fp16 for the layers a budget keeps out of int8 (`fallback="fp16"`, `--fallback fp16`):
smaller than the fp32 fallback, the budget held on the final model, outputs within float16
rounding of the fp32 fallback on onnxruntime; bad uses refused in one line."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.ir import copy_model
from slimgraph.passes.precision import store_weights_fp16
from slimgraph.runtime.metrics import evaluate, load_data
from slimgraph.runtime.session import create_session, run
from slimgraph.tools.cli import main
from tests.kit.data import DIGITS, DIGITS_CALIB, DIGITS_TEST

# The digits CNN int8 has output cosine 0.99995 on its test split: this budget keeps 3 of its 5
# weighted layers float.
MIN_COSINE = 0.99998


@pytest.fixture(scope="module")
def fp16_result():
    model = sg.load(DIGITS)
    quantized, report = sg.quantize_with_report(
        model, calibration=str(DIGITS_CALIB), data=str(DIGITS_TEST), min_cosine=MIN_COSINE,
        fallback="fp16", progress=False,
    )
    return model, quantized, report


def _outputs(model: ir.Model) -> np.ndarray:
    images = np.load(DIGITS_TEST)["image"]
    session = create_session(model)
    return run(session, {"image": images})[session.get_outputs()[0].name]


def test_fp16_fallback_is_smaller_than_fp32_and_holds_the_budget(fp16_result) -> None:
    model, quantized, report = fp16_result
    kept = [k.node for k in report.budget.kept]
    choice = report.fallback
    assert kept and choice.layers == tuple(kept)
    assert choice.chosen == "fp16", choice.reason
    # the fp32 fallback: the same layers left float, nothing else different
    fp32 = sg.quantize(model, calibration=str(DIGITS_CALIB), exclude=kept, progress=False)
    size16, size32 = ir.to_proto(quantized).ByteSize(), ir.to_proto(fp32).ByteSize()
    assert size16 == choice.bytes_fp16 and size32 == choice.bytes_fp32
    assert size16 < 0.9 * size32, (size16, size32)
    halves = [v for v in quantized.graph.initializers.values()
              if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT16]
    assert len(halves) == choice.weights >= len(kept)
    # the budget, measured again here on the final model
    evaluation = evaluate(quantized, load_data(DIGITS_TEST, model), reference=model)
    assert evaluation.cosine >= MIN_COSINE
    assert report.budget.evaluation.cosine == pytest.approx(evaluation.cosine, abs=1e-9)
    # float16 weights, float32 compute: close to the fp32 fallback (the int8 layers after a
    # float16 one round some values to the neighbouring step: 0.4% of the output scale here),
    # and no further from the float model than the fp32 fallback
    half, full, reference = _outputs(quantized), _outputs(fp32), _outputs(model)
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(half, full, rtol=0, atol=1e-2 * scale)
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))  # noqa: E731
    assert rms(half - reference) <= 1.05 * rms(full - reference)


def test_fp16_weights_are_read_through_a_cast_to_float32(fp16_result) -> None:
    _, quantized, report = fp16_result
    by_name = {node.name: node for node in quantized.graph}
    for layer in report.fallback.layers:
        weight = by_name[layer].inputs[1]
        assert weight.dtype == ir.DataType.FLOAT
        cast = weight.producer()
        assert cast is not None and cast.op_type == "Cast"
        assert cast.inputs[0].const_value.dtype == ir.DataType.FLOAT16


def test_store_weights_fp16_converts_the_named_layers_weights_only() -> None:
    model = sg.optimize(sg.load(DIGITS))  # as quantization prepares it: BatchNorm folded
    conv = next(node for node in model.graph if node.op_type == "Conv")
    half = copy_model(model)
    result = store_weights_fp16(half, [conv.name, "no such node"])
    halves = [v for v in half.graph.initializers.values()
              if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT16]
    assert result.modified and result.converted_initializers == len(halves) == 1
    assert halves[0].const_value.size == conv.inputs[1].const_value.size >= 64
    assert sum(n.op_type == "Cast" for n in half.graph) == 1
    a, b = _outputs(half), _outputs(model)
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-3 * float(np.abs(b).max()))


def test_store_weights_fp16_leaves_a_weight_another_node_reads_float32() -> None:
    model = sg.optimize(sg.load(DIGITS))
    conv = next(node for node in model.graph if node.op_type == "Conv")
    reader = ir.node("Identity", [conv.inputs[1]], name="reader")
    model.graph.append(reader)
    model.graph.outputs.append(reader.outputs[0])
    reader.outputs[0].name = "weight_copy"
    result = store_weights_fp16(model, [conv.name])
    assert not result.modified and result.converted_initializers == 0


def test_fp32_fallback_is_the_default() -> None:
    assert sg.QuantizeOptions().fallback == "fp32"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--fallback fp16 is the precision of the layers an accuracy budget keeps out of "
             "int8: give --max-drop or --min-cosine (and --data)"),
        (["--mode", "dynamic", "--min-cosine", "0.99", "--data", DIGITS_TEST],
         "--fallback fp16 applies to static quantization (its budget search keeps layers "
         "float), not --mode dynamic"),
    ],
)
def test_fallback_fp16_without_a_budget_is_one_line(tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "q.onnx"
    calib = [] if "--mode" in extra else ["--calib", DIGITS_CALIB]
    code = main([str(a) for a in ("quantize", DIGITS, "-o", out, *calib, "--fallback", "fp16",
                                  *extra)])
    stderr = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert stderr.strip() == f"slimgraph quantize: error: {message}"


def test_fallback_fp16_without_a_budget_in_python_says_so() -> None:
    with pytest.raises(sg.BadOptionError, match=r"^fallback='fp16' is the precision of the "
                       r"layers an accuracy budget keeps out of int8: give max_drop= or "
                       r"min_cosine= \(and data=\)$"):
        sg.quantize(sg.load(DIGITS), calibration=str(DIGITS_CALIB), fallback="fp16")
