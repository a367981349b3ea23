"""standard-attention: encoder MultiHeadAttention as the standard opset-23 Attention, exact on
onnxruntime at batch and sequence lengths other than the export's with padded rows; what
dynamic int8 writes for encoders (the projections int8 MatMuls beside it), whose output is the
QAttention path's."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.passes.opset import ConvertOpsetPass
from slimgraph.passes.pipeline import run_pipeline
from slimgraph.passes.quantize.dynamic import DynamicQuantizePass
from slimgraph.passes.transformer import (
    PackAttentionPass,
    StandardAttentionPass,
    TanhGeluPass,
)
from tests.kit.asserts import assert_same_outputs, output_list
from tests.kit.data import transformer_feeds
from tests.kit.exports import export_transformer


def ops(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)


@pytest.fixture(scope="module")
def bert_fused() -> tuple[ir.Model, ir.Model]:
    model = export_transformer("bert")
    return model, run_pipeline(model, ["transformer"], verify=False).model


def test_standard_attention_is_exact_with_padded_rows(bert_fused) -> None:
    model, fused = bert_fused
    upgraded = ConvertOpsetPass(opset=23)(fused).model
    before = ops(upgraded)
    result = StandardAttentionPass()(ir.from_proto(ir.to_proto(upgraded)))
    standard = result.model
    assert result.modified and result.fused == {"standard_attention": 2}
    counts = ops(standard)
    assert counts["Attention"] == 2 and counts["MultiHeadAttention"] == 0
    # one boolean [B, 1, S, T] mask built once for both layers
    assert counts["Greater"] - before["Greater"] == 1
    assert counts["Expand"] - before["Expand"] == 1
    nodes = [n for n in standard.graph if n.op_type == "Attention"]
    assert all(n.domain == "" and n.attributes["q_num_heads"].value == 4 for n in nodes)
    assert nodes[0].inputs[3] is nodes[1].inputs[3]
    assert nodes[0].inputs[3].dtype == ir.DataType.BOOL
    for batch, seq in [(3, 11), (1, 37)]:  # the export used (2, 16)
        feed = transformer_feeds("bert", batch, seq)
        feed["attention_mask"][-1, seq // 2:] = 0  # a padded row
        assert_same_outputs(fused, standard, feed)
        assert_same_outputs(model, standard, feed)
    # also exact as a verified pipeline step (onnxruntime compares it with the verifier on)
    verified = run_pipeline(upgraded, ["standard-attention"], verify=True)
    assert ops(verified.model)["Attention"] == 2


def test_standard_attention_skips_with_reasons(bert_fused) -> None:
    _, fused = bert_fused
    result = StandardAttentionPass()(fused)  # opset 20 as exported: nothing changes
    assert not result.modified
    assert {s.reason for s in result.skipped} == {"the model's opset is below 23"}
    gpt = run_pipeline(export_transformer("gpt"), ["transformer"], verify=False).model
    result = StandardAttentionPass()(ConvertOpsetPass(opset=23)(gpt).model)
    assert not result.modified  # causal attention_bias: left to MultiHeadAttention
    assert {s.reason for s in result.skipped} == {
        "input bias, attention_bias or past key/values"}


def test_dynamic_int8_writes_standard_attention_as_the_qattention_path(bert_fused) -> None:
    model, fused = bert_fused
    quantized = sg.quantize(fused, mode="dynamic", verify=False, progress=False)
    counts = ops(quantized)
    assert counts["Attention"] == 2 and counts["QAttention"] == 0
    assert counts["MatMulInteger"] == 12 and counts["DynamicQuantizeLinear"] == 8
    assert dict(quantized.opset_imports)[""] == 23
    # the same int8 weights and activations as QAttention's path: the same output (the
    # attention arithmetic is onnxruntime's in both)
    copy = TanhGeluPass()(ir.from_proto(ir.to_proto(fused))).model  # as sg.quantize does
    qattention = DynamicQuantizePass()(PackAttentionPass(with_bias=False)(copy).model).model
    assert ops(qattention)["QAttention"] == 2
    feed = transformer_feeds("bert", 4, 19)
    feed["attention_mask"][1, 7:] = 0
    got, want = output_list(quantized, feed)[0], output_list(qattention, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert output_list(model, feed)[0].shape == got.shape
