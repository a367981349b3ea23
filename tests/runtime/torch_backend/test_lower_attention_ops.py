"""The attention kernels, one node at a time against onnxruntime's CPU kernels (eval mode):
com.microsoft MultiHeadAttention (mask forms, attention_bias, mask_filter_value, scale,
unidirectional, past/present, packed inputs), Attention (packed weights, mask_index forms,
unidirectional, qkv_hidden_sizes, past), QAttention, GroupQueryAttention (prefill, padded rows,
past/present, rotary, local window, packed QKV, softcap), RotaryEmbedding (contrib and opset 23)
and opset-23 Attention. Tolerance: rtol 1e-4, atol 1e-5 of each output's largest magnitude."""

from __future__ import annotations

import numpy as np
import pytest

from tests.runtime.torch_backend.backend_helpers import assert_matches_ort
from tests.runtime.torch_backend.node_models import MS, F, node_model

pytest.importorskip("torch")

RNG = np.random.default_rng(0)
B, S, N, H = 2, 5, 4, 8
D = N * H


def x(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def i32(*values: int) -> np.ndarray:
    return np.array(values, np.int32)


KEEP = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)  # row 1 padded at the end
KEEP_4D = np.broadcast_to(KEEP.astype(bool).reshape(B, 1, 1, S), (B, 1, S, S)).copy()


def _check(op_type, feeds, constants=(), outputs=(F,), *, domain=MS, opset=21, inputs=None,
           **attributes):
    model = node_model(op_type, feeds, constants, outputs, domain=domain, opset=opset,
                       inputs=inputs, **attributes)
    assert_matches_ort(model, feeds)


# --- MultiHeadAttention ------------------------------------------------------------------------

MHA_CASES = {
    "no_mask": ({"q": x(B, S, D), "k": x(B, S, D), "v": x(B, S, D)}, [], {}),
    "bias_and_scale": ({"q": x(B, S, D), "k": x(B, S, D), "v": x(B, S, D)}, [x(3 * D)],
                       {"scale": 0.3}),
    "padding_mask_2d_filter": (
        {"q": x(B, S, D), "k": x(B, S, D), "v": x(B, S, D), "m": KEEP}, [],
        {"mask_filter_value": -3.0}),
    "key_lengths_1d": ({"q": x(B, S, D), "k": x(B, S, D), "v": x(B, S, D), "m": i32(5, 2)},
                       [], {}),
    "mask_3d": ({"q": x(B, S, D), "k": x(B, S, D), "v": x(B, S, D),
                 "m": (RNG.random((B, S, S)) > 0.3).astype(np.int32)}, [], {}),
    "attention_bias_broadcast": ({"q": x(B, S, D), "k": x(B, S, D), "v": x(B, S, D),
                                  "ab": x(1, 1, S, S)}, [], {}),
    "attention_bias_full_and_mask": (
        {"q": x(B, S, D), "k": x(B, S, D), "v": x(B, S, D), "m": KEEP, "ab": x(B, N, S, S)},
        [], {}),
    "cross_attention": ({"q": x(B, 3, D), "k": x(B, 6, D), "v": x(B, 6, 16)}, [], {}),
    "unidirectional": ({"q": x(B, S, D), "k": x(B, S, D), "v": x(B, S, D)}, [],
                       {"unidirectional": 1}),
    "bnsh_key_value": ({"q": x(B, S, D), "k": x(B, N, 6, H), "v": x(B, N, 6, H)}, [], {}),
}
_MHA_INPUTS = {"no_mask": None, "bias_and_scale": ["q", "k", "v", "c0"],
               "padding_mask_2d_filter": ["q", "k", "v", None, "m"],
               "key_lengths_1d": ["q", "k", "v", None, "m"],
               "mask_3d": ["q", "k", "v", None, "m"],
               "attention_bias_broadcast": ["q", "k", "v", None, None, "ab"],
               "attention_bias_full_and_mask": ["q", "k", "v", None, "m", "ab"],
               "cross_attention": None, "unidirectional": None,
               "bnsh_key_value": None}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multi_head_attention(case):
    feeds, constants, attributes = MHA_CASES[case]
    _check("MultiHeadAttention", feeds, constants, inputs=_MHA_INPUTS[case], num_heads=N,
           **attributes)


def test_multi_head_attention_with_past_returns_present():
    feeds = {"q": x(B, 3, D), "k": x(B, 3, D), "v": x(B, 3, D), "pk": x(B, N, 4, H),
             "pv": x(B, N, 4, H), "m": np.ones((B, 7), np.int32)}
    feeds["m"][1, 5:] = 0
    _check("MultiHeadAttention", feeds, outputs=(F, F, F),
           inputs=["q", "k", "v", None, "m", None, "pk", "pv"], num_heads=N, unidirectional=1)


# --- Attention and QAttention ------------------------------------------------------------------

ATTENTION_CASES = {
    "no_mask": ({"x": x(B, S, 16)}, [x(16, 3 * D), x(3 * D)], None, {}),
    "raw_mask": ({"x": x(B, S, 16), "m": KEEP}, [x(16, 3 * D), x(3 * D)],
                 ["x", "c0", "c1", "m"], {"mask_filter_value": -100.0}),
    "lengths": ({"x": x(B, S, 16), "m": i32(4, 2)}, [x(16, 3 * D), x(3 * D)],
                ["x", "c0", "c1", "m"], {}),
    "end_and_start": ({"x": x(B, S, 16), "m": i32(5, 4, 0, 1)}, [x(16, 3 * D), x(3 * D)],
                      ["x", "c0", "c1", "m"], {}),
    "mask_3d": ({"x": x(B, S, 16), "m": (RNG.random((B, S, S)) > 0.3).astype(np.int32)},
                [x(16, 3 * D), x(3 * D)], ["x", "c0", "c1", "m"], {}),
    "unidirectional_scale": ({"x": x(B, S, 16)}, [x(16, 3 * D), x(3 * D)], None,
                             {"unidirectional": 1, "scale": 0.2}),
    "unequal_sizes": ({"x": x(B, S, 16)}, [x(16, 2 * D + 16), x(2 * D + 16)], None,
                      {"qkv_hidden_sizes": [D, D, 16]}),
    "attention_bias": ({"x": x(B, S, 16), "ab": x(1, N, S, S)}, [x(16, 3 * D), x(3 * D)],
                       ["x", "c0", "c1", None, None, "ab"], {}),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_contrib_attention(case):
    feeds, constants, inputs, attributes = ATTENTION_CASES[case]
    _check("Attention", feeds, constants, inputs=inputs, num_heads=N, **attributes)


def test_contrib_attention_with_past():
    feeds = {"x": x(B, 2, 16), "past": x(2, B, N, 3, H)}
    _check("Attention", feeds, [x(16, 3 * D), x(3 * D)], (F, F),
           inputs=["x", "c0", "c1", None, "past"], num_heads=N, unidirectional=1)


@pytest.mark.parametrize("per_column", [False, True])
def test_quantized_attention(per_column):
    codes = RNG.integers(-127, 128, (16, 3 * D)).astype(np.int8)
    scale = (RNG.random(3 * D).astype(np.float32) * 0.02 + 0.005 if per_column
             else np.float32(0.01))
    w_zero = np.zeros(3 * D, np.int8) if per_column else np.int8(0)
    feeds = {"x": RNG.integers(0, 256, (B, S, 16)).astype(np.uint8),
             "m": np.array([5, 3], np.int32)}
    _check("QAttention", feeds,
           [codes, x(3 * D), np.float32(0.05), scale, np.uint8(128), w_zero],
           inputs=["x", "c0", "c1", "c2", "c3", "m", "c4", "c5"], num_heads=N)


# --- GroupQueryAttention -----------------------------------------------------------------------

KV, GH = 2, 32  # onnxruntime's CPU kernel takes head sizes that are multiples of 16


def _caches(length: int, half: int) -> tuple[np.ndarray, np.ndarray]:
    angles = np.outer(np.arange(length), 1.0 / 10000 ** (np.arange(half) / half))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _gqa_feeds(batch: int, seq: int, past: int, lengths: list[int]) -> dict[str, np.ndarray]:
    feeds = {"q": x(batch, seq, N * GH), "k": x(batch, seq, KV * GH),
             "v": x(batch, seq, KV * GH)}
    if past:
        feeds["pk"], feeds["pv"] = x(batch, KV, past, GH), x(batch, KV, past, GH)
    feeds["seqlens"] = np.array([n - 1 for n in lengths], np.int32)
    feeds["total"] = np.array(max(lengths), np.int32)
    return feeds


def _gqa(feeds, outputs=(F,), rotary=None, packed=False, **attributes):
    names = ["q", None if packed else "k", None if packed else "v",
             "pk" if "pk" in feeds else None, "pv" if "pv" in feeds else None,
             "seqlens", "total"]
    constants = []
    if rotary is not None:
        cos, sin = _caches(32, rotary // 2)
        constants = [cos, sin]
        names += ["c0", "c1"]
        attributes["do_rotary"] = 1
    if "bias" in feeds:
        names += [None] * (9 - len(names)) + [None, "bias"]
    _check("GroupQueryAttention", feeds, constants, outputs, inputs=names, num_heads=N,
           kv_num_heads=KV, **attributes)


def test_group_query_attention_prefill():
    _gqa(_gqa_feeds(B, S, 0, [S, S]))


def test_group_query_attention_prefill_with_a_right_padded_row():
    _gqa(_gqa_feeds(B, S, 0, [S, 3]), outputs=(F, F, F), rotary=GH)


def test_group_query_attention_prefill_rotary_interleaved_and_window():
    _gqa(_gqa_feeds(B, S, 0, [S, S]), rotary=GH, rotary_interleaved=1, local_window_size=2)


def test_group_query_attention_partial_rotary_softcap_scale():
    _gqa(_gqa_feeds(B, S, 0, [S, S]), rotary=GH // 2, softcap=2.0, scale=0.4)


def test_group_query_attention_attention_bias():
    feeds = _gqa_feeds(B, S, 0, [S, 4])
    feeds["bias"] = x(1, N, S, S)
    _gqa(feeds)


def test_group_query_attention_not_causal_with_a_bias_and_a_padded_row():
    """causal=0 (what fuse-attention writes for an encoder-style block: the mask is the bias)."""
    feeds = _gqa_feeds(B, S, 0, [S, 4])
    feeds["bias"] = x(B, 1, S, S)
    _gqa(feeds, outputs=(F, F, F), causal=0)


def test_group_query_attention_packed_qkv():
    feeds = _gqa_feeds(B, S, 0, [S, S])
    feeds["q"] = x(B, S, (N + 2 * KV) * GH)
    del feeds["k"], feeds["v"]
    _gqa(feeds, rotary=GH, packed=True)


def test_group_query_attention_decode_with_past_rows_of_other_lengths():
    feeds = _gqa_feeds(B, 1, 6, [7, 5])  # row 1 has 4 past tokens in a buffer of 6
    _gqa(feeds, outputs=(F, F, F), rotary=GH)


def test_group_query_attention_chunk_with_past():
    _gqa(_gqa_feeds(1, 3, 4, [7]), outputs=(F, F, F), rotary=GH)


# --- rotary embeddings -------------------------------------------------------------------------


@pytest.mark.parametrize("interleaved", [0, 1])
def test_contrib_rotary_3d_partial_with_position_ids(interleaved):
    cos, sin = _caches(16, 2)  # rotary_embedding_dim 4 of head size 8
    positions = RNG.integers(0, 16, (B, S)).astype(np.int64)
    _check("RotaryEmbedding", {"x": x(B, S, D), "p": positions}, [cos, sin],
           inputs=["x", "p", "c0", "c1"], interleaved=interleaved, num_heads=N,
           rotary_embedding_dim=4)


def test_contrib_rotary_3d_heads_of_the_cache_width():
    cos, sin = _caches(16, H // 2)  # no num_heads: heads of 2 * cos width channels
    _check("RotaryEmbedding", {"x": x(B, S, D), "p": RNG.integers(0, 16, (B, S))}, [cos, sin],
           inputs=["x", "p", "c0", "c1"])


def test_contrib_rotary_4d_with_a_start_position():
    cos, sin = _caches(16, H // 2)
    _check("RotaryEmbedding", {"x": x(B, N, S, H)}, [np.array([3], np.int64), cos, sin])


@pytest.mark.parametrize("interleaved", [0, 1])
def test_rotary_opset23_4d_with_position_ids(interleaved):
    cos, sin = _caches(16, H // 2)
    positions = RNG.integers(0, 16, (B, S)).astype(np.int64)
    _check("RotaryEmbedding", {"x": x(B, N, S, H), "p": positions}, [cos, sin],
           inputs=["x", "c0", "c1", "p"], domain="", opset=23, interleaved=interleaved)


def test_rotary_opset23_3d_without_position_ids_partial():
    cos, sin = x(B, S, 2), x(B, S, 2)
    _check("RotaryEmbedding", {"x": x(B, S, D)}, [cos, sin], domain="", opset=23,
           num_heads=N, rotary_embedding_dim=4)


# --- opset-23 Attention ------------------------------------------------------------------------

ATTENTION23_CASES = {
    "plain_4d": ({"q": x(B, N, S, H), "k": x(B, N, 6, H), "v": x(B, N, 6, H)}, {}),
    "grouped_3d": ({"q": x(B, S, D), "k": x(B, S, KV * H), "v": x(B, S, KV * H)},
                   {"q_num_heads": N, "kv_num_heads": KV}),
    "causal_scale_softcap": ({"q": x(B, N, S, H), "k": x(B, N, S, H), "v": x(B, N, S, H)},
                             {"is_causal": 1, "scale": 0.5, "softcap": 3.0}),
    "bool_mask": ({"q": x(B, N, S, H), "k": x(B, N, S, H), "v": x(B, N, S, H),
                   "m": KEEP_4D}, {}),
    "float_mask": ({"q": x(B, N, S, H), "k": x(B, N, S, H), "v": x(B, N, S, H),
                    "m": x(S, S)}, {}),
}


@pytest.mark.parametrize("case", list(ATTENTION23_CASES))
def test_attention_opset23(case):
    feeds, attributes = ATTENTION23_CASES[case]
    _check("Attention", feeds, domain="", opset=23, **attributes)


def test_attention_opset23_causal_with_past():
    feeds = {"q": x(B, N, 2, H), "k": x(B, KV, 2, H), "v": x(B, KV, 2, H),
             "pk": x(B, KV, 3, H), "pv": x(B, KV, 3, H)}
    _check("Attention", feeds, outputs=(F, F, F), inputs=["q", "k", "v", None, "pk", "pv"],
           domain="", opset=23, is_causal=1)
