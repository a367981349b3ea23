"""Hugging Face causal LMs from tiny configs, exported as decode steps (KV cache in, present out).

`build(name)` returns the transformers model (eval mode, seeded random weights, nothing
downloaded); `exported(name)` its decode-step graph (`slimgraph.from_torch_causal_lm`, exported
once per session, a fresh copy per call); `step_feeds(model, batch, past, new)` inputs of one
step: random past keys/values, a mask over past and new tokens with row 1 left-padded by two
(inside the past), positions that count the kept tokens.

Sizes: 2 layers, hidden 64, 4 heads of 16 (2 key/value heads where the architecture groups
them), vocabulary 100; a wide initializer range, so attention is peaked and a wrong mask, head
order or position shows in the logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["LM_MODELS", "VOCAB", "build", "exported", "step_feeds", "torch_step",
           "edit_causal_comparison"]

VOCAB = 100
INIT = 0.3
DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
           "max_position_embeddings": 64, "initializer_range": INIT}


def _llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**DECODER))


def _qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**DECODER))


def _gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                        initializer_range=INIT, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config)


def _llama_head8() -> Any:
    """Llama with head size 8: GroupQueryAttention's CPU kernel rotates only head sizes that
    are multiples of 16, so the rotary embedding stays a RotaryEmbedding op before it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**DECODER, "hidden_size": 32}))


def _phi() -> Any:
    """Phi: one key/value head per query head, a quarter of each head rotated (8 features:
    RotaryEmbedding ops before GroupQueryAttention)."""
    from transformers import PhiConfig, PhiForCausalLM

    return PhiForCausalLM(PhiConfig(**{**DECODER, "num_key_value_heads": 4},
                                    partial_rotary_factor=0.5))


def _gemma2() -> Any:
    """Gemma 2: the scores soft-capped, `c * tanh(scores / c)` before the mask, with a small
    cap (2) so the Tanh bends them (its default, 50, hardly does at this size)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**DECODER, head_dim=16, attn_logit_softcapping=2.0))


def _bigcode() -> Any:
    """GPT-BigCode: multi-query attention, 4 query heads over one key/value head (broadcast)."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    return GPTBigCodeForCausalLM(GPTBigCodeConfig(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, multi_query=True,
        initializer_range=INIT, bos_token_id=None, eos_token_id=None))


def _bloom() -> Any:
    """BLOOM: ALiBi, a per-head bias on the scores (merged with the batch in the export)."""
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB,
                                        initializer_range=INIT, bos_token_id=None,
                                        eos_token_id=None))


LM_MODELS = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2, "llama-head8": _llama_head8,
             "phi": _phi, "gemma2": _gemma2, "bigcode": _bigcode, "bloom": _bloom}


def build(name: str, seed: int = 0) -> Any:
    """The model `name` of `LM_MODELS`, in eval mode, weights seeded by `seed`."""
    torch.manual_seed(seed)
    return LM_MODELS[name]().eval()


_EXPORTS: dict[str, tuple[Any, bytes]] = {}


def exported(name: str) -> tuple[Any, Any]:
    """(`build(name)`, its decode-step export), exported once per session; the model is a fresh
    copy on every call (tests may edit it)."""
    import onnx
    import onnx_ir as ir

    from slimgraph.ir import from_torch_causal_lm

    if name not in _EXPORTS:
        module = build(name)
        _EXPORTS[name] = (module, ir.to_proto(from_torch_causal_lm(module)).SerializeToString())
    module, data = _EXPORTS[name]
    return module, ir.from_proto(onnx.load_model_from_string(data))


def step_feeds(model: Any, batch: int, past: int, new: int, *, pad: bool = True,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of one decode step of the exported `model`: `new` token ids after `past` cached
    positions (random keys/values), row 1 left-padded by two positions when `pad`."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, past + new), np.int64)
    if pad and batch > 1:
        mask[1, : min(2, past + new - 1)] = 0
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)[:, past:]
    feeds = {"input_ids": rng.integers(0, VOCAB, (batch, new)).astype(np.int64),
             "attention_mask": mask, "position_ids": positions}
    for value in model.graph.inputs:
        if value.name.startswith("past_key_values."):
            heads, size = value.shape[1], value.shape[3]
            feeds[value.name] = rng.standard_normal((batch, heads, past, size)).astype(
                np.float32)
    return feeds


def torch_step(module: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The transformers model's logits and present keys/values on `feeds` (graph order)."""
    from transformers import DynamicCache

    layers = sorted({int(k.split(".")[1]) for k in feeds if k.startswith("past_key_values.")})
    cache = DynamicCache(ddp_cache_data=[
        (torch.tensor(feeds[f"past_key_values.{i}.key"]),
         torch.tensor(feeds[f"past_key_values.{i}.value"])) for i in layers])
    with torch.no_grad():
        out = module(input_ids=torch.tensor(feeds["input_ids"]),
                     attention_mask=torch.tensor(feeds["attention_mask"]),
                     position_ids=torch.tensor(feeds["position_ids"]), cache=cache,
                     use_cache=True)
    present = [t.numpy() for layer in out.cache.layers for t in (layer.keys, layer.values)]
    return [out.logits.numpy(), *present]


def edit_causal_comparison(model: Any, swap: bool) -> None:
    """Rewrite the exported mask's `kv_idx <= q_idx` as `q_idx >= kv_idx` (the same mask,
    spelled differently) or, with `swap`, as `q_idx <= kv_idx` (not causal), in place."""
    import onnx_ir as ir

    found = [n for n in model.graph if n.op_type == "LessOrEqual"]
    assert len(found) == 1  # the causal comparison, shared by the layers
    for node in found:
        a, b = node.inputs
        op = "LessOrEqual" if swap else "GreaterOrEqual"
        other = ir.node(op, [b, a], name=f"{node.name}_edited")
        model.graph.insert_after(node, other)
        node.outputs[0].replace_all_uses_with(other.outputs[0])
        model.graph.remove(node, safe=True)
