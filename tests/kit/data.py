"""Bundled data and feeds: the digits model and its data sets, the onnx light zoo, token feeds."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

__all__ = [
    "DATA",
    "DIGITS",
    "DIGITS_CALIB",
    "DIGITS_TEST",
    "ZOO_DIR",
    "ZOO_FILES",
    "ZOO_IDS",
    "zoo",
    "digits",
    "digits_test",
    "digits_arrays",
    "random_feeds",
    "linear_feeds",
    "bert_batches",
    "transformer_feeds",
]

DATA = Path(__file__).resolve().parents[2] / "slimgraph" / "data"
DIGITS = DATA / "digits_cnn.onnx"
DIGITS_CALIB = DATA / "digits_calib.npz"
DIGITS_TEST = DATA / "digits_test.npz"

ZOO_DIR = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"
ZOO_FILES = sorted(Path(p) for p in glob.glob(str(ZOO_DIR / "*.onnx")))
ZOO_IDS = [p.stem.removeprefix("light_") for p in ZOO_FILES]


def zoo(name: str) -> Path:
    """A model of the onnx package's light zoo by short name ('resnet50', 'squeezenet', ...)."""
    path = ZOO_DIR / f"light_{name}.onnx"
    if not path.exists():
        path = ZOO_DIR / f"light_bvlc_{name}.onnx"
    assert path.exists(), path
    return path


def digits() -> ir.Model:
    """The bundled digits CNN (image [batch, 1, 8, 8] float32 -> 10 scores)."""
    import slimgraph as sg

    return sg.load(DIGITS)


def digits_test() -> tuple[np.ndarray, np.ndarray]:
    """The bundled test split: images [n, 1, 8, 8] float32 and labels [n] int64."""
    with np.load(DIGITS_TEST) as archive:
        return archive["image"], archive["labels"]


def digits_arrays(name: str = "digits_test.npz", rows: int | None = None) -> dict[str, np.ndarray]:
    """Every array of a bundled archive by name, the first `rows` rows of each (all if None)."""
    with np.load(DATA / name) as archive:
        return {k: archive[k][:rows] for k in archive.files}


def random_feeds(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """One random feed per graph input (the package's own generator)."""
    from slimgraph.runtime import random_feeds as generate

    return generate(model, seed=seed)


def linear_feeds(count: int = 4, batch: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` feeds x [batch, 16] float32 for `graphs.linear_model`."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 16)).astype(np.float32)} for _ in range(count)]


def bert_batches(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`count` feeds of 4 sentences of 16 tokens, each padded after a random length."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        ids = rng.integers(0, 1000, (4, 16)).astype(np.int64)
        mask = np.ones((4, 16), np.int64)
        mask[:, rng.integers(6, 16):] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def transformer_feeds(name: str, batch: int, seq: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Feeds of `exports.export_transformer(name)`: token ids [batch, seq] int64 below 500, and for
    "bert" a padding mask keeping a random prefix (>= 1 token) per row, the first row full."""
    rng = np.random.default_rng(seed)
    feed = {"input_ids": rng.integers(0, 500, (batch, seq)).astype(np.int64)}
    if name == "bert":
        mask = np.ones((batch, seq), np.int64)
        for row in range(batch):
            mask[row, rng.integers(1, seq + 1):] = 0
        mask[0, :] = 1  # one full row
        feed["attention_mask"] = mask
    return feed
