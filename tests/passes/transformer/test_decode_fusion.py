"""fuse-attention on decode steps (KV cache in, present out): every block into GroupQueryAttention
(grouped or rotary keys, causal mask proven) or MultiHeadAttention with past/present, exact on a
one-token and a four-token step at batch 2 and past 5 with a padded row; names kept; masks that
are not causal refused for GroupQueryAttention with the reason."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.ir import copy_model
from slimgraph.passes.transformer import FuseAttentionPass, find_attention
from slimgraph.passes.transformer._causal import linear
from slimgraph.passes.transformer._symbolic import Dim, sum_dim
from tests import models_lm
from tests.kit.asserts import assert_same_outputs, output_list

MS = "com.microsoft"
# (model, fused op, its attributes that must hold)
CASES = {
    "llama": ("GroupQueryAttention", {"kv_num_heads": 2, "do_rotary": 1, "causal": 1}),
    "gpt2": ("MultiHeadAttention", {}),
    "qwen2": ("GroupQueryAttention", {"kv_num_heads": 2, "do_rotary": 1, "causal": 1}),
    "llama-head8": ("GroupQueryAttention", {"kv_num_heads": 2, "do_rotary": 0, "causal": 1}),
    "phi": ("GroupQueryAttention", {"kv_num_heads": 4, "do_rotary": 0, "causal": 1}),
}
SLOW = {"qwen2", "llama-head8", "phi"}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _fused(name: str) -> tuple[ir.Model, ir.Model, object]:
    _, model = models_lm.exported(name)
    fused = copy_model(model)
    result = FuseAttentionPass()(fused)  # no verification: the test compares itself
    return model, fused, result


def _ops(model: ir.Model) -> Counter[str]:
    return Counter(n.op_type for n in model.graph)


@pytest.mark.parametrize("name", _params(CASES))
def test_every_block_of_a_decode_step_is_fused_exactly(name: str) -> None:
    model, fused, result = _fused(name)
    op, attributes = CASES[name]
    assert result.summary == "fuse-attention: 2 of 2 attention blocks fused"
    assert result.fused["cache"] == 2
    nodes = [n for n in fused.graph if n.op_type == op and n.domain == MS]
    assert len(nodes) == 2 and _ops(fused)["Softmax"] == 0
    for node in nodes:
        for key, value in attributes.items():
            assert node.attributes.get_int(key) == value, (key, node)
        # the past comes in and the present goes out through the fused op, named as before
        layer = int(node.outputs[1].name.split(".")[1])
        past = [v.name for v in node.inputs if v is not None and v.name.startswith("past_")]
        assert past == [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        assert [v.name for v in node.outputs[1:]] == [f"present.{layer}.key",
                                                      f"present.{layer}.value"]
    assert not [n for n in fused.graph if n.op_type == "Concat" and any(
        o.is_graph_output() for o in n.outputs)]
    assert [v.name for v in fused.graph.inputs] == [v.name for v in model.graph.inputs]
    assert [v.name for v in fused.graph.outputs] == [v.name for v in model.graph.outputs]
    for past, new in ((5, 1), (5, 4), (0, 3)):
        feeds = models_lm.step_feeds(model, 2, past, new, pad=past > 0, seed=new)
        assert_same_outputs(model, fused, feeds)


@pytest.mark.parametrize("name", _params(["llama", "gpt2", "qwen2"]))
def test_transformer_preset_fuses_every_block_of_a_decode_step_exactly(name: str) -> None:
    """The preset (verified on generated decode inputs) leaves no Softmax: both layers become
    the fused op with past and present, exact on a one- and a four-token step at batch 2 after
    five cached positions, one row padded."""
    _, model = models_lm.exported(name)
    optimized = sg.optimize(model, preset="transformer")
    op = CASES[name][0]
    fused = [n for n in optimized.graph if n.op_type == op and n.domain == MS]
    assert len(fused) == 2 and _ops(optimized)["Softmax"] == 0
    past = {v.name for n in fused for v in n.inputs if v is not None and v.is_graph_input()}
    assert past == {v.name for v in model.graph.inputs if v.name.startswith("past_key_values.")}
    assert [v.name for v in optimized.graph.inputs] == [v.name for v in model.graph.inputs]
    assert [v.name for v in optimized.graph.outputs] == [v.name for v in model.graph.outputs]
    for new in (1, 4):
        assert_same_outputs(model, optimized, models_lm.step_feeds(model, 2, 5, new, seed=new))


def test_causal_mask_spelled_otherwise_is_proven_and_a_non_causal_one_is_refused() -> None:
    _, model = models_lm.exported("llama")
    models_lm.edit_causal_comparison(model, swap=False)
    fused = copy_model(model)
    assert FuseAttentionPass()(fused).fused["cache"] == 2
    assert_same_outputs(model, fused, models_lm.step_feeds(model, 2, 5, 4))
    _, model = models_lm.exported("llama")
    models_lm.edit_causal_comparison(model, swap=True)
    result = FuseAttentionPass(require=False)(copy_model(model))
    assert result.summary == (
        "fuse-attention: 0 of 2 attention blocks fused; model.layers.0.self_attn: grouped-query "
        "attention over a key/value cache needs GroupQueryAttention, and the mask is not "
        "evidently causal (that op masks causally) (and 1 more)")


def _one_query_row(model: ir.Model, last: bool) -> None:
    """Rebuild the mask from one query position broadcast over the queries: the first
    (`arange(1)`: every query sees the past only, fewer keys than causal) or, with `last`, the
    last (`arange(S - 1, S)`: every query sees all new tokens, more keys than causal)."""
    queries = [n for n in model.graph if n.op_type == "Range"
               and n.outputs[0].shape is not None and str(n.outputs[0].shape[0]) == "sequence"]
    assert len(queries) == 1  # arange(S), shifted by the past length into the query positions
    node = queries[0]
    one = ir.Value(name="one_query", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]),
                   const_value=ir.tensor(np.array(1, np.int64)))
    model.graph.register_initializer(one)
    if last:
        start = ir.node("Sub", [node.inputs[1], one], name="last_query")
        model.graph.insert_before(node, start)
        node.replace_input_with(0, start.outputs[0])
    else:
        node.replace_input_with(1, one)
    node.outputs[0].shape = ir.Shape([1])
    todo = [node.outputs[0]]  # the recorded [S] shapes below no longer hold
    while todo:
        for user, _ in todo.pop().uses():
            for out in user.outputs:
                if out.shape is not None and not out.is_graph_output():
                    out.shape = None
                    todo.append(out)


def test_a_mask_stricter_than_causal_is_fused_with_the_mask_as_bias() -> None:
    """GroupQueryAttention masks causally and adds the model's whole mask as its bias, so a
    mask that keeps fewer keys than the causal one is exact: proven on one query position
    broadcast over four queries, whose logits differ from the causal model's. One that keeps
    more is refused."""
    _, causal = models_lm.exported("llama")
    _, model = models_lm.exported("llama")
    _one_query_row(model, last=False)
    fused = copy_model(model)
    assert FuseAttentionPass()(fused).fused["cache"] == 2
    assert _ops(fused)["GroupQueryAttention"] == 2
    for past, new in ((5, 1), (5, 4), (0, 3)):
        feeds = models_lm.step_feeds(model, 2, past, new, pad=past > 0, seed=new)
        assert_same_outputs(model, fused, feeds)
    feeds = models_lm.step_feeds(model, 2, 5, 4, seed=4)
    differ = np.abs(output_list(causal, feeds)[0] - output_list(model, feeds)[0])
    assert differ[:, 1:].max() > 1.0 and differ[:, 0].max() < 1e-4  # query 0 is unchanged
    _, model = models_lm.exported("llama")
    _one_query_row(model, last=True)
    result = FuseAttentionPass(require=False)(copy_model(model))
    assert not result.modified
    assert result.skipped[0].reason.endswith("the mask is not evidently causal "
                                             "(that op masks causally)")


def test_gqa_repeat_mode_refuses_a_grouped_cache() -> None:
    _, model = models_lm.exported("llama")
    result = FuseAttentionPass(gqa="repeat", require=False)(model)
    assert not result.modified
    assert result.skipped[0].reason == ("grouped-query attention over a key/value cache needs "
                                        "GroupQueryAttention, and gqa='repeat' was asked")


def test_sums_of_symbols_stay_opaque_and_read_as_linear_forms() -> None:
    total = sum_dim(Dim(1, ("past_sequence",)), Dim(1, ("sequence",)))
    assert total == Dim(1, ("past_sequence + sequence",))  # the exporter's own name
    assert total != Dim(1, ("sequence",)) and sum_dim(total, Dim(2)).syms == (
        "2 + past_sequence + sequence",)
    assert linear(total) == {"past_sequence": 1, "sequence": 1}
    assert linear(Dim(3)) == {"": 3} and linear(Dim(2, ("batch",))) == {"batch": 2}


def test_the_matcher_follows_the_cache_to_the_new_tokens() -> None:
    """k and v of a cached block are traced through `Concat(past, new)` to the new tokens'
    projection; the operands say which graph input is the past and which output the present."""
    _, model = models_lm.exported("gpt2")
    matches, failed = find_attention(model.graph)
    assert len(matches) == 2 and not failed
    for layer, match in enumerate(matches):
        for operand, kind in ((match.k, "key"), (match.v, "value")):
            assert operand.cache is not None and operand.source.producer() is not None
            assert operand.cache.past.name == f"past_key_values.{layer}.{kind}"
            assert operand.cache.present.name == f"present.{layer}.{kind}"
