"""Causal language models: perplexity and next-token agreement on a token file.

A causal LM here is a model with an integer token input [batch, seq] (found by dataflow: the one
that indexes the embedding table whose vocabulary the logits score, whatever its name) and a
float output [batch, seq, vocab] (the logits: position t scores the token at t + 1). On a token
file (`.npz` keyed by the model's input names: the token ids [rows, seq], and the attention mask
too when the model takes one) the next-token loss of row b at position t is

    -log softmax(logits[b, t])[ids[b, t + 1]]        for t < seq - 1, both positions unpadded,

(padding: mask 0), the perplexity is exp(mean loss) over every such position of every
row, and two models agree at a position when their logits' argmax is the same token. The sums are
streamed (float64 log-sum-exp per position), so memory does not grow with the file.

`LMScores` is what `slimgraph compare` prints for two LMs (`runtime.compare` detects them);
`perplexity` scores one model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from slimgraph._tables import format_percent
from slimgraph.errors import BadDataError, BadOptionError
from slimgraph.ir import as_model
from slimgraph.runtime.data import as_data
from slimgraph.runtime.session import create_session, run

__all__ = [
    "LMSpec", "LMScores", "LMAccumulator", "lm_spec", "lm_spec_or_reason", "perplexity",
    "DEFAULT_TOKENS", "vocabulary",
]

DEFAULT_TOKENS = "input_ids"
_INTEGER = {ir.DataType.INT64, ir.DataType.INT32}
_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclass(frozen=True)
class LMSpec:
    """Where a causal LM takes its tokens and gives its logits.

    Attributes:
        tokens: the integer input [batch, seq].
        logits: the float output [batch, seq, vocab].
        mask: the attention-mask input, if the model has one (padding is ignored).
    """

    tokens: str
    logits: str
    mask: str | None = None


def lm_spec(model: ir.Model) -> LMSpec | None:
    """The model's `LMSpec` when it looks like a causal LM, else None (`lm_spec_or_reason`
    says why not)."""
    found = lm_spec_or_reason(model)
    return found if isinstance(found, LMSpec) else None


def lm_spec_or_reason(model: ir.Model) -> LMSpec | str:
    """The model's `LMSpec` when it looks like a causal LM (see the module docstring), else why
    it does not. Found by dataflow, not by name: the token ids are the integer input of rank 2
    that indexes an embedding table [vocab, width] (a Gather of a constant, also dequantized or
    block-quantized, or onnxruntime's EmbedLayerNormalization) whose vocabulary the logits
    score: a float output of rank 3 whose first two dimensions are the input's (same names or
    sizes) and whose last is the table's vocabulary (or, when unknown, comes from a head MatMul
    of that width). An encoder's hidden states [batch, seq, width] are not logits. Several such
    inputs: `input_ids` if it is one, else ambiguous. The mask is the other integer input of
    rank 2 named like one (`mask` in its name), else the only other one the graph uses that
    indexes no table (position ids index a position or rotary table); several: ambiguous."""
    inputs = [v for v in model.graph.inputs if v.name and v.dtype in _INTEGER and
              v.shape is not None and len(v.shape) == 2]
    if not inputs:
        return "no integer input [batch, seq]"
    tables = {v.name: _embedding_table(v) for v in inputs}
    found = [(v, logits) for v in inputs if (table := tables[v.name]) is not None and
             (logits := _logits(model, v, *table)) is not None]
    if not found:
        if not any(tables.values()):
            return "no integer input [batch, seq] indexes an embedding table"
        return "no float output [batch, seq, vocab] scores the embedding table's vocabulary"
    named = [item for item in found if item[0].name == DEFAULT_TOKENS]
    if not named and len(found) > 1:
        names = ", ".join(f"'{v.name}'" for v, _ in found)
        return f"the inputs {names} all index a table of the logits' vocabulary: which are the " \
               f"token ids is ambiguous (name it {DEFAULT_TOKENS})"
    tokens, logits = (named or found)[0]
    others = [v for v in inputs if v is not tokens]
    masks = [v for v in others if "mask" in (v.name or "").lower()]
    if not masks:
        masks = [v for v in others if tables[v.name] is None and v.uses()]
    if len(masks) > 1:
        names = ", ".join(f"'{v.name}'" for v in masks)
        return f"the inputs {names} could each be the attention mask: which is ambiguous " \
               "(name it attention_mask)"
    return LMSpec(tokens.name, logits, masks[0].name if masks else None)  # type: ignore[arg-type]


def _logits(model: ir.Model, tokens: ir.Value, vocab: int, width: int | None) -> str | None:
    """The name of the output that scores `tokens`' vocabulary (`lm_spec_or_reason`)."""
    assert tokens.shape is not None
    for output in model.graph.outputs:
        shape = output.shape
        if output.name and output.dtype in _FLOATS and shape is not None and len(shape) == 3 and (
            _same(shape[0], tokens.shape[0]) and _same(shape[1], tokens.shape[1])
        ) and _is_logits(output, vocab, width):
            return output.name
    return None


_PASS_THROUGH = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}
_MAX_CHAIN = 6


def _is_onnx(node: ir.Node, *ops: str) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in ops


def vocabulary(tokens: ir.Value) -> int | None:
    """The number of rows of the embedding table the token ids `tokens` index (the valid ids
    are 0 .. rows - 1), found by dataflow as `lm_spec_or_reason` finds it (a Gather of a
    constant table, dequantized or block-quantized too); None when no such table is found."""
    table = _embedding_table(tokens)
    return table[0] if table is not None else None


def _embedding_table(tokens: ir.Value) -> tuple[int, int | None] | None:
    """(vocabulary, width) of the embedding table `tokens` index: the rows of the data of a
    Gather (or com.microsoft GatherBlockQuantized / EmbedLayerNormalization) that reads the
    tokens, through casts and reshapes, as its indices."""
    pending, seen = [tokens], 0
    while pending and seen < 4 * _MAX_CHAIN:
        value = pending.pop(0)
        seen += 1
        for use in value.uses():
            node, index = use.node, use.idx
            if _is_onnx(node, *_PASS_THROUGH) and index == 0:
                pending.extend(node.outputs)
                continue
            slot = None
            if _is_onnx(node, "Gather") and index == 1 and node.attributes.get_int("axis", 0) == 0:
                slot = 0
            elif node.domain == "com.microsoft" and (node.op_type, index) in (
                    ("GatherBlockQuantized", 1), ("EmbedLayerNormalization", 0)):
                slot = 0 if node.op_type == "GatherBlockQuantized" else 2
            if slot is None or len(node.inputs) <= slot:
                continue
            shape = _table_shape(node.inputs[slot])
            if shape is not None:
                return shape
    return None


def _table_shape(value: ir.Value | None, depth: int = 0) -> tuple[int, int | None] | None:
    """The static [rows, width] of a table computed from constants (not a graph input)."""
    if value is None or depth > _MAX_CHAIN:
        return None
    node = value.producer()
    if value.const_value is None and node is None:
        return None  # a graph input: not a table of the model's own
    dims = list(value.const_value.shape) if value.const_value is not None else (
        list(value.shape) if value.shape is not None else None)
    if dims is not None and len(dims) == 2 and isinstance(dims[0], int):
        return dims[0], dims[1] if isinstance(dims[1], int) else None
    if node is not None and _is_onnx(node, "DequantizeLinear", "Cast", "Identity"):
        return _table_shape(node.inputs[0], depth + 1)
    return None


def _is_logits(output: ir.Value, vocab: int, width: int | None) -> bool:
    """Whether `output` [batch, seq, ?] scores the `vocab` tokens: its last dimension is the
    vocabulary (and not also the hidden width), else it comes from a head MatMul whose N is."""
    last = output.shape[-1] if output.shape is not None else None
    if isinstance(last, int) and (last != vocab or width != vocab):
        return last == vocab
    return _head_width(output) == vocab


def _head_width(value: ir.Value) -> int | None:
    """The N of the MatMul / Gemm / MatMulNBits that computes `value` (through reshapes, casts,
    a bias Add), if static."""
    for _ in range(_MAX_CHAIN):
        node = value.producer()
        if node is None:
            return None
        if _is_onnx(node, "MatMul", "Gemm") and len(node.inputs) > 1 and (
                weight := node.inputs[1]) is not None and weight.shape is not None:
            transposed = _is_onnx(node, "Gemm") and node.attributes.get_int("transB") == 1
            dim = weight.shape[0 if transposed else -1]
            return dim if isinstance(dim, int) else None
        if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
            return node.attributes.get_int("N", 0) or None
        if not (_is_onnx(node, *_PASS_THROUGH, "Add") and node.inputs and node.inputs[0]):
            return None
        value = node.inputs[0]  # type: ignore[assignment]
    return None


def _same(a: object, b: object) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    name_a, name_b = getattr(a, "value", a), getattr(b, "value", b)
    return isinstance(name_a, str) and name_a == name_b


@dataclass(frozen=True)
class LMScores:
    """Next-token scores of a reference and a candidate LM on the same tokens.

    Attributes:
        tokens: predicted positions counted (padding and each row's last position excluded).
        reference_nll, candidate_nll: mean negative log-likelihood (nats per token).
        agreement: share of positions where both models' argmax is the same token.
        reference_accuracy, candidate_accuracy: share of positions whose argmax is the next
            token.
    """

    tokens: int
    reference_nll: float
    candidate_nll: float
    agreement: float
    reference_accuracy: float
    candidate_accuracy: float

    @property
    def reference_perplexity(self) -> float:
        return math.exp(self.reference_nll)

    @property
    def candidate_perplexity(self) -> float:
        return math.exp(self.candidate_nll)

    def to_dict(self) -> dict[str, object]:
        return {"tokens": self.tokens, "reference_perplexity": self.reference_perplexity,
                "candidate_perplexity": self.candidate_perplexity,
                "reference_nll": self.reference_nll, "candidate_nll": self.candidate_nll,
                "next_token_agreement": self.agreement,
                "reference_next_token_accuracy": self.reference_accuracy,
                "candidate_next_token_accuracy": self.candidate_accuracy}

    def lines(self) -> list[str]:
        """What `slimgraph compare` prints for two LMs."""
        change = self.candidate_perplexity / self.reference_perplexity - 1
        return [
            f"perplexity ({self.tokens} next tokens): reference {self.reference_perplexity:.4f}, "
            f"candidate {self.candidate_perplexity:.4f} ({change:+.2%})",
            f"next-token agreement {format_percent(self.agreement)} (argmax); next-token "
            f"accuracy: reference {format_percent(self.reference_accuracy)}, candidate "
            f"{format_percent(self.candidate_accuracy)}",
        ]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _next_token_terms(
    logits: np.ndarray, ids: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(loss per counted position, argmax per counted position, target per counted position)."""
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
        raise BadDataError(
            f"the logits have shape {list(logits.shape)}, not [batch, seq, vocab] for tokens "
            f"of shape {list(ids.shape)}"
        )
    vocab = logits.shape[2]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise BadDataError(f"token ids must be in [0, {vocab}) (the logits' vocabulary)")
    scores = logits[:, :-1].astype(np.float64)
    targets = ids[:, 1:]
    keep = np.ones(targets.shape, bool)
    if mask is not None:
        keep = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    scores, targets = scores[keep], targets[keep]
    top = scores.max(axis=1, keepdims=True)
    log_total = np.log(np.exp(scores - top).sum(axis=1)) + top[:, 0]
    chosen = np.take_along_axis(scores, targets[:, None], axis=1)[:, 0]
    return log_total - chosen, scores.argmax(axis=1), targets


@dataclass
class LMAccumulator:
    """Streams two LMs' logits on the same tokens into `LMScores`."""

    spec: LMSpec
    tokens: int = 0
    reference_loss: float = 0.0
    candidate_loss: float = 0.0
    agree: int = 0
    reference_hits: int = 0
    candidate_hits: int = 0

    def add(self, feed: Mapping[str, Any], reference: Mapping[str, Any],
            candidate: Mapping[str, Any]) -> None:
        ids = np.asarray(feed[self.spec.tokens])
        mask = None if self.spec.mask is None else np.asarray(feed[self.spec.mask])
        ref_loss, ref_top, targets = _next_token_terms(
            np.asarray(reference[self.spec.logits]), ids, mask)
        cand_loss, cand_top, _ = _next_token_terms(
            np.asarray(candidate[self.spec.logits]), ids, mask)
        self.tokens += len(targets)
        self.reference_loss += float(ref_loss.sum())
        self.candidate_loss += float(cand_loss.sum())
        self.agree += int((ref_top == cand_top).sum())
        self.reference_hits += int((ref_top == targets).sum())
        self.candidate_hits += int((cand_top == targets).sum())

    def result(self) -> LMScores:
        if not self.tokens:
            raise BadDataError("no next-token positions to score (rows of one token, or all "
                               "padding)")
        n = self.tokens
        return LMScores(n, self.reference_loss / n, self.candidate_loss / n, self.agree / n,
                        self.reference_hits / n, self.candidate_hits / n)


def perplexity(
    model: ir.Model | str | os.PathLike[str],
    data: str | os.PathLike[str] | Mapping[str, np.ndarray] | Iterable[Mapping[str, Any]],
    *,
    batch_size: int = 16,
    threads: int | None = None,
) -> float:
    """The perplexity of one causal LM on a token file (see the module docstring).

    Args:
        model: the LM (a model or a path).
        data: an `.npz` path or stacked arrays with the model's inputs (`input_ids` [rows,
            seq]), or an iterable of feed dicts.
        batch_size: rows per run.
        threads: onnxruntime intra-op threads.

    Raises:
        BadOptionError: the model is not a causal LM (no integer [batch, seq] input with a
            float [batch, seq, vocab] output).
        BadDataError: data that does not fit the model, or token ids outside the vocabulary.
    """
    model = as_model(model)
    spec = lm_spec(model)
    if spec is None:
        raise BadOptionError("the model is not a causal LM: it needs an integer input "
                             "[batch, seq] and a float output [batch, seq, vocab]")
    session = create_session(model, threads=threads)
    runs: Iterable[Mapping[str, Any]]
    if isinstance(data, (str, os.PathLike, Mapping)):
        runs = (feed for feed, _ in as_data(data, model).batches(batch_size, model))
    else:
        runs = data
    total, count = 0.0, 0
    for feed in runs:
        outputs = run(session, feed)
        mask = None if spec.mask is None else np.asarray(feed[spec.mask])
        loss, _, targets = _next_token_terms(np.asarray(outputs[spec.logits]),
                                             np.asarray(feed[spec.tokens]), mask)
        total += float(loss.sum())
        count += len(targets)
    if not count:
        raise BadDataError("no next-token positions to score")
    return math.exp(total / count)
