"""Head pruning on the attention users export (issue 20): the Hugging Face and torch zoo of
`tests.models_hf`, as exported (plain) and after `--preset transformer` (fused).

Half the heads of every block go (whole key/value groups under grouped-query attention), the
outputs keep their shapes and onnxruntime runs the result at a batch and a sequence other than
the export's with a padded row. Heads whose Q/K/V columns and output rows are zeroed beforehand
are the ones removed, exactly (rtol 1e-4, atol 1e-5 of the output scale). The default suite runs
BERT, GPT-2 (symbolic head-split sizes), Llama (grouped-query attention, rotary embeddings),
DeBERTa-v2 (relative-position terms computed from the split heads), ViT and torch's encoder
layer; the sweep over every architecture is slow-marked.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.errors import UnsupportedModelError
from slimgraph.passes._kit import constant_array
from slimgraph.passes.pipeline import run_pipeline
from slimgraph.passes.prune import PruneHeadsResult, prune_heads
from tests import models_hf
from tests.kit.asserts import assert_same_outputs, output_list
from tests.kit.heads import assert_half_the_heads_went, zero_heads

FAST = ["bert", "gpt2", "llama", "deberta-v2", "vit", "torch-encoder"]
SIZES = [(3, 11), (1, 21)]  # (batch, sequence) other than the export's (2, 8)
FUSED = ("MultiHeadAttention", "GroupQueryAttention")


def formed(name: str, form: str) -> tuple[models_hf.Case, ir.Model]:
    """The zoo model `name` as exported ("plain") or after the transformer preset ("fused",
    `models_hf.fused`: fused once per session); a fresh copy each call."""
    case, model = models_hf.exported(name)
    return (case, model) if form == "plain" else (case, models_hf.fused(name))


def check_half_the_heads_go(name: str, form: str) -> PruneHeadsResult:
    case, model = formed(name, form)
    result = prune_heads(model, 0.5)
    assert_half_the_heads_went(result, case.blocks)
    pruned = result.model
    if form == "fused":
        fused = [n for n in pruned.graph if n.op_type in FUSED]
        assert sorted(n.attributes["num_heads"].value for n in fused) == sorted(
            b.kept for b in result.blocks)
    for batch, seq in SIZES:
        feed = case.feeds(batch, seq, 1)  # a padded row where the model takes a mask
        want, got = output_list(model, feed), output_list(pruned, feed)
        assert [g.shape for g in got] == [w.shape for w in want]
        assert all(np.isfinite(g).all() for g in got)
    return result


def check_zeroed_heads_go_exactly(name: str, form: str) -> None:
    case, model = formed(name, form)
    dead = zero_heads(model)
    result = prune_heads(dead, 0.5)
    for block in result.blocks:
        gone = block.kv_heads // 2 * (block.heads // block.kv_heads)
        assert block.removed == tuple(range(gone))  # the zeroed ones, scored 0
        assert all(block.scores[h] == 0.0 for h in block.removed)
    for batch, seq in SIZES:
        assert_same_outputs(dead, result.model, case.feeds(batch, seq, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["plain", "fused"])
@pytest.mark.parametrize("name", FAST)
def test_half_the_heads_of_every_block_go(name: str, form: str) -> None:
    check_half_the_heads_go(name, form)


@pytest.mark.parametrize("form", ["plain", "fused"])
@pytest.mark.parametrize("name", FAST)
def test_zeroed_heads_are_removed_exactly(name: str, form: str) -> None:
    check_zeroed_heads_go_exactly(name, form)


@pytest.mark.parametrize("form", ["plain", "fused"])
def test_grouped_query_attention_loses_whole_key_value_groups(form: str) -> None:
    result = prune_heads(formed("llama", form)[1], 0.5)
    assert [(b.heads, b.kept, b.kv_heads, b.kv_kept) for b in result.blocks] == [(4, 2, 2, 1)] * 2
    for block in result.blocks:  # a group: two neighbouring query heads of one key/value head
        assert block.removed in ((0, 1), (2, 3))
    widths = sorted(n.inputs[1].const_value.shape[1] for n in result.model.graph
                    if n.op_type == "MatMul" and n.inputs[1].const_value is not None
                    and n.inputs[1].const_value.shape[0] == 64)
    assert widths.count(16) == 4 and widths.count(32) == 2  # k, v halved; q [64, 32]
    for node in (n for n in result.model.graph if n.op_type == "GroupQueryAttention"):
        assert (node.attributes["num_heads"].value, node.attributes["kv_num_heads"].value) == (
            2, 1)


def test_relative_position_keys_keep_the_kept_heads_rows() -> None:
    # DeBERTa multiplies the split heads by per-head position keys and queries (constants
    # [heads, 2 * buckets, head size], tiled over the batch): they keep the kept heads' rows
    _, model = formed("deberta-v2", "plain")
    result = prune_heads(model, 0.5)
    tiled = [constant_array(n.inputs[0]).shape for n in result.model.graph
             if n.op_type == "Tile" and constant_array(n.inputs[0]) is not None]
    assert tiled == [(2, 32, 8)] * 4  # position keys and queries of both layers


def test_gpt2_symbolic_head_split_is_restated_from_its_own_arithmetic() -> None:
    # GPT-2's Conv1D views are [batch, seq, 3 * 32] computed at run time from the input's shape:
    # the width becomes 48, batch and sequence stay read at run time
    _, model = formed("gpt2", "plain")
    pruned = prune_heads(model, 0.5).model
    splits = [constant_array(n.inputs[1]).tolist() for n in pruned.graph if n.op_type == "Split"]
    assert splits == [[16, 16, 16]] * 2
    assert not any(n.op_type == "Reshape" and (array := constant_array(n.inputs[1])) is not None
                   and 96 in array.tolist() for n in pruned.graph)


def test_a_block_left_alone_is_named_with_its_reason() -> None:
    case, model = models_hf.exported("bert")
    softmax = [n for n in model.graph if n.op_type == "Softmax"][1]
    model.graph.outputs.append(softmax.outputs[0])  # the probabilities become an output
    result = prune_heads(model, 0.5)
    assert [(s.node, s.reason) for s in result.skipped] == [
        ("model.encoder.layer.1.attention.self", "the attention probabilities are a graph output")]
    assert [(b.block, b.kept) for b in result.blocks] == [
        ("model.encoder.layer.0.attention.self", 2)]
    feed = case.feeds(2, 9, 1)
    assert [g.shape for g in output_list(result.model, feed)] == [
        w.shape for w in output_list(model, feed)]


def test_cross_attention_of_a_decoder_layer_loses_heads_exactly() -> None:
    # nn.TransformerDecoderLayer splits its cross-attention's packed weight and bias into the
    # query and key-value parts with a Split, which had to be folded to constants first
    check_half_the_heads_go("torch-decoder", "plain")
    check_zeroed_heads_go_exactly("torch-decoder", "plain")


def test_packed_attention_loses_heads_exactly() -> None:
    # pack-attention folds the projections into Attention(x, W [32, 96], b): its weight columns
    # and qkv widths follow the heads
    case, fused = formed("bert", "fused")
    packed = run_pipeline(fused, ["pack-attention"], verify=False).model
    dead = zero_heads(packed)
    result = prune_heads(dead, 0.5)
    attention = [n for n in result.model.graph if n.op_type == "Attention"]
    assert [n.attributes["num_heads"].value for n in attention] == [2, 2]
    assert [n.inputs[1].const_value.shape for n in attention] == [(32, 48)] * 2
    for batch, seq in SIZES:
        assert_same_outputs(dead, result.model, case.feeds(batch, seq, 2), rtol=1e-4, atol=1e-5)


def test_int8_attention_asks_for_heads_to_be_pruned_first() -> None:
    _, model = models_hf.exported("vit")
    quantized = sg.quantize(model, mode="dynamic", verify=False, progress=False)
    with pytest.raises(UnsupportedModelError, match=r"^prune\(heads=0.5\): no attention block "
                       r"could lose a head \(.*: standard Attention: prune heads "
                       r"before quantizing; "):
        sg.prune(quantized, heads=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["plain", "fused"])
@pytest.mark.parametrize("name", [n for n in models_hf.ALL_MODELS
                                  if n not in models_hf.NO_ATTENTION and n not in FAST])
def test_every_architecture_of_the_zoo_loses_heads_exactly(name: str, form: str) -> None:
    """The issue's sweep: 19 Hugging Face architectures, GPT-J (interleaved rotary embeddings)
    and torch's modules, plain and fused: every block loses half its heads, onnxruntime runs
    the result, zeroed heads go exactly (the `FAST` ones by the tests above)."""
    check_half_the_heads_go(name, form)
    check_zeroed_heads_go_exactly(name, form)
