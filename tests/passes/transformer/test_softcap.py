"""Attention with soft-capped scores (Gemma 2's `attn_logit_softcapping`: `c * tanh(s / c)`
between the scaled scores and the mask): the matcher reads the cap off the dataflow in either
spelling (Div by c, or Mul by 1/c), fuse-attention writes GroupQueryAttention's `softcap`
exactly (rtol 1e-4, atol 1e-5 of the output scale, verifier off), a block it cannot fuse is
named with the reason, and head pruning goes through the cap (elementwise per head) on the
plain and the fused decode step."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.errors import UnsupportedModelError
from slimgraph.ir import copy_model
from slimgraph.passes.prune import prune_heads
from slimgraph.passes.transformer import FuseAttentionPass
from slimgraph.passes.transformer._symbolic import scalar
from tests import models_lm
from tests.kit.asserts import assert_close, output_list
from tests.kit.heads import zero_heads

CAP = 2.0  # models_lm's gemma2


@pytest.fixture(scope="module")
def feeds() -> dict[str, np.ndarray]:
    _, step = models_lm.exported("gemma2")
    return models_lm.step_feeds(step, batch=2, past=5, new=3)  # a padded row in the past


def _step(spelling: str = "div") -> ir.Model:
    """The decode step after `cleanup` (as every preset runs first: it types the Softmax output
    the export leaves untyped before a Cast); "mul" rewrites each `Div(scores, c)` before a
    Tanh as `Mul(scores, 1 / c)`."""
    _, step = models_lm.exported("gemma2")
    if spelling == "mul":
        divs = [n for n in step.graph if n.op_type == "Div" and any(
            u.node.op_type == "Tanh" for u in n.outputs[0].uses())]
        assert len(divs) == 3  # two layers' scores and the final logits
        for div in divs:
            cap = scalar(div.inputs[1])
            assert cap is not None
            inverse = ir.node("Constant", [], attributes={
                "value": ir.tensor(np.array(1.0 / cap, np.float32))})
            mul = ir.node("Mul", [div.inputs[0], inverse.outputs[0]], name=f"{div.name}_mul")
            step.graph.insert_before(div, [inverse, mul])
            div.outputs[0].replace_all_uses_with(mul.outputs[0])
            step.graph.remove(div, safe=True)
    return sg.optimize(step, recipe=["cleanup"], verify=False)


@pytest.mark.parametrize("spelling", ["div", "mul"])
def test_soft_capped_attention_fuses_exactly(spelling: str,
                                             feeds: dict[str, np.ndarray]) -> None:
    step = _step(spelling)
    want = output_list(step, feeds)
    result = FuseAttentionPass()(step)  # no verification: compared below
    assert result.fused["attention"] == 2 and result.summary == (
        "fuse-attention: 2 of 2 attention blocks fused")
    fused = [n for n in step.graph if n.op_type == "GroupQueryAttention"]
    assert len(fused) == 2  # the one Tanh left caps the final logits
    assert len([n for n in step.graph if n.op_type == "Tanh"]) == 1
    assert {n.attributes["softcap"].as_float() for n in fused} == {CAP}
    got = output_list(step, feeds)
    for expected, actual in zip(want, got, strict=True):
        assert_close(expected, actual, rtol=1e-4, atol=1e-5)
    for node in fused:  # the cap matters at this size: without it the logits differ
        del node.attributes["softcap"]
    assert not np.allclose(output_list(step, feeds)[0], want[0], rtol=1e-2, atol=1e-2)


def test_a_soft_cap_the_fused_ops_cannot_take_is_named() -> None:
    with pytest.raises(UnsupportedModelError) as error:
        FuseAttentionPass(gqa="repeat")(_step())
    assert str(error.value) == (
        "fuse-attention: none of the 2 attention blocks can be fused; model.layers.0.self_attn: "
        "a soft cap (tanh) on the scores over a key/value cache (only GroupQueryAttention takes "
        "one, and gqa='repeat' was asked)")


@pytest.mark.parametrize("form", ["plain", "fused"])
def test_zeroed_heads_leave_a_soft_capped_step_exactly(form: str,
                                                       feeds: dict[str, np.ndarray]) -> None:
    step = _step()
    if form == "fused":
        FuseAttentionPass()(step)
    dead = zero_heads(step, 0.5)  # the first of the two key/value groups
    result = prune_heads(copy_model(dead), 0.5)
    assert not result.skipped and [(b.heads, b.kept, b.kv_kept) for b in result.blocks] == [
        (4, 2, 1)] * 2
    assert all(b.removed == (0, 1) for b in result.blocks)  # the zeroed ones, scored 0
    kept = {k: v[:, 1:] if k.startswith("past_key_values.") else v for k, v in feeds.items()}
    want, got = output_list(dead, feeds), output_list(result.model, kept)
    for value, expected, actual in zip(result.model.graph.outputs, want, got, strict=True):
        if value.name.startswith("present."):
            expected = expected[:, 1:]
        assert_close(expected, actual, rtol=1e-4, atol=1e-5, name=value.name)


def test_a_soft_capped_self_attention_without_grouping_fuses_exactly() -> None:
    """A whole sequence (no cache), one key/value head per query head: GroupQueryAttention with
    `kv_num_heads = num_heads`, since it is the one fused op with a soft cap; row 1 padded."""
    import torch
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    config = Gemma2Config(**{**models_lm.DECODER, "num_key_value_heads": 4}, head_dim=16,
                          attn_logit_softcapping=CAP, use_cache=False)
    ids = torch.randint(0, models_lm.VOCAB, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    model = sg.from_torch(Gemma2Model(config).eval(), (ids, mask),
                          dynamic_shapes=({0: "batch", 1: "seq"},) * 2)
    model = sg.optimize(model, recipe=["cleanup"], verify=False)
    feeds = dict(zip([v.name for v in model.graph.inputs], [ids.numpy(), mask.numpy()],
                     strict=True))
    want = output_list(model, feeds)
    FuseAttentionPass()(model)
    fused = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert [(n.attributes["kv_num_heads"].as_int(), n.attributes["softcap"].as_float())
            for n in fused] == [(4, CAP)] * 2
    assert_close(want[0], output_list(model, feeds)[0], rtol=1e-4, atol=1e-5)
