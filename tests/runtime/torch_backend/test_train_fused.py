"""Training after fusion and after dynamic int8 quantization: `sg.finetune` runs on graphs with
onnxruntime's contrib ops (MultiHeadAttention, BiasGelu, QAttention, GatherBlockQuantized) and
the dynamic int8 ops (DynamicQuantizeLinear, MatMulInteger), `epochs=0` gives back every
initializer byte for byte, and the int8 weights train: a lowered module trained for a few steps
and written back computes what the module computed, and onnxruntime runs the written-back graph
as the backend does (rtol 1e-4), so the graph that trains is the graph that is deployed."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.passes.quantize.dynamic import DynamicQuantizePass
from slimgraph.passes.transformer import PackAttentionPass
from tests import models
from tests.kit.asserts import assert_close
from tests.kit.data import DATA, DIGITS, digits_arrays, transformer_feeds
from tests.kit.exports import export_transformer
from tests.runtime.torch_backend.backend_helpers import (
    assert_lowers_exactly,
    assert_matches_ort,
    torch_outputs,
    with_measured_codes,
)

torch = pytest.importorskip("torch")

from slimgraph.runtime.torch_backend import lower, write_back  # noqa: E402
from tests import models_hf  # noqa: E402


def _initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}


def _op_counts(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(f"{n.domain}::{n.op_type}" for n in model.graph)


def _assert_round_trip(model: ir.Model, data: dict, **options: object) -> None:
    same = sg.finetune(model, data, epochs=0, progress=False, **options)
    before, after = _initializers(model), _initializers(same)
    assert before.keys() == after.keys()
    for name, array in before.items():
        assert array.dtype == after[name].dtype and array.tobytes() == after[name].tobytes(), name


def _moved(model: ir.Model, trained: ir.Model) -> list[str]:
    before, after = _initializers(model), _initializers(trained)
    return [k for k in before if not np.array_equal(before[k], after[k])]


@pytest.fixture(scope="module")
def digits_transformer() -> tuple[ir.Model, dict[str, np.ndarray]]:
    """DigitsTransformer (digit rows as 8 tokens of 8 features), exported, and 256 labelled
    training rows."""
    torch.manual_seed(0)
    model = sg.from_torch(models.DigitsTransformer().eval(), (torch.randn(2, 1, 8, 8),))
    with np.load(DIGITS.with_name("digits_train.npz")) as archive:
        data = {model.graph.inputs[0].name: archive["image"][:256],
                "labels": archive["labels"][:256]}
    return model, data


@pytest.fixture(scope="module")
def bert_int8() -> tuple[ir.Model, ir.Model]:
    """The BERT-style encoder (2 x 64, 4 heads): as exported, and fused by the transformer preset
    then quantized dynamically (the standard Attention beside int8 projections,
    GatherBlockQuantized, MatMulInteger)."""
    model = export_transformer("bert")
    fused = sg.optimize(model, preset="transformer", verify=False)
    return model, sg.quantize(fused, mode="dynamic", verify=False, progress=False)


def test_finetune_runs_on_a_transformer_preset_graph(digits_transformer) -> None:
    model, data = digits_transformer
    fused = sg.optimize(model, preset="transformer", verify=False)
    assert any(n.domain == "com.microsoft" for n in fused.graph)
    _assert_round_trip(fused, data)
    trained, report = sg.finetune_with_report(fused, data, epochs=1, batch_size=32,
                                              progress=False)
    assert np.isfinite(report.history.records[1].loss)
    assert _moved(fused, trained) and _op_counts(trained) == _op_counts(fused)
    assert_matches_ort(trained, {k: v[:16] for k, v in data.items() if k != "labels"})


def test_finetune_runs_on_a_dynamic_int8_transformer_with_teacher_kd(bert_int8) -> None:
    teacher, quantized = bert_int8
    ops = _op_counts(quantized)
    assert ops["::Attention"] == 2 and ops["::MatMulInteger"] == 12
    assert ops["com.microsoft::GatherBlockQuantized"] >= 1
    rows = transformer_feeds("bert", 64, 12, seed=3)
    _assert_round_trip(quantized, rows, teacher=teacher, kd=("response",))
    trained = sg.finetune(quantized, rows, teacher=teacher, kd=("response",), epochs=1,
                          batch_size=16, lr=1e-3, progress=False)
    moved = _moved(quantized, trained)
    integer = {k for k, v in quantized.graph.initializers.items()
               if v.const_value.dtype in (ir.DataType.INT8, ir.DataType.UINT8)}
    readers = {(u.node.op_type, u.idx) for k in integer & set(moved)
               for u in quantized.graph.initializers[k].uses()}
    assert ("MatMulInteger", 1) in readers
    assert _op_counts(trained) == ops


def _dynamic(model: ir.Model, **options: object) -> ir.Model:
    copy = ir.from_proto(ir.to_proto(model))
    return DynamicQuantizePass(**options)(copy).model  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["QAttention", "DynamicQuantizeMatMul", "ConvInteger"])
def test_trained_int8_weights_written_back_run_as_trained(
    kind: str, bert_int8, digits_transformer
) -> None:
    """A few steps on the lowered module, then write_back: the written-back model lowers to a
    module computing what the trained one computes (the int8 codes are its re-quantized
    parameters), and onnxruntime runs it as the backend does (given the same dynamic codes)."""
    if kind == "QAttention":  # the packed form (dynamic int8 writes the standard Attention)
        fused = sg.optimize(bert_int8[0], preset="transformer", verify=False)
        quantized = _dynamic(PackAttentionPass(with_bias=False)(fused).model)
        feeds = transformer_feeds("bert", 8, 10, seed=5)
    elif kind == "DynamicQuantizeMatMul":
        model, data = digits_transformer
        quantized = _dynamic(model, matmul_kernel="fused")
        feeds = {k: v[:8] for k, v in data.items() if k != "labels"}
    else:
        quantized = _dynamic(sg.load(DATA / "digits_cnn.onnx"), op_types=("Conv", "Gemm"))
        feeds = {"image": digits_arrays(rows=8)["image"]}
    assert any(n.op_type == kind for n in quantized.graph)
    lowered = lower(quantized)
    inputs = [torch.from_numpy(feeds[name]) for name in lowered.input_names]
    optimizer = torch.optim.SGD(lowered.parameters(), lr=0.05)
    integer = {f"weights.{q.path}" for q in lowered._qweights}
    assert {q.initializer for q in lowered._qweights} == {  # every int8 weight trains
        k for k, v in quantized.graph.initializers.items()
        if v.const_value.dtype in (ir.DataType.INT8, ir.DataType.UINT8)
    }
    lowered.train()
    for _ in range(3):
        optimizer.zero_grad()
        lowered(*inputs)[0].pow(2).mean().backward()
        reached = {name for name, p in lowered.named_parameters()
                   if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        assert integer <= reached  # straight-through: every int8 weight gets a gradient
        optimizer.step()
    lowered.eval()
    trained = write_back(quantized, lowered)
    assert set(_moved(quantized, trained)) & {q.initializer for q in lowered._qweights}
    expected = torch_outputs(lowered, feeds)
    again = torch_outputs(lower(trained), feeds)
    for name, want in expected.items():
        assert_close(want, again[name], rtol=1e-6, atol=1e-6, scale_floor=0.0, name=name)
    cut, with_codes = with_measured_codes(trained, feeds)
    assert_matches_ort(cut, with_codes, optimization="disable")


@pytest.mark.parametrize("form", ["transformer", "dynamic"])
def test_finetune_runs_on_hugging_face_bert(form: str) -> None:
    pytest.importorskip("transformers")
    case, teacher = models_hf.exported("bert")
    if form == "transformer":
        student = sg.optimize(teacher, preset="transformer", verify=False)
    else:
        student = sg.quantize(teacher, mode="dynamic", verify=False, progress=False)
    rows = case.feeds(48, 8, 2)
    _assert_round_trip(student, rows, teacher=teacher, kd=("response",))
    trained, report = sg.finetune_with_report(student, rows, teacher=teacher,
                                              kd=("response",), epochs=1, batch_size=16,
                                              progress=False)
    assert np.isfinite(report.history.records[1].loss) and _moved(student, trained)
    assert_lowers_exactly(trained, case.feeds(3, 7, 1))
