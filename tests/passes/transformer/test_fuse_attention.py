"""fuse-attention / fuse-skip-layernorm / fuse-bias-gelu / pack-attention (issue 16): exact on
dynamo exports of a BERT-style encoder (padding masks) and a GPT-style causal decoder, at batch
and sequence lengths other than the export's, and composable with quantization."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import slimgraph as sg
from slimgraph.passes import fuse_attention
from slimgraph.passes.pipeline import run_pipeline
from tests.kit.asserts import assert_same_outputs, cosine, output_list
from tests.kit.data import transformer_feeds
from tests.kit.exports import export_transformer

SHAPES = [(3, 11), (1, 37), (5, 16)]  # the export used (2, 16)


def ops(model) -> Counter:  # noqa: ANN001
    return Counter(n.op_type for n in model.graph)


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_transformer_preset_fuses_every_layer_exactly(name: str) -> None:
    model = export_transformer(name)
    result = run_pipeline(model, ["transformer"], verify=True)
    fused = result.model
    counts = ops(fused)
    assert counts["MultiHeadAttention"] == 2
    assert counts["SkipLayerNormalization"] == 0  # slower than Add + LayerNorm on ORT's CPU EP
    assert counts["BiasGelu"] == 2
    assert counts["Softmax"] == 0 and counts["Transpose"] == 0
    # residual Adds before LayerNorms written as Sum (onnxruntime would fuse Add + LayerNorm into
    # its slower SkipLayerNormalization): embedding + 2 per layer (bert), 2 per block + final (gpt)
    assert counts["Sum"] == 5
    assert not [n for n in fused.graph if n.op_type == "Add"
                and any(u.node.op_type == "LayerNormalization" for u in n.outputs[0].uses())]
    # the projections stay MatMuls (quantizable): q, k, v (or packed qkv), out, fc1, fc2
    assert counts["MatMul"] == (12 if name == "bert" else 9)
    for batch, seq in SHAPES:
        assert_same_outputs(model, fused, transformer_feeds(name, batch, seq))


def test_padding_mask_is_reduced_to_key_padding_mask() -> None:
    fused = run_pipeline(export_transformer("bert"), ["transformer"], verify=False).model
    mhas = [n for n in fused.graph if n.op_type == "MultiHeadAttention"]
    for mha in mhas:
        assert len(mha.inputs) == 5 and mha.inputs[3] is None  # key_padding_mask, no bias
        assert mha.inputs[4].dtype.name == "INT32"
        assert mha.attributes["num_heads"].value == 4
        assert mha.attributes["scale"].value == pytest.approx(1 / 4)  # 1/sqrt(16)
        assert mha.attributes["mask_filter_value"].value == float(np.finfo(np.float32).min)
    assert mhas[0].inputs[4] is mhas[1].inputs[4]  # one mask for all layers
    counts = ops(fused)
    assert counts["Where"] == 0 and counts["Expand"] == 0


def test_causal_mask_becomes_attention_bias() -> None:
    fused = run_pipeline(export_transformer("gpt"), ["transformer"], verify=False).model
    for mha in (n for n in fused.graph if n.op_type == "MultiHeadAttention"):
        assert len(mha.inputs) == 6 and mha.inputs[4] is None
        assert mha.inputs[5].producer().op_type == "Unsqueeze"


def test_fully_padded_rows_and_single_tokens_stay_exact() -> None:
    model = export_transformer("bert")
    fused = run_pipeline(model, ["transformer"], verify=False).model
    feed = transformer_feeds("bert", 4, 9)
    feed["attention_mask"][1:3, 1:] = 0  # rows with one token
    assert_same_outputs(model, fused, feed)
    assert_same_outputs(model, fused, transformer_feeds("bert", 2, 1))  # sequence length 1


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_skip_layernorm_fusion_is_exact(name: str) -> None:
    model = export_transformer(name)
    result = run_pipeline(model, ["lossless", "fuse-skip-layernorm"], verify=True)
    assert ops(result.model)["SkipLayerNormalization"] == 4
    for batch, seq in SHAPES[:2]:
        assert_same_outputs(model, result.model, transformer_feeds(name, batch, seq))


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_pack_attention_is_exact(name: str) -> None:
    model = export_transformer(name)
    result = run_pipeline(model, ["transformer", "pack-attention"], verify=True)
    counts = ops(result.model)
    assert counts["Attention"] == 2 and counts["MultiHeadAttention"] == 0
    assert counts["Split"] == 0
    for batch, seq in SHAPES[:2]:
        assert_same_outputs(model, result.model, transformer_feeds(name, batch, seq))


def test_unmatched_attention_is_reported_not_fused() -> None:
    model = export_transformer("bert")
    for node in model.graph:  # break the head split: the scores no longer come from one head
        if node.op_type == "Softmax":
            node.attributes["axis"] = __import__("onnx_ir").AttrInt64("axis", 2)
    result = fuse_attention.FuseAttentionPass(require=False)(model)
    assert not result.modified
    assert {s.reason for s in result.skipped} == {"the Softmax does not run over the keys"}
    assert [s.node for s in result.skipped] == ["layers.0", "layers.1"]


def test_dynamic_int8_of_fused_bert_uses_standard_attention_and_keeps_fidelity() -> None:
    model = export_transformer("bert")
    fused = run_pipeline(model, ["transformer"], verify=False).model
    quantized = sg.quantize(fused, mode="dynamic")
    counts = ops(quantized)
    # the standard opset-23 Attention with int8 projections (faster than QAttention on
    # onnxruntime's CPU: transformer/standard.py)
    assert counts["Attention"] == 2 and counts["QAttention"] == 0
    assert counts["MultiHeadAttention"] == 0
    assert counts["Sum"] == 5  # the preset's residual Sums survive quantization
    assert counts["MatMulInteger"] == 12  # q, k, v, out, fc1, fc2 of 2 layers
    assert counts["DynamicQuantizeLinear"] == 8  # q, k and v share one per layer
    plain = sg.quantize(model, mode="dynamic")
    feed = transformer_feeds("bert", 4, 23)
    want = output_list(model, feed)[0]
    fused_cos = cosine(want, output_list(quantized, feed)[0])
    assert fused_cos > 0.999
    assert fused_cos >= cosine(want, output_list(plain, feed)[0]) - 1e-4


def test_static_int8_of_fused_gpt_quantizes_the_projections() -> None:
    model = export_transformer("gpt")
    fused = run_pipeline(model, ["transformer"], verify=False).model
    calib = [transformer_feeds("gpt", 4, 16, seed=s) for s in range(4)]
    quantized = sg.quantize(fused, calibration=calib, progress=False)
    counts = ops(quantized)
    assert counts["MultiHeadAttention"] == 2
    assert counts["DequantizeLinear"] >= 9  # the 9 weights at least
    feed = transformer_feeds("gpt", 2, 12)
    assert cosine(output_list(model, feed)[0], output_list(quantized, feed)[0]) > 0.99


@pytest.mark.slow
def test_fusion_is_exact_on_the_6x384_encoder_with_12_heads() -> None:
    """The benchmark's encoder size (6 layers, 384 wide, 12 heads, FFN 1536)."""
    import torch

    from slimgraph.ir import from_torch
    from tests.models import BertStyleEncoder

    torch.manual_seed(0)
    net = BertStyleEncoder(vocab=1000, dim=384, heads=12, hidden=1536, layers=6, max_len=128)
    dims = {0: "batch", 1: "seq"}
    ids = torch.randint(0, 1000, (2, 64))
    model = from_torch(net.eval(), (ids, torch.ones(2, 64, dtype=torch.int64)),
                       dynamic_shapes=(dims, dims))
    fused = run_pipeline(model, ["transformer"], verify=True).model
    assert ops(fused)["MultiHeadAttention"] == 6
    heads = {n.attributes["num_heads"].value for n in fused.graph
             if n.op_type == "MultiHeadAttention"}
    assert heads == {12}
    for batch, seq in [(3, 37), (1, 128)]:
        feed = transformer_feeds("bert", batch, seq)
        feed["input_ids"] = np.random.default_rng(2).integers(0, 1000, (batch, seq))
        assert_same_outputs(model, fused, feed)


def test_hf_style_float_mask_becomes_an_exact_attention_bias() -> None:
    """`(1 - mask[:, None, None, :]) * -10000` (transformers 4.x) is an arbitrary float bias
    [B, 1, 1, T]: it becomes the fused op's attention_bias, expanded over the queries."""
    import torch
    from torch import nn

    from slimgraph.ir import from_torch

    class HFStyle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            n, s, _ = x.shape

            def split(t: torch.Tensor) -> torch.Tensor:
                return t.view(n, s, 2, 8).transpose(1, 2)

            bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
            scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / 8**0.5 + bias
            return (scores.softmax(-1) @ split(self.v(x))).transpose(1, 2).reshape(n, s, 16)

    torch.manual_seed(0)
    dims = {0: "batch", 1: "seq"}
    model = from_torch(HFStyle().eval(), (torch.randn(2, 5, 16), torch.ones(2, 5)),
                       dynamic_shapes=(dims, dims))
    result = run_pipeline(model, ["transformer"], verify=True)
    assert ops(result.model)["MultiHeadAttention"] == 1
    mha = next(n for n in result.model.graph if n.op_type == "MultiHeadAttention")
    assert len(mha.inputs) == 6 and mha.inputs[5] is not None
    feed = {"x": np.random.default_rng(0).standard_normal((3, 7, 16)).astype(np.float32),
            "mask": np.array([[1] * 7, [1] * 3 + [0] * 4, [1] + [0] * 6], np.float32)}
    assert_same_outputs(model, result.model, feed)
