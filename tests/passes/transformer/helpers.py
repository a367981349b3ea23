"""Small transformer exports shared by the issue-16 tests (exported once per session)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from slimgraph import runtime

_CACHE: dict[str, object] = {}


def export(name: str, dead_heads: tuple[int, ...] = ()) -> ir.Model:
    """A fresh copy of a 2-layer, 64-wide transformer (4 heads) exported by dynamo with dynamic
    batch and sequence: "bert" (padding mask input) or "gpt" (causal). `dead_heads`: heads whose
    value columns and output-projection rows are zeroed in every layer (they contribute nothing)."""
    key = f"{name}{dead_heads}"
    if key not in _CACHE:
        import torch

        from slimgraph.ir import from_torch
        from tests.models import BertStyleEncoder, GPTStyleDecoder

        torch.manual_seed(0)
        dims = {0: "batch", 1: "seq"}
        ids = torch.randint(0, 500, (2, 16))
        if name == "bert":
            net = BertStyleEncoder(vocab=500, dim=64, heads=4, hidden=256, layers=2).eval()
            for layer in net.layers:
                _kill(layer.value, layer.out, dead_heads, 0)
            mask = torch.ones(2, 16, dtype=torch.int64)
            model = from_torch(net, (ids, mask), dynamic_shapes=(dims, dims))
        else:
            net = GPTStyleDecoder(vocab=500, dim=64, heads=4, hidden=256, layers=2).eval()
            for block in net.blocks:
                _kill(block.qkv, block.proj, dead_heads, 128)
            model = from_torch(net, (ids,), dynamic_shapes=(dims,))
        _CACHE[key] = ir.to_proto(model)
    return ir.from_proto(_CACHE[key])  # type: ignore[arg-type]


def _kill(value, out, heads: tuple[int, ...], offset: int, size: int = 16) -> None:  # noqa: ANN001
    import torch

    with torch.no_grad():
        for head in heads:
            rows = slice(offset + head * size, offset + (head + 1) * size)
            value.weight[rows] = 0.0
            value.bias[rows] = 0.0
            out.weight[:, head * size:(head + 1) * size] = 0.0


def feeds(name: str, batch: int, seq: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Token ids, and for "bert" a padding mask keeping a random prefix (>= 1 token) per row."""
    rng = np.random.default_rng(seed)
    feed = {"input_ids": rng.integers(0, 500, (batch, seq)).astype(np.int64)}
    if name == "bert":
        mask = np.ones((batch, seq), np.int64)
        for row in range(batch):
            mask[row, rng.integers(1, seq + 1):] = 0
        mask[0, :] = 1  # one full row
        feed["attention_mask"] = mask
    return feed


def outputs(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = runtime.create_session(model)
    return list(runtime.run(session, feed).values())


def assert_close(reference: ir.Model, model: ir.Model, feed: dict[str, np.ndarray],
                 rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Outputs equal within rtol, atol relative to the output's scale (the exact-pass rule)."""
    for want, got in zip(outputs(reference, feed), outputs(model, feed), strict=True):
        assert want.shape == got.shape
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
