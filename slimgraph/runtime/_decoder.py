"""The inputs and outputs of a decode-step graph (a causal LM with a key/value cache).

A decode step takes new token ids [B, S], an attention mask over past and new tokens [B, P + S],
the new tokens' positions [B, S] and every layer's past keys and values [B, KVH, P, H], and
returns logits and the present keys and values [B, KVH, P + S, H] (`slimgraph.ir.
from_torch_causal_lm` writes such graphs; onnxruntime-genai and optimum use the same names).
`decoder_io` finds these roles by dataflow and names, so generated sample inputs can be
consistent (`runtime.feeds`: the mask as long as past and new together, positions that follow
the mask) and `runtime.generate` can run the step in a loop (present fed back as past).
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["DecoderIO", "decoder_io", "expression_size", "decoder_mask", "mask_positions",
           "token_feeds", "empty_past_fitter"]

_MAX_CHAIN = 8
# where fused attention ops read the past keys and values
_PAST_SLOTS = {("com.microsoft", "GroupQueryAttention"): (3, 4),
               ("com.microsoft", "MultiHeadAttention"): (6, 7),
               ("com.microsoft", "Attention"): (4,)}


@dataclasses.dataclass(frozen=True)
class DecoderIO:
    """The roles of a decode-step graph's inputs and outputs, by name.

    Attributes:
        ids: the token ids input [B, S] (None when the graph takes embeddings).
        mask: the attention mask [B, P + S] (1 = token, 0 = padding), if any.
        positions: the position ids [B, S], if any.
        past: the past key/value inputs [B, KVH, P, H], in graph order.
        present: the output that becomes each past input at the next step (same order).
        logits: the output holding the next-token scores [B, S, vocab].
        past_dim, seq_dim, total_dim: the symbolic names of P, S and the mask's length (None
            when fixed or unnamed).
    """

    ids: str | None
    mask: str | None
    positions: str | None
    past: tuple[str, ...]
    present: tuple[str, ...]
    logits: str | None
    past_dim: str | None
    seq_dim: str | None
    total_dim: str | None


def _symbol(value: ir.Value, axis: int) -> str | None:
    if value.shape is None or len(value.shape) <= axis:
        return None
    dim = value.shape[axis]
    return None if isinstance(dim, int) else (dim.value or None)


def _is_past(value: ir.Value) -> bool:
    """A rank-4 float input concatenated with new keys/values (`Concat(past, new)`) or read as
    the past of a fused attention op."""
    if value.shape is None or len(value.shape) != 4 or value.dtype is None or (
            not value.dtype.is_floating_point()):
        return False
    pending, seen = [value], 0
    while pending and seen < 4 * _MAX_CHAIN:
        current = pending.pop()
        seen += 1
        for use in current.uses():
            node, index = use.node, use.idx
            if node.domain in ("", "ai.onnx") and node.op_type in ("Identity", "Cast"):
                pending.extend(node.outputs)
            elif node.domain in ("", "ai.onnx") and node.op_type == "Concat" and (
                    len(node.inputs) == 2 and index == 0):
                return True
            elif index in _PAST_SLOTS.get((node.domain, node.op_type), ()):
                return True
    return False


def decoder_io(model: ir.Model) -> DecoderIO | None:
    """The decode-step roles of `model`'s inputs and outputs, or None when it has no past
    key/value inputs."""
    inputs = [v for v in model.graph.inputs if v.name and not v.is_initializer()]
    past = [v for v in inputs if _is_past(v)]
    if not past:
        return None
    rank2 = [v for v in inputs if v not in past and v.shape is not None and len(v.shape) == 2
             and v.dtype is not None and not v.dtype.is_floating_point()]
    mask = next((v for v in rank2 if "mask" in (v.name or "").lower()), None)
    positions = next((v for v in rank2 if "position" in (v.name or "").lower()), None)
    ids = next((v for v in rank2 if v.name == "input_ids"), None) or next(
        (v for v in rank2 if v is not mask and v is not positions), None)
    present = _present(model, past)
    outputs = [v for v in model.graph.outputs if v.name and v.name not in present]
    logits = next((v.name for v in outputs if v.name == "logits"), None) or (
        outputs[0].name if outputs else None)
    past_dim = _symbol(past[0], 2)
    seq_dim = _symbol(ids, 1) if ids is not None else None
    total_dim = _symbol(mask, 1) if mask is not None else None
    if total_dim in (seq_dim, past_dim):
        total_dim = None
    return DecoderIO(
        ids.name if ids is not None else None, mask.name if mask is not None else None,
        positions.name if positions is not None else None,
        tuple(v.name for v in past if v.name), present, logits, past_dim, seq_dim, total_dim)


def _present(model: ir.Model, past: list[ir.Value]) -> tuple[str, ...]:
    """The outputs that feed back into `past`: `past_key_values.{i}.key` <-> `present.{i}.key`
    (and the `past.`/`present.` spellings), else the rank-4 outputs in order."""
    outputs = [v for v in model.graph.outputs if v.name]
    names = {v.name for v in outputs}
    found: list[str] = []
    for value in past:
        name = value.name or ""
        candidates = [name.replace("past_key_values", "present", 1),
                      name.replace("past", "present", 1)]
        match = next((c for c in candidates if c in names and c not in found), None)
        if match is None:
            break
        found.append(match)
    if len(found) == len(past):
        return tuple(found)
    rank4 = [v.name for v in outputs if v.shape is not None and len(v.shape) == 4 and v.name]
    return tuple(rank4[: len(past)]) if len(rank4) >= len(past) else ()


def expression_size(name: str, lookup: Callable[[str], int | None]) -> int | None:
    """The size of a dimension named by an expression over other dimensions (`past_sequence +
    sequence`, `((samples//10)) - 1`: + - * // and integers), each looked up by name; None when
    the name is a plain symbol, not such an expression, or a name in it has no size."""
    try:
        tree = ast.parse(name, mode="eval").body
    except SyntaxError:
        return None
    if isinstance(tree, ast.Name):
        return None

    def value(node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return lookup(node.id)
        if not isinstance(node, ast.BinOp):
            return None
        a, b = value(node.left), value(node.right)
        if a is None or b is None:
            return None
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if isinstance(node.op, ast.FloorDiv) and b:
            return a // b
        return None

    return value(tree)


def decoder_mask(batch: int, past: int, new: int, dtype: np.dtype) -> np.ndarray:
    """A keep-mask [batch, past + new] as generation pads a batch: row 0 whole; with a past,
    row b >= 1 left-padded by min(past, 2b) positions (padding inside the past, so every new
    token sees a key); without one, right-padded (the last positions of the prompt padding)."""
    mask = np.ones((batch, past + new), dtype=dtype)
    for row in range(1, batch):
        if past:
            mask[row, : min(past, 2 * row)] = 0
        elif new > 1:
            mask[row, new - min(new - 1, (new * row) // (2 * batch) or 1):] = 0
    return mask


def mask_positions(mask: np.ndarray, new: int) -> np.ndarray:
    """The position ids [batch, new] of the last `new` tokens under `mask`: each token's count
    of earlier kept tokens (transformers' `cumsum(mask) - 1`), 1 at padded positions."""
    counts = np.cumsum(mask.astype(np.int64), axis=-1) - 1
    positions = np.where(mask.astype(bool), counts, 1)
    return positions[:, mask.shape[-1] - new:]


def token_feeds(model: ir.Model, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """A decode step's whole inputs from token data, or None when `model` is no decode step or
    `data` holds more than its token ids (and mask).

    Token files (`input_ids` [rows, seq], optionally `attention_mask` [rows, seq]) score and
    calibrate a decode step as a prompt: an empty past (past length 0: keys and values
    [rows, KVH, 0, H]), the mask as given or all ones, the positions counting its kept tokens
    (`mask_positions`). None also when the arrays or the past's head dimensions do not fit
    (the data's own check then says what is wrong).
    """
    roles = decoder_io(model)
    if roles is None or roles.ids is None or roles.ids not in data or not (
            set(data) <= {roles.ids, roles.mask}):
        return None
    values = {v.name: v for v in model.graph.inputs if v.name and not v.is_initializer()}
    ids = np.asarray(data[roles.ids])
    if ids.ndim != 2:
        return None
    feeds = {roles.ids: ids}
    mask = None
    if roles.mask is not None:
        dtype = values[roles.mask].dtype
        mask = np.asarray(data[roles.mask]) if roles.mask in data else np.ones(
            ids.shape, dtype.numpy() if dtype is not None else np.int64)
        if mask.shape != ids.shape:
            return None
        feeds[roles.mask] = mask
    if roles.positions is not None:
        dtype = values[roles.positions].dtype
        keep = mask if mask is not None else np.ones(ids.shape, np.int64)
        feeds[roles.positions] = mask_positions(keep, ids.shape[1]).astype(
            dtype.numpy() if dtype is not None else np.int64)
    for name in roles.past:
        value = values[name]
        shape = value.shape
        if shape is None or value.dtype is None or not all(
                isinstance(shape[axis], int) for axis in (1, 3)):
            return None
        feeds[name] = np.zeros((ids.shape[0], int(shape[1]), 0, int(shape[3])),  # type: ignore[arg-type]
                               value.dtype.numpy())
    return feeds if set(feeds) == set(values) else None


def empty_past_fitter(model: ir.Model | None) -> Callable[[Mapping[str, Any]], Mapping[str, Any]]:
    """A function giving feeds whose every empty past (past length 0, as `token_feeds` makes for
    a token file) is shaped as `model` declares its past: [rows, KVH, 0, H] of the model's own
    KVH and H. The model is read once, here; the function is called per batch.

    A decode step whose heads were pruned (`prune --heads`) declares fewer key/value heads than
    the step it came from; comparing the two or distilling one from the other feeds both the
    same token data, whose empty past was made for one of them. A past with tokens in it is left
    as it is (it cannot be refitted). numpy arrays and torch tensors alike. For a model that is
    no decode step (or None: a session) the function returns the feeds as given.
    """
    roles = decoder_io(model) if model is not None else None
    declared: dict[str, tuple[int, int]] = {}
    if model is not None and roles is not None:
        for value in model.graph.inputs:
            shape = value.shape
            if value.name in roles.past and shape is not None and len(shape) == 4 and (
                    isinstance(shape[1], int) and isinstance(shape[3], int)):
                declared[value.name] = (shape[1], shape[3])
    if not declared:
        return lambda feeds: feeds

    def fit(feeds: Mapping[str, Any]) -> Mapping[str, Any]:
        fitted = dict(feeds)
        for name, (heads, size) in declared.items():
            value = feeds.get(name)
            if value is None or len(value.shape) != 4 or value.shape[2] != 0 or (
                    tuple(value.shape[1:]) == (heads, 0, size)):
                continue
            shape = (value.shape[0], heads, 0, size)
            fitted[name] = (value.new_zeros(shape) if hasattr(value, "new_zeros")
                            else np.zeros(shape, value.dtype))
        return fitted

    return fit
