"""Head pruning of a decode step (`from_torch_causal_lm`: past keys/values in, present out), as
exported (plain: the cache a `Concat(past, new)` the matcher follows to the new tokens'
projection) and fused (GroupQueryAttention / MultiHeadAttention with past and present): the
key/value heads removed leave the cache too, so the step's past inputs and present outputs
declare the kept heads, every other input and output keeps its shape, and generation runs on the
result. Heads zeroed beforehand are the ones removed, exactly (rtol 1e-4, atol 1e-5 of the
output scale) on the logits and on the kept heads' present keys/values."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.errors import UnsupportedModelError
from slimgraph.ir import copy_model
from slimgraph.passes.prune import prune_heads
from slimgraph.passes.transformer import FuseAttentionPass
from slimgraph.runtime.generate import generate
from tests import models_lm
from tests.kit.asserts import assert_close, output_list
from tests.kit.heads import zero_heads

PROMPTS = [[1, 2, 3, 4], [5, 6]]  # the second row left-padded


def _step(name: str, form: str) -> ir.Model:
    """The decode step of `name` as exported ("plain") or fused by fuse-attention."""
    _, step = models_lm.exported(name)
    if form == "fused":
        FuseAttentionPass()(step)  # no verification: the tests compare themselves
    return step


def _cache(model: ir.Model) -> list[ir.Value]:
    return [v for v in [*model.graph.inputs, *model.graph.outputs]
            if v.name.startswith(("past_key_values.", "present."))]


def _shapes(model: ir.Model) -> dict[str, list[object]]:
    """Every declared input and output shape, the cache's head axis left out."""
    return {v.name: [d for i, d in enumerate(v.shape) if not (
        i == 1 and v.name.startswith(("past_key_values.", "present.")))]
            for v in [*model.graph.inputs, *model.graph.outputs]}


@pytest.mark.parametrize(("name", "form", "kv_after"), [
    ("llama", "plain", 1), ("llama", "fused", 1),  # 4 heads over 2 key/value heads, rotary
    ("gpt2", "plain", 2),  # 4 heads, Conv1D projections, no grouping
])
def test_pruned_kv_heads_leave_the_declared_cache(name: str, form: str, kv_after: int) -> None:
    step = _step(name, form)
    pruned = prune_heads(copy_model(step), 0.5).model
    caches = _cache(pruned)
    assert len(caches) == 8 and {v.shape[1] for v in caches} == {kv_after}
    assert _shapes(pruned) == _shapes(step)  # nothing else of the interface changes
    feeds = models_lm.step_feeds(pruned, batch=2, past=5, new=1)  # past sized as declared
    assert feeds["past_key_values.0.key"].shape == (2, kv_after, 5, 16)
    logits, present = output_list(pruned, feeds)[:2]
    assert logits.shape == (2, 1, models_lm.VOCAB) and present.shape == (2, kv_after, 6, 16)
    assert np.isfinite(logits).all() and np.isfinite(present).all()
    result = generate(pruned, [1, 2, 3], max_new_tokens=4)  # was: "past_key shall have
    assert len(result.tokens[0]) == 4  # kv_num_heads" on the declared 2 heads


@pytest.mark.parametrize(("name", "form"), [
    ("llama", "plain"), ("gpt2", "plain"), ("llama", "fused"), ("gpt2", "fused"),
    *(pytest.param(name, "plain", marks=pytest.mark.slow)  # exported by the fusion tests too
      for name in ("qwen2", "phi", "llama-head8")),
])
def test_zeroed_heads_leave_a_decode_step_exactly(name: str, form: str) -> None:
    dead = zero_heads(_step(name, form), 0.5)  # the first half of the key/value groups
    result = prune_heads(copy_model(dead), 0.5)
    assert not result.skipped and len(result.blocks) == 2
    for block in result.blocks:
        assert block.kv_kept == block.kv_heads // 2
        assert block.removed == tuple(range(block.heads // 2))  # the zeroed ones, scored 0
    pruned = result.model
    feeds = models_lm.step_feeds(dead, batch=2, past=5, new=3)  # a padded row in the past
    kept = {}
    for value in pruned.graph.inputs:  # the pruned step reads the kept heads' past only
        cut = feeds[value.name].shape[1] - value.shape[1] if value.name in feeds and (
            value.name.startswith("past_key_values.")) else 0
        kept[value.name] = feeds[value.name][:, cut:] if cut else feeds[value.name]
    want, got = output_list(dead, feeds), output_list(pruned, kept)
    for value, expected, actual in zip(pruned.graph.outputs, want, got, strict=True):
        if value.name.startswith("present."):
            expected = expected[:, expected.shape[1] - actual.shape[1]:]
        assert_close(expected, actual, rtol=1e-4, atol=1e-5, name=value.name)
    assert generate(pruned, PROMPTS, max_new_tokens=5).tokens == generate(
        dead, PROMPTS, max_new_tokens=5).tokens


@pytest.mark.parametrize(("name", "kv_after"), [("llama", 1), ("gpt2", 2)])
def test_plain_and_fused_steps_lose_the_same_heads_and_generate_alike(name: str,
                                                                      kv_after: int) -> None:
    """Both forms score the heads on the same weights: the same groups go, and the pruned
    steps generate the same tokens (`slimgraph.prune` on the plain step, the public path;
    GPT-2's fused form is MultiHeadAttention with its output guarded against NaN rows)."""
    plain, report = sg.prune_with_report(_step(name, "plain"), heads=0.5)
    fused = prune_heads(_step(name, "fused"), 0.5)
    assert [b.removed for b in report.heads] == [b.removed for b in fused.blocks]
    assert all(b.kv_kept == kv_after for b in fused.blocks)
    want = generate(fused.model, PROMPTS, max_new_tokens=6).tokens
    assert generate(plain, PROMPTS, max_new_tokens=6).tokens == want


def test_a_pruned_step_is_compared_with_and_distilled_from_its_original() -> None:
    # one token file feeds both: the empty past it makes for one model is refitted to the
    # other's key/value heads, and the present caches (of different heads) are left out
    step = _step("llama", "plain")
    dead = zero_heads(step)
    pruned = prune_heads(copy_model(dead), 0.5).model
    rng = np.random.default_rng(0)
    tokens = {"input_ids": rng.integers(0, models_lm.VOCAB, (6, 5)).astype(np.int64)}
    fidelity = sg.compare(dead, pruned, tokens)
    assert [o.name for o in fidelity.outputs] == ["logits"]
    assert fidelity.outputs[0].cosine > 0.99999  # the zeroed heads' removal is exact
    assert fidelity.note == ("4 present key/value outputs left out: the models keep different "
                             "numbers of key/value heads (head pruning)")
    tuned = sg.finetune(pruned, tokens, teacher=dead, epochs=1)  # the teacher's own past
    assert [o.name for o in sg.compare(dead, tuned, tokens).outputs] == ["logits"]


def test_multi_query_attention_says_its_one_key_value_head_must_stay() -> None:
    """GPT-BigCode: 4 query heads share one key/value head; head pruning removes whole key/value
    groups, so nothing can go, and the message says why in those terms."""
    step = _step("bigcode", "plain")
    with pytest.raises(UnsupportedModelError) as error:
        sg.prune(step, heads=0.5)
    assert str(error.value) == (
        "prune(heads=0.5): every attention block has one key/value head shared by all its "
        "query heads (multi-query attention): head pruning removes whole key/value groups, and "
        "the one group must stay")


def test_a_plain_block_the_fused_op_can_lose_heads_of_says_fuse_first() -> None:
    """BLOOM's ALiBi bias is merged with the batch in the plain step (head pruning cannot follow
    it) but is the fused op's [1, N, S, T] attention_bias: the refusal says to fuse first, and
    the fused step loses half its heads."""
    step = _step("bloom", "plain")
    with pytest.raises(UnsupportedModelError) as error:
        sg.prune(step, heads=0.5)
    reason = "a per-head bias merged with another axis"
    assert str(error.value) == (
        f"prune(heads=0.5): no attention block could lose a head (transformer.h.0.self_attention:"
        f" {reason}; transformer.h.1.self_attention: {reason}); fused attention can: fuse first "
        f'(sg.optimize(model, preset="transformer")), then prune heads')
    assert error.value.cli_message.endswith(
        "fuse first (slimgraph optimize MODEL --preset transformer), then prune heads")
    fused = sg.optimize(step, recipe=["cleanup", "fuse-attention"], verify=False)
    assert [(b.heads, b.kept) for b in prune_heads(fused, 0.5).blocks] == [(4, 2)] * 2
