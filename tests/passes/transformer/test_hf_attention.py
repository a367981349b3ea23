"""fuse-attention on the attention users export (issue 20): Hugging Face models from tiny configs
(sdpa attention; T5 and Swin eager) and torch's own modules, exported by `sg.from_torch` with
batch and sequence symbolic. Every block fused, the fused graph exact on onnxruntime at sizes
other than the export's with padded rows, the right fused ops and mask forms, blocks left
unfused named with their reason, and the dynamic-int8 path applying the rewrites itself."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.errors import UnsupportedModelError
from slimgraph.ir import analysis
from slimgraph.passes.pipeline import run_pipeline
from slimgraph.passes.transformer import FuseAttentionPass, find_attention, match_attention
from tests import models_hf
from tests.kit.asserts import assert_same_outputs, cosine, output_list
from tests.kit.files import save_ir

# The models the fast suite covers (the full sweep is the slow test at the end).
FAST = ["bert", "distilbert", "gpt2", "llama", "vit", "whisper-encoder", "wav2vec2",
        "torch-encoder", "sdpa-mask"]
SIZES = [(3, 11), (1, 21)]  # (batch, sequence) other than the export's (2, 8)


def ops(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def macs_by_node(model: ir.Model, dims: dict[str, int]) -> tuple[int, int]:
    """(total MACs, nodes left uncounted) at `dims`."""
    found, unknown = analysis.macs_by_node(model, dims)
    return sum(found.values()), unknown


def fused_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type in ("MultiHeadAttention", "GroupQueryAttention")]


def attention_record(result):  # noqa: ANN001, ANN201
    return next(r for r in result.records if r.name == "fuse-attention")


def check_exact(name: str, reference: ir.Model, fused: ir.Model) -> None:
    case = models_hf.exported(name)[0]
    for batch, seq in SIZES:
        feed = case.feeds(batch, seq, 1)  # a padded row where the model takes a mask
        assert_same_outputs(reference, fused, feed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FAST)
def test_transformer_preset_fuses_every_block_exactly(name: str) -> None:
    case, model = models_hf.exported(name)
    result = models_hf.transformer_result(name)  # run once per session, shared
    record = attention_record(result)
    blocks = case.blocks
    assert record.details["fused"]["attention"] == blocks
    summary = f"fuse-attention: {blocks} of {blocks} attention blocks fused"
    assert record.details["summary"] == summary
    assert not record.skipped
    assert ops(result.model)["Softmax"] == 0
    assert len(fused_nodes(result.model)) == blocks
    check_exact(name, model, result.model)
    if name in ("bert", "llama"):  # MultiHeadAttention, GroupQueryAttention: an exact fusion
        dims = {"batch": 3, "seq": 11}  # counts the MACs of the MatMuls it replaced
        assert macs_by_node(result.model, dims) == macs_by_node(model, dims)


def test_llama_grouped_query_attention_with_rotary_embeddings() -> None:
    _, model = models_hf.exported("llama")
    fused = FuseAttentionPass()(model).model
    counts = ops(fused)
    assert counts["GroupQueryAttention"] == 2 and counts["MultiHeadAttention"] == 0
    assert counts["RotaryEmbedding"] == 4  # q and k of each layer
    for node in fused_nodes(fused):
        assert node.attributes["num_heads"].value == 4
        assert node.attributes["kv_num_heads"].value == 2
        assert node.attributes["causal"].value == 0  # the causal and padding mask is the bias
    check_exact("llama", models_hf.exported("llama")[1], fused)
    repeated = FuseAttentionPass(gqa="repeat")(models_hf.exported("llama")[1]).model
    assert ops(repeated)["MultiHeadAttention"] == 2 and ops(repeated)["GroupQueryAttention"] == 0
    check_exact("llama", models_hf.exported("llama")[1], repeated)


def test_masks_are_reduced_to_what_the_fused_op_takes() -> None:
    # BERT's [B, 1, S, T] mask (padding and an always-true causal part): key_padding_mask [B, T]
    bert = fused_nodes(FuseAttentionPass()(models_hf.exported("bert")[1]).model)[0]
    assert len(bert.inputs) == 5 and bert.inputs[4] is not None
    assert bert.inputs[4].dtype == ir.DataType.INT32
    # ViT: transformers builds an all-true mask; nothing is left of it
    vit = fused_nodes(FuseAttentionPass()(models_hf.exported("vit")[1]).model)[0]
    assert len(vit.inputs) == 3
    # GPT-2: causal and padding combined: the [B, 1, S, T] attention_bias
    gpt = fused_nodes(FuseAttentionPass()(models_hf.exported("gpt2")[1]).model)[0]
    assert len(gpt.inputs) == 6 and gpt.inputs[4] is None and gpt.inputs[5] is not None


def test_match_records_what_each_head_owns() -> None:
    _, gpt = models_hf.exported("gpt2")
    gpt = run_pipeline(gpt, ["lossless"]).model
    (first, *_), failed = find_attention(gpt.graph)
    assert not failed
    # one packed projection [B, S, 3 * 32]: q, k, v are its thirds, 4 heads of 8 each
    assert first.q.source is first.k.source is first.v.source
    assert [o.offset for o in (first.q, first.k, first.v)] == [0, 32, 64]
    assert list(first.k.columns(2)) == list(range(48, 56))
    assert first.name == "model.h.0.attn"
    _, llama = models_hf.exported("llama")
    llama = run_pipeline(llama, ["lossless"]).model
    softmax = next(n for n in llama.graph if n.op_type == "Softmax")
    match = match_attention(softmax)
    assert (match.heads, match.kv_heads, match.head_size) == (4, 2, 16)
    assert match.k.repeat == 2 and match.q.rotary is not None and match.v.rotary is None
    assert match.q.rotary.dim == 16


def test_an_unfused_block_is_named_with_its_reason() -> None:
    _, model = models_hf.exported("bert")
    softmax = [n for n in model.graph if n.op_type == "Softmax"][1]
    model.graph.outputs.append(softmax.outputs[0])  # the probabilities become an output
    result = run_pipeline(model, ["transformer"])
    record = attention_record(result)
    assert record.details["summary"] == (
        "fuse-attention: 1 of 2 attention blocks fused; model.encoder.layer.1.attention.self: "
        "the attention probabilities are a graph output")
    assert len(fused_nodes(result.model)) == 1
    case = models_hf.exported("bert")[0]
    assert_same_outputs(model, result.model, case.feeds(2, 9, 3))


def _without_fusable_attention() -> ir.Model:
    _, model = models_hf.exported("bert")
    for node in model.graph:
        if node.op_type == "Softmax":
            model.graph.outputs.append(node.outputs[0])
    return model


def test_asking_for_fusion_where_none_can_be_done_is_one_clear_error() -> None:
    message = ("fuse-attention: none of the 2 attention blocks can be fused; "
               "model.encoder.layer.0.attention.self: the attention probabilities are a graph "
               "output")
    with pytest.raises(UnsupportedModelError) as error:
        run_pipeline(_without_fusable_attention(), ["transformer"])
    assert str(error.value) == message
    # where the fusion is a bonus (quantization's transformer path) it is not an error
    result = FuseAttentionPass(require=False)(_without_fusable_attention())
    assert not result.modified and result.blocks == 2


def test_a_model_without_attention_says_none_was_found() -> None:
    _, model = models_hf.exported("resnet")
    result = FuseAttentionPass()(model)
    assert not result.modified
    assert result.summary == "fuse-attention: no attention found"


def test_command_line_prints_the_fusion_summary_without_verbose(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from slimgraph.tools.cli import main

    source = save_ir(models_hf.exported("bert")[1], tmp_path / "bert.onnx")
    before = source.read_bytes()
    assert main(["optimize", str(source), "-o", str(tmp_path / "fused.onnx"),
                 "--preset", "transformer", "--no-verify"]) == 0
    assert "fuse-attention: 2 of 2 attention blocks fused" in capsys.readouterr().out
    broken = save_ir(_without_fusable_attention(), tmp_path / "broken.onnx")
    target = tmp_path / "out.onnx"
    assert main(["optimize", str(broken), "-o", str(target), "--preset", "transformer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("model.encoder.layer.0.attention.self: the attention probabilities "
                            "are a graph output")
    assert not target.exists() and source.read_bytes() == before
    plain = save_ir(models_hf.exported("resnet")[1], tmp_path / "resnet.onnx")
    assert main(["optimize", str(plain), "-o", str(tmp_path / "r.onnx"), "--preset",
                 "transformer", "--no-verify"]) == 0
    assert "fuse-attention: no attention found" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_dynamic_int8_applies_the_transformer_rewrites_itself(name: str) -> None:
    case, model = models_hf.exported(name)
    quantized = sg.quantize(model, mode="dynamic")
    counts = ops(quantized)
    # encoders: the standard opset-23 Attention beside int8 projections (transformer/standard.py)
    assert counts["Attention"] == case.blocks and counts["Softmax"] == 0
    assert counts["QAttention"] == 0 and counts["MultiHeadAttention"] == 0
    # one GELU per layer, fused with its bias and in its tanh form (approximate, tanh-gelu)
    assert counts["FastGelu"] == case.blocks and counts["BiasGelu"] == 0
    plain = sg.quantize(model, mode="dynamic", transformer=False)
    assert ops(plain)["Attention"] == 0 and ops(plain)["Softmax"] == case.blocks
    feed = case.feeds(3, 11, 2)
    want = output_list(model, feed)[0]
    fused_cos = cosine(want, output_list(quantized, feed)[0])
    assert fused_cos > 0.999
    assert fused_cos >= cosine(want, output_list(plain, feed)[0]) - 1e-4


@pytest.mark.slow
def test_every_architecture_of_the_zoo_fuses_exactly() -> None:
    """The issue's sweep: 19 Hugging Face architectures, ConvNeXt and ResNet (no attention),
    torch's modules (the decoder layer's cross-attention too), and GPT-J (interleaved rotary
    embeddings): at least 95% of the attention blocks fused (all are, today), every fused graph
    exact with padded rows at sizes other than the export's."""
    blocks = fused = 0
    for name in models_hf.ALL_MODELS:
        case, model = models_hf.exported(name)
        result = models_hf.transformer_result(name)
        record = attention_record(result)
        blocks += case.blocks
        fused += record.details.get("fused", {}).get("attention", 0)
        assert record.details.get("blocks", 0) == case.blocks, name
        if name not in FAST:  # those are checked by test_transformer_preset_fuses_every_block
            check_exact(name, model, result.model)
        if name == "gptj":
            rotary = [n for n in result.model.graph if n.op_type == "RotaryEmbedding"]
            assert len(rotary) == 4
            assert all(n.attributes["interleaved"].value == 1 for n in rotary)
    assert blocks == 57  # nn.TransformerDecoderLayer: self- and cross-attention
    assert fused / blocks >= 0.95


def test_dynamic_int8_names_a_block_it_could_not_fuse(caplog: pytest.LogCaptureFixture) -> None:
    _, model = models_hf.exported("bert")
    softmax = [n for n in model.graph if n.op_type == "Softmax"][1]
    model.graph.outputs.append(softmax.outputs[0])
    with caplog.at_level("WARNING", logger="slimgraph"):
        quantized = sg.quantize(model, mode="dynamic")
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "quantize: fuse-attention: 1 of 2 attention blocks fused; "
        "model.encoder.layer.1.attention.self: the attention probabilities are a graph output"]
    assert ops(quantized)["Attention"] == 1 and ops(quantized)["Softmax"] == 1
