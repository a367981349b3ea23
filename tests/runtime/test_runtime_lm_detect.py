"""Which models `compare --data` scores as causal LMs: by dataflow, an output is logits only
when its last dimension is the vocabulary of the embedding table the token ids index. Encoders
that take `input_ids` and return hidden states [batch, seq, hidden] are not LMs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn

import slimgraph as sg
from slimgraph.runtime.perplexity import LMSpec, lm_spec
from tests import models_hf

VOCAB = models_hf.VOCAB  # 100, above every hidden size of the zoo (32, 64)


class _BertWithTypes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        self.model = BertModel(BertConfig(**models_hf.TEXT), add_pooling_layer=False).eval()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor
                ) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask, token_type_ids=types)[0]


@pytest.fixture(scope="module")
def bert() -> ir.Model:
    torch.manual_seed(0)
    dims = {0: "batch", 1: "seq"}
    ids = torch.randint(0, VOCAB, (2, 8))
    return sg.from_torch(_BertWithTypes().eval(), (ids, torch.ones_like(ids), torch.zeros_like(
        ids)), dynamic_shapes=(dims, dims, dims),
        input_names=["input_ids", "attention_mask", "token_type_ids"])


@pytest.fixture(scope="module")
def causal_lm() -> ir.Model:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    module = models_hf.wrap(LlamaForCausalLM(LlamaConfig(**models_hf.DECODER)),
                            ("input_ids", "attention_mask"), use_cache=False)
    ids = torch.randint(0, VOCAB, (2, 8))
    dims = {0: "batch", 1: "seq"}
    return sg.from_torch(module, (ids, torch.ones_like(ids)), dynamic_shapes=(dims, dims),
                         input_names=["input_ids", "attention_mask"])


def _tokens(batch: int = 3, seq: int = 8) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, VOCAB, (batch, seq)).astype(np.int64)
    assert ids.max() >= 64  # above the hidden size: an encoder taken for an LM was refused
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_an_encoders_hidden_states_are_not_logits(bert: ir.Model) -> None:
    assert lm_spec(bert) is None
    data = {**_tokens(), "token_type_ids": np.zeros((3, 8), np.int64)}
    result = sg.compare(bert, bert, data)  # was: "token ids must be in [0, 32) ..."
    assert result.language_model is None and result.worst_cosine > 0.9999


def test_a_decoder_without_its_head_is_not_an_lm() -> None:
    _, llama = models_hf.exported("llama")  # LlamaModel: hidden states [batch, seq, 64]
    assert lm_spec(llama) is None


def test_a_causal_lm_is_scored_on_tokens(causal_lm: ir.Model) -> None:
    assert lm_spec(causal_lm) == LMSpec("input_ids", causal_lm.graph.outputs[0].name,
                                        "attention_mask")
    scores = sg.compare(causal_lm, causal_lm, _tokens()).language_model
    assert scores is not None and scores.tokens == 3 * 7 and scores.agreement == 1.0
    assert scores.reference_perplexity == scores.candidate_perplexity > 1


def _renamed(model: ir.Model, names: dict[str, str]) -> ir.Model:
    copy = ir.from_proto(ir.to_proto(model))
    for value in copy.graph.inputs:
        value.name = names.get(value.name, value.name)
    return copy


def test_a_causal_lm_s_tokens_and_mask_are_found_by_dataflow_not_by_name(
        causal_lm: ir.Model) -> None:
    """`ids` and `mask`, not `input_ids` and `attention_mask`: the ids index the table whose
    vocabulary the logits score; the mask is the other integer input (named like one)."""
    model = _renamed(causal_lm, {"input_ids": "ids", "attention_mask": "mask"})
    logits = model.graph.outputs[0].name
    assert lm_spec(model) == LMSpec("ids", logits, "mask")
    unnamed = _renamed(causal_lm, {"input_ids": "a", "attention_mask": "b"})
    assert lm_spec(unnamed) == LMSpec("a", logits, "b")  # the only other integer input
    tokens = _tokens()
    data = {"a": tokens["input_ids"], "b": tokens["attention_mask"]}
    data["b"][0, -2:] = 0  # padding is left out of the scores: the mask is read
    scores = sg.compare(unnamed, unnamed, data, language_model=True).language_model
    assert scores is not None and scores.tokens == 3 * 7 - 2


def test_two_inputs_that_could_be_the_token_ids_are_refused_with_the_reason() -> None:
    from onnx import TensorProto, helper

    from slimgraph.errors import BadOptionError
    from tests.kit.lm import toy_lm

    proto = ir.to_proto(toy_lm())
    graph = proto.graph
    graph.input[0].name = "a"
    graph.node[0].input[1] = "a"
    graph.input.append(helper.make_tensor_value_info("b", TensorProto.INT64, ["batch", "seq"]))
    graph.node.insert(1, helper.make_node("Gather", ["embed", "b"], ["h0b"]))
    graph.node.insert(2, helper.make_node("Add", ["h0", "h0b"], ["h0s"]))
    graph.node[3].input[0] = "h0s"
    model = ir.from_proto(proto)
    ids = np.zeros((2, 4), np.int64)
    with pytest.raises(BadOptionError, match="^perplexity needs two causal language models .*; "
                       "the reference model: the inputs 'a', 'b' all index a table of the "
                       "logits' vocabulary: which are the token ids is ambiguous "
                       r"\(name it input_ids\)$"):
        sg.compare(model, model, {"a": ids, "b": ids}, language_model=True)
