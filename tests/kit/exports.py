"""Torch models of `tests.models` exported to ONNX, each once per session (torch imported lazily).

Every call returns a fresh copy: tests may edit what they get.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

__all__ = ["exported_model", "export_transformer", "bert_model"]

_CACHE: dict[str, onnx.ModelProto] = {}


def _cached(key: str, build) -> ir.Model:  # noqa: ANN001 - a zero-argument model factory
    if key not in _CACHE:
        _CACHE[key] = ir.to_proto(build())
    return ir.from_proto(_CACHE[key])


def exported_model(name: str) -> ir.Model:
    """The torch model `name` of `tests.models.TORCH_MODELS` exported with its example input."""

    def build() -> ir.Model:
        from slimgraph.ir import from_torch
        from tests import models

        return from_torch(models.build(name), models.example_input(name))

    return _cached(f"torch:{name}", build)


def bert_model() -> ir.Model:
    """The small BERT-style encoder with symbolic batch and sequence (as real exports have)."""

    def build() -> ir.Model:
        from slimgraph.ir import from_torch
        from tests import models

        ids, mask = models.example_input("bert", batch=2)
        dims = {0: "batch", 1: "seq"}
        return from_torch(models.build("bert"), (ids, mask), dynamic_shapes=(dims, dims))

    return _cached("bert:dynamic", build)


def export_transformer(name: str, dead_heads: tuple[int, ...] = ()) -> ir.Model:
    """A 2-layer, 64-wide transformer (4 heads of 16) exported by dynamo with dynamic batch and
    sequence: "bert" (input_ids and a padding attention_mask) or "gpt" (input_ids, causal).
    `dead_heads`: heads whose value columns and output-projection rows are zeroed in every layer
    (they contribute nothing). Feeds: `data.transformer_feeds`."""

    def build() -> ir.Model:
        import torch

        from slimgraph.ir import from_torch
        from tests.models import BertStyleEncoder, GPTStyleDecoder

        torch.manual_seed(0)
        dims = {0: "batch", 1: "seq"}
        ids = torch.randint(0, 500, (2, 16))
        if name == "bert":
            bert = BertStyleEncoder(vocab=500, dim=64, heads=4, hidden=256, layers=2).eval()
            for layer in bert.layers:  # type: ignore[union-attr]
                _kill_heads(layer.value, layer.out, dead_heads, 0)
            mask = torch.ones(2, 16, dtype=torch.int64)
            return from_torch(bert, (ids, mask), dynamic_shapes=(dims, dims))
        gpt = GPTStyleDecoder(vocab=500, dim=64, heads=4, hidden=256, layers=2).eval()
        for block in gpt.blocks:  # type: ignore[union-attr]
            _kill_heads(block.qkv, block.proj, dead_heads, 128)
        return from_torch(gpt, (ids,), dynamic_shapes=(dims,))

    return _cached(f"transformer:{name}{dead_heads}", build)


def _kill_heads(value, out, heads: tuple[int, ...], offset: int, size: int = 16) -> None:  # noqa: ANN001
    """Zero the value rows (from `offset`) and output-projection columns of `heads`."""
    import torch

    with torch.no_grad():
        for head in heads:
            rows = slice(offset + head * size, offset + (head + 1) * size)
            value.weight[rows] = 0.0
            value.bias[rows] = 0.0
            out.weight[:, head * size:(head + 1) * size] = 0.0
