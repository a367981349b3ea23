"""Perplexity and next-token agreement: detection of causal LMs, padding, numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slimgraph.errors import BadDataError, BadOptionError
from slimgraph.runtime import create_session, run
from slimgraph.runtime.perplexity import LMAccumulator, LMSpec, lm_spec, perplexity
from tests.kit.graphs import matmul_model
from tests.kit.lm import toy_lm


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return np.log(np.exp(shifted).sum(-1)) - np.take_along_axis(shifted, targets[..., None],
                                                                -1)[..., 0]


def test_detects_token_ids_in_and_logits_out() -> None:
    assert lm_spec(toy_lm()) == LMSpec("input_ids", "logits", None)
    assert lm_spec(matmul_model(np.ones((4, 3)), ["batch", 4])) is None


def test_padded_positions_are_left_out_and_sums_match_numpy() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 7, (3, 6))
    mask = np.ones((3, 6), np.int64)
    mask[1, 4:] = 0  # row 1: two padded positions at the end
    ref, cand = rng.standard_normal((3, 6, 7)), rng.standard_normal((3, 6, 7))
    acc = LMAccumulator(LMSpec("input_ids", "logits", "attention_mask"))
    acc.add({"input_ids": ids, "attention_mask": mask}, {"logits": ref}, {"logits": cand})
    scores = acc.result()
    keep = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    assert scores.tokens == int(keep.sum()) == 13
    expected = _nll(ref[:, :-1], ids[:, 1:])[keep].mean()
    assert math.isclose(scores.reference_nll, expected, rel_tol=1e-12)
    assert math.isclose(scores.candidate_perplexity,
                        math.exp(_nll(cand[:, :-1], ids[:, 1:])[keep].mean()), rel_tol=1e-12)
    agree = (ref[:, :-1].argmax(-1) == cand[:, :-1].argmax(-1))[keep].mean()
    assert math.isclose(scores.agreement, agree)
    hits = (ref[:, :-1].argmax(-1) == ids[:, 1:])[keep].mean()
    assert math.isclose(scores.reference_accuracy, hits)


def test_perplexity_of_one_model_and_bad_inputs() -> None:
    model = toy_lm()
    ids = np.random.default_rng(1).integers(0, 32, (5, 9)).astype(np.int64)
    logits = run(create_session(model), {"input_ids": ids})["logits"].astype(np.float64)
    expected = math.exp(_nll(logits[:, :-1], ids[:, 1:]).mean())
    assert math.isclose(perplexity(model, {"input_ids": ids}, batch_size=2), expected,
                        rel_tol=1e-9)
    with pytest.raises(BadDataError, match=r"token ids must be in \[0, 32\)"):
        LMAccumulator(LMSpec("input_ids", "logits")).add(
            {"input_ids": ids + 40}, {"logits": logits}, {"logits": logits})
    with pytest.raises(BadOptionError, match="the model is not a causal LM"):
        perplexity(matmul_model(np.ones((4, 3)), ["batch", 4]), {"x": np.ones((2, 4),
                                                                                np.float32)})
