"""Decode-step graphs of Hugging Face causal language models: past keys/values in, present out.

A causal LM generates one token at a time and keeps the keys and values of every token it has
seen (the KV cache), so each step computes attention for the new tokens only. The graph that
runs one step takes the new token ids, the attention mask over past and new tokens, the new
tokens' positions and every layer's past keys and values, and returns the logits and every
layer's present keys and values (past and new, concatenated):

```
 input_ids            int64 [batch, sequence]
 attention_mask       int64 [batch, past_sequence + sequence]   1 = token, 0 = padding
 position_ids         int64 [batch, sequence]
 past_key_values.{i}.key / .value   float [batch, kv_heads, past_sequence, head_size]
   -> logits          float [batch, sequence, vocab]
 present.{i}.key / .value           float [batch, kv_heads, past_sequence + sequence, head_size]
```

These are the names onnxruntime-genai and Hugging Face optimum use. The same graph runs the
prompt (past of length 0) and every later step. transformers keeps the cache in a `DynamicCache`
object, which torch.export cannot take as an input: the exported module takes the past tensors
and builds the `DynamicCache` inside its forward (`_DecodeStep`), and returns the cache's
tensors after the step.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import onnx_ir as ir

from slimgraph._optional import require_torch
from slimgraph.errors import UnsupportedModelError
from slimgraph.ir._torch import _export, _record_example_dims
from slimgraph.ir.metadata import LAYER

__all__ = ["from_torch_causal_lm", "past_name", "present_name"]

logger = logging.getLogger(__name__)

# Symbolic dimension names of the exported graph. The mask's length is named by the expression
# it equals, so inputs generated for the graph (`runtime.feeds`) can size it from the others.
BATCH, SEQUENCE, PAST = "batch", "sequence", "past_sequence"
TOTAL = f"{PAST} + {SEQUENCE}"
_PREFIX = "lm."  # the wrapped model's attribute: stripped from initializer and layer names


def past_name(layer: int, kind: str) -> str:
    """The graph input holding layer `layer`'s past keys (`kind` "key") or values ("value")."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """The graph output holding layer `layer`'s present keys or values."""
    return f"present.{layer}.{kind}"


def from_torch_causal_lm(
    model: Any,
    *,
    batch: int = 2,
    sequence: int = 3,
    past: int = 5,
    opset_version: int | None = None,
) -> ir.Model:
    """Export one decode step of a Hugging Face causal LM, with its KV cache as inputs/outputs.

    The graph takes `input_ids`, `attention_mask` (over past and new tokens), `position_ids`
    and `past_key_values.{i}.key`/`.value` for every layer ([batch, kv_heads, past_sequence,
    head_size]) and returns `logits` and `present.{i}.key`/`.value` (past and new keys and
    values, [batch, kv_heads, past_sequence + sequence, head_size]); batch, past length and new
    token count are symbolic, so one graph runs the prompt (past of length 0) and every
    generated token. `slimgraph generate` and `slimgraph.generate` run it; the `transformer`
    preset fuses its attention into GroupQueryAttention / MultiHeadAttention with past and
    present buffers.

    The example sizes only shape the trace (each must be 2 or more, or torch specializes the
    dimension); they are recorded as the sizes verification runs the graph at.

    Args:
        model: a transformers causal LM (`LlamaForCausalLM`, `Qwen2ForCausalLM`,
            `GPT2LMHeadModel`, ...) whose forward takes `input_ids`, `attention_mask`,
            `position_ids` and a cache; put in eval mode here.
        batch, sequence, past: example batch size, new tokens and past length.
        opset_version: passed to the exporter.

    Returns:
        The decode-step graph as an `onnx_ir.Model`; initializer and layer names are the
        model's own (`model.layers.0.self_attn.q_proj.weight`).

    Raises:
        MissingExtraError: torch is not installed.
        UnsupportedModelError: `model` is not a transformers causal LM with a key/value cache,
            an example size is below 2, or torch cannot export it (the cause quoted).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM  # doctest: +SKIP
        >>> lm = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
        ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        ...     vocab_size=100))  # doctest: +SKIP
        >>> step = from_torch_causal_lm(lm)  # doctest: +SKIP
        >>> [v.name for v in step.graph.inputs][:4]  # doctest: +SKIP
        ['input_ids', 'attention_mask', 'position_ids', 'past_key_values.0.key']
    """
    require_torch()
    import torch

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise UnsupportedModelError(
            f"from_torch_causal_lm needs a transformers causal LM, got {type(model).__name__}"
        )
    if min(batch, sequence, past) < 2:
        raise UnsupportedModelError(
            f"from_torch_causal_lm: example sizes must be 2 or more (batch={batch}, "
            f"sequence={sequence}, past={past}): torch fixes a dimension whose example is 0 or 1"
        )
    model.eval()
    cache_arg = _cache_argument(model)
    config: Any = model.config
    vocab = int(getattr(config.get_text_config(), "vocab_size", 2) or 2)
    ids = torch.randint(0, vocab, (batch, past + sequence),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prefix = model(input_ids=ids[:, :past], use_cache=True)
    cache = getattr(prefix, cache_arg, None)
    layers = _cache_tensors(cache)
    if not layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} returned no key/value cache with use_cache=True; "
            "from_torch_causal_lm needs a causal LM with a KV cache"
        )
    past_tensors = tuple(t.detach().clone() for pair in layers for t in pair)
    mask = torch.ones(batch, past + sequence, dtype=torch.int64)
    positions = torch.arange(past, past + sequence).expand(batch, sequence).contiguous()
    step = _DecodeStep(model, len(layers), cache_arg)
    dims = {"batch": torch.export.Dim(BATCH), "sequence": torch.export.Dim(SEQUENCE),
            "past": torch.export.Dim(PAST), "total": torch.export.Dim("total")}
    dynamic = (
        {0: dims["batch"], 1: dims["sequence"]},
        {0: dims["batch"], 1: dims["total"]},
        {0: dims["batch"], 1: dims["sequence"]},
        tuple({0: dims["batch"], 2: dims["past"]} for _ in past_tensors),
    )
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for layer in range(len(layers)):
        inputs += [past_name(layer, "key"), past_name(layer, "value")]
        outputs += [present_name(layer, "key"), present_name(layer, "value")]
    args = (ids[:, past:], mask, positions, past_tensors)
    exported = _export(step, args, dynamic, inputs, outputs, opset_version)
    _name_total(exported)
    _strip_prefix(exported)
    flat = (ids[:, past:], mask, positions, *past_tensors)
    _record_example_dims(exported, flat)
    return exported


def _cache_argument(model: Any) -> str:
    """The forward argument (and output attribute) naming the cache: `cache` in transformers
    5.x, `past_key_values` before."""
    try:
        parameters: Mapping[str, Any] = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise UnsupportedModelError(
        f"{type(model).__name__}.forward takes no cache (`cache` or `past_key_values`): "
        "from_torch_causal_lm needs a causal LM with a KV cache"
    )


def _cache_tensors(cache: Any) -> list[tuple[Any, Any]]:
    """[(keys, values)] per layer of a transformers cache object (or legacy tuples)."""
    if cache is None:
        return []
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(pair[0], pair[1]) for pair in cache]


def _decode_step_class() -> type:
    import torch
    from transformers import DynamicCache

    class DecodeStep(torch.nn.Module):
        """One decode step: past tensors in, a `DynamicCache` built inside, present out."""

        def __init__(self, lm: Any, layers: int, cache_arg: str) -> None:
            super().__init__()
            self.lm = lm
            self.layers = layers
            self.cache_arg = cache_arg

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any,
                    past: tuple[Any, ...]) -> tuple[Any, ...]:
            cache = DynamicCache(
                ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=True,
                          **{self.cache_arg: cache})
            present = [t for pair in _cache_tensors(getattr(out, self.cache_arg)) for t in pair]
            return (out.logits, *present)

    return DecodeStep


def _DecodeStep(lm: Any, layers: int, cache_arg: str) -> Any:  # noqa: N802 - a class factory
    return _decode_step_class()(lm, layers, cache_arg)


def _name_total(model: ir.Model) -> None:
    """Name the mask's length after what it equals (`past_sequence + sequence`) everywhere."""
    mask = next((v for v in model.graph.inputs if v.name == "attention_mask"), None)
    if mask is None or mask.shape is None or len(mask.shape) != 2:
        return
    symbol = mask.shape[1]
    if isinstance(symbol, int) or not symbol.value:
        return
    old = str(symbol.value)
    values = list(model.graph.inputs) + [o for n in model.graph.all_nodes() for o in n.outputs]
    for value in values:
        if value.shape is not None and any(str(d) == old for d in value.shape):
            value.shape = ir.Shape([TOTAL if str(d) == old and not isinstance(d, int) else d
                                    for d in value.shape])


def _strip_prefix(model: ir.Model) -> None:
    """Initializer and layer names as the transformers model names them (no wrapper prefix)."""
    taken = set(model.graph.initializers)
    for name, value in list(model.graph.initializers.items()):
        if name.startswith(_PREFIX) and name[len(_PREFIX):] not in taken:
            value.name = name[len(_PREFIX):]
    for node in model.graph.all_nodes():
        layer = node.metadata_props.get(LAYER)
        if layer is not None and layer.startswith(_PREFIX):
            node.metadata_props[LAYER] = layer[len(_PREFIX):]
        elif layer == _PREFIX[:-1]:
            node.metadata_props[LAYER] = ""
