"""Decode-step graphs: their roles found by dataflow, and generated inputs that fit them (the mask
as long as past and new tokens, positions that follow the mask, padding inside the past)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from slimgraph.ir import copy_model, metadata
from slimgraph.passes.transformer import FuseAttentionPass
from slimgraph.runtime import random_feeds
from slimgraph.runtime._decoder import (
    decoder_io,
    decoder_mask,
    expression_size,
    mask_positions,
)
from slimgraph.runtime.feeds import driving_feeds
from tests import models_lm
from tests.kit.graphs import single_op_model

PAST = tuple(f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value"))
PRESENT = tuple(f"present.{i}.{kind}" for i in range(2) for kind in ("key", "value"))


@pytest.fixture(scope="module")
def llama():
    return models_lm.exported("llama")[1]


def test_roles_of_a_decode_step_before_and_after_fusion(llama) -> None:
    io = decoder_io(llama)
    assert io is not None
    assert (io.ids, io.mask, io.positions, io.logits) == (
        "input_ids", "attention_mask", "position_ids", "logits")
    assert (io.past, io.present) == (PAST, PRESENT)
    assert (io.past_dim, io.seq_dim, io.total_dim) == (
        "past_sequence", "sequence", "past_sequence + sequence")
    fused = copy_model(llama)
    FuseAttentionPass()(fused)  # the past now goes into GroupQueryAttention, not a Concat
    assert decoder_io(fused) == io
    assert decoder_io(ir.from_proto(single_op_model("MatMul", [2, 4], [4, 3]))) is None


def test_generated_inputs_fit_a_decode_step_without_recorded_sizes(llama) -> None:
    """The issue's failure: random inputs of one size for every symbol gave a mask shorter than
    past + new (`GatherND ... invalid index`); the mask's length is now past + new."""
    del llama.metadata_props[metadata.EXAMPLE_DIMS]
    feeds = random_feeds(llama, batch=2, dims={"past_sequence": 4, "sequence": 3})
    assert feeds["input_ids"].shape == (2, 3) and feeds["position_ids"].shape == (2, 3)
    assert feeds["past_key_values.1.value"].shape == (2, 2, 4, 16)
    np.testing.assert_array_equal(feeds["attention_mask"],
                                  [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(feeds["position_ids"], [[4, 5, 6], [2, 3, 4]])
    inputs, outputs = driving_feeds(llama)  # batch 2, every other symbol 8: mask of 16
    assert inputs["attention_mask"].shape == (2, 16)
    assert outputs["present.0.key"].shape == (2, 2, 16, 16)
    assert np.isfinite(outputs["logits"]).all()


def test_sizes_named_by_expressions() -> None:
    sizes = {"past_sequence": 5, "sequence": 3, "samples": 400}
    assert expression_size("past_sequence + sequence", sizes.get) == 8
    assert expression_size("((samples//10)) - 1", sizes.get) == 39
    assert expression_size("2*sequence + 1", sizes.get) == 7
    assert expression_size("sequence", sizes.get) is None  # a plain symbol
    assert expression_size("past_sequence + unknown", sizes.get) is None
    assert expression_size("not an expression", sizes.get) is None


def test_masks_and_positions_as_generation_pads_a_batch() -> None:
    np.testing.assert_array_equal(decoder_mask(3, 3, 1, np.dtype(np.int64)),
                                  [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(decoder_mask(2, 0, 4, np.dtype(np.int64)),  # a prompt:
                                  [[1, 1, 1, 1], [1, 1, 1, 0]])  # right-padded, no empty row
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(mask_positions(mask, 2), [[3, 4], [1, 2]])
    np.testing.assert_array_equal(mask_positions(mask, 5), [[0, 1, 2, 3, 4], [1, 1, 0, 1, 2]])
