"""from_torch_causal_lm: a decode step with the KV cache as inputs and outputs, names users expect,
batch / past / new tokens symbolic, the same numbers as transformers on onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimgraph.errors import UnsupportedModelError
from slimgraph.ir import from_torch_causal_lm, layer_name, metadata
from tests import models_lm
from tests.kit.asserts import assert_close, output_list, raises_exactly


@pytest.fixture(scope="module")
def llama():
    return models_lm.exported("llama")


def _dims(value) -> list[object]:
    return [d if isinstance(d, int) else str(d) for d in value.shape]


def test_inputs_outputs_and_dims_are_named_as_onnxruntime_genai_names_them(llama) -> None:
    module, model = llama
    inputs = {v.name: _dims(v) for v in model.graph.inputs}
    outputs = {v.name: _dims(v) for v in model.graph.outputs}
    cache = {f"past_key_values.{i}.{kind}": ["batch", 2, "past_sequence", 16]
             for i in range(2) for kind in ("key", "value")}
    assert inputs == {"input_ids": ["batch", "sequence"],
                      "attention_mask": ["batch", "past_sequence + sequence"],
                      "position_ids": ["batch", "sequence"], **cache}
    present = {f"present.{i}.{kind}": ["batch", 2, "past_sequence + sequence", 16]
               for i in range(2) for kind in ("key", "value")}
    assert outputs == {"logits": ["batch", "sequence", 100], **present}
    assert json.loads(model.metadata_props[metadata.EXAMPLE_DIMS]) == {
        "batch": 2, "sequence": 3, "past_sequence": 5, "past_sequence + sequence": 8}
    # initializers and layers are named as transformers names them (no wrapper prefix)
    parameters = {name for name, _ in module.named_parameters()}
    assert "model.layers.0.self_attn.q_proj.weight" in model.graph.initializers
    assert set(model.graph.initializers) & parameters
    assert not any(name.startswith("lm.") for name in model.graph.initializers)
    layers = {layer_name(n) for n in model.graph}
    assert "model.layers.1.self_attn.k_proj" in layers


@pytest.mark.parametrize(("past", "new"), [(5, 1), (5, 4), (0, 4), (9, 1)])
def test_one_step_equals_transformers_with_a_dynamic_cache(llama, past: int, new: int) -> None:
    """Any past length (none: the prompt) and any number of new tokens, one row left-padded:
    logits of the kept tokens and every present equal transformers' own step."""
    module, model = llama
    feeds = models_lm.step_feeds(model, 2, past, new, seed=past + new)
    got = output_list(model, feeds)
    want = models_lm.torch_step(module, feeds)
    kept = feeds["attention_mask"][:, past:].astype(bool)  # padded tokens' logits are noise
    assert_close(want[0][kept], got[0][kept], name="logits")
    names = [v.name for v in model.graph.inputs][3:]  # past_key_values.{i}.key/value
    for name, expected, actual in zip(names, want[1:], got[1:], strict=True):
        assert actual.shape == (2, 2, past + new, 16)
        np.testing.assert_array_equal(actual[:, :, :past], feeds[name])  # the past, as fed
        # the new tokens' keys/values ([B, KVH, S, H] -> [B, S, KVH, H]) of the kept tokens
        new_want = expected[:, :, past:].transpose(0, 2, 1, 3)[kept]
        new_got = actual[:, :, past:].transpose(0, 2, 1, 3)[kept]
        assert_close(new_want, new_got, name=name)


def test_refuses_what_is_not_a_causal_lm() -> None:
    with raises_exactly(UnsupportedModelError,
                        "from_torch_causal_lm needs a transformers causal LM, got Linear"):
        from_torch_causal_lm(torch.nn.Linear(2, 2))
    module = models_lm.build("llama")
    with raises_exactly(UnsupportedModelError,
                        "from_torch_causal_lm: example sizes must be 2 or more (batch=2, "
                        "sequence=1, past=5): torch fixes a dimension whose example is 0 or 1"):
        from_torch_causal_lm(module, sequence=1)
