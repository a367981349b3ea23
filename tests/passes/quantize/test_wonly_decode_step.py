"""Weight-only quantization of a decode step (`slimgraph.from_torch_causal_lm`: past keys and
values in, present out): `bits="auto"` times its MatMuls on inputs that fit the step (a mask
over past and new tokens, positions that follow it)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

import slimgraph as sg
from slimgraph.errors import UnsupportedModelError
from slimgraph.runtime.calibrate import stream_values
from tests import models_lm
from tests.kit.asserts import cosine, output_list


@pytest.fixture(scope="module")
def step() -> ir.Model:
    return models_lm.exported("llama")[1]


def test_bits_auto_times_a_decode_step(step: ir.Model) -> None:
    # the step's mask is past + new long: timing inputs with every symbol at `seq` failed
    auto = sg.quantize(step, mode="weight-only", bits="auto", block_size=32, auto_seq=1)
    ops = Counter(n.op_type for n in auto.graph)
    assert ops["MatMulNBits"] + ops["MatMulInteger"] + ops["MatMul"] >= 14
    feeds = models_lm.step_feeds(step, batch=2, past=5, new=1)
    assert cosine(output_list(auto, feeds)[0], output_list(step, feeds)[0]) > 0.95  # int4


def test_a_failed_run_names_the_inputs_it_ran_on(step: ir.Model) -> None:
    feeds = models_lm.step_feeds(step, batch=1, past=2, new=1)
    feeds["attention_mask"] = np.ones((1, 1), np.int64)  # not past + new long
    with pytest.raises(UnsupportedModelError,
                       match="^onnxruntime cannot run the model on generated inputs: "):
        next(stream_values(step, ["logits"], [feeds], data="generated inputs", progress=False))
