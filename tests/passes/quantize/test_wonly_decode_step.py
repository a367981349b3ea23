"""Weight-only quantization of a decode step (`slimgraph.from_torch_causal_lm`: past keys and
values in, present out): `bits="auto"` times its MatMuls on inputs that fit the step (a mask
over past and new tokens, positions that follow it)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

import slimgraph as sg
from slimgraph.errors import UnsupportedModelError
from slimgraph.runtime._decoder import token_feeds
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


def _tokens(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, models_lm.VOCAB, (rows, 12)).astype(np.int64)}


def test_gptq_calibrates_a_decode_step_on_a_token_file(step: ir.Model, tmp_path: Path) -> None:
    # token ids only: the step is fed an empty past, a mask of ones, positions 0..seq-1
    calib, data = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, **_tokens(32, 1))
    np.savez(data, **_tokens(8, 2))
    gptq = sg.quantize(step, mode="weight-only", method="gptq", calibration=str(calib),
                       block_size=32)
    rtn = sg.quantize(step, mode="weight-only", block_size=32)
    errors = {}
    for name, model in (("gptq", gptq), ("rtn", rtn)):
        result = sg.compare(step, model, str(data))
        scores = result.language_model
        assert scores is not None and scores.tokens == 8 * 11
        errors[name] = next(o.sqnr_db for o in result.outputs if o.name == "logits")
    assert errors["gptq"] > errors["rtn"] + 1.0, errors  # dB
    assert "perplexity (88 next tokens): reference" in str(sg.compare(step, gptq, str(data)))


def test_token_feeds_run_the_step_as_the_prompt() -> None:
    module, step = models_lm.exported("llama")
    ids = _tokens(3, 3)["input_ids"]
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # a padded row
    feeds = token_feeds(step, {"input_ids": ids, "attention_mask": mask})
    assert feeds is not None and feeds["past_key_values.0.key"].shape == (3, 2, 0, 16)
    logits = output_list(step, feeds)[0]
    with torch.no_grad():
        expected = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(
            mask), position_ids=torch.from_numpy(feeds["position_ids"])).logits.numpy()
    keep = mask.astype(bool)
    np.testing.assert_allclose(logits[keep], expected[keep], rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())
    assert token_feeds(step, {**feeds}) is None  # whole inputs are fed as given
