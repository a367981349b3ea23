"""A small causal language model trained on real English text the machine has, once.

The text is Debian's license collection (/usr/share/common-licenses: GPL, LGPL, Apache, MPL, ...),
read as bytes: the vocabulary is the 256 byte values, no tokenizer, nothing downloaded. The model
is a Llama-style decoder (`transformers.LlamaForCausalLM` from a small `LlamaConfig`: RMSNorm,
rotary embeddings, grouped-query attention, SwiGLU MLP, untied LM head) sized so that training
takes a few minutes on two CPU cores and its MatMuls have K a multiple of 128 (int4 blocks of
128). One held-out license (`HELD_OUT`) is never trained on: the evaluation token file is all of
it (every byte scored once: a sample of it left the int4 methods' small perplexity gaps within
their noise); calibration windows come from the training text.

`trained_lm()` trains and exports the model once per machine: the files are cached in
`cache_dir()` (`$SLIMGRAPH_TEST_CACHE`, else the system temp folder) under a key that changes
with the configuration, the training settings and the text, and a file lock makes concurrent
test runs and benchmarks wait for one training instead of each training their own. Tests and
`benchmarks/decoder.py` both use it.

Token files are `.npz` with `input_ids` int64 [rows, seq] (what `slimgraph compare --data` and
`--calib` read).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

__all__ = ["TrainedLM", "trained_lm", "toy_lm", "cache_dir", "license_text", "token_windows",
           "every_window", "CONFIG", "TRAINING", "CALIB_ROWS", "HELD_OUT"]

LICENSES = Path("/usr/share/common-licenses")
HELD_OUT = ("MPL-1.1",)  # evaluation only
# The decoder: 4 query heads of 32, 2 key/value heads (grouped-query), SwiGLU 128 -> 384.
CONFIG: dict[str, object] = {
    "vocab_size": 256, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
}
TRAINING: dict[str, object] = {
    "steps": 900, "batch": 16, "seq": 128, "lr": 3e-3, "warmup": 50, "weight_decay": 0.01,
    "seed": 0, "version": 1,
}
CALIB_ROWS = 64  # calibration windows of `seq` bytes from the training text


@dataclass(frozen=True)
class TrainedLM:
    """The trained model's files.

    Attributes:
        model: the fp32 ONNX export (input `input_ids` int64 [batch, seq], output `logits`
            float32 [batch, seq, 256]).
        eval_tokens: `.npz`, `input_ids` [rows, seq]: the whole held-out license in consecutive
            windows (`every_window`; 201 rows of 128 for MPL-1.1's 25755 bytes).
        calib_tokens: `.npz`, `input_ids` [CALIB_ROWS, seq] from the training text.
        train_seconds: how long training took when it ran (read from the cache).
        train_loss: the mean loss of the last training steps (nats per byte).
    """

    model: Path
    eval_tokens: Path
    calib_tokens: Path
    train_seconds: float
    train_loss: float


def cache_dir() -> Path:
    """Where trained models are kept: `$SLIMGRAPH_TEST_CACHE`, else `<tmp>/slimgraph-test-cache`."""
    root = os.environ.get("SLIMGRAPH_TEST_CACHE") or os.path.join(
        tempfile.gettempdir(), "slimgraph-test-cache")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def license_text(*, held_out: bool) -> bytes:
    """The license texts (regular files, symlinks skipped) in name order: the held-out ones
    (`held_out=True`) or the others."""
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    chosen = [p for p in files if (p.name in HELD_OUT) == held_out]
    if not chosen:
        raise FileNotFoundError(f"no license texts in {LICENSES}")
    return b"\n".join(p.read_bytes() for p in chosen)


def token_windows(text: bytes, rows: int, seq: int, seed: int) -> np.ndarray:
    """`rows` windows of `seq` bytes as int64 token ids: evenly spaced over the text (a fixed
    seed jitters the starts), so the rows cover it rather than repeat one part."""
    data = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    rng = np.random.default_rng(seed)
    span = len(data) - seq
    starts = np.linspace(0, span, rows, dtype=np.int64)
    jitter = rng.integers(0, max(1, span // (2 * rows)), rows)
    starts = np.minimum(starts + jitter, span)
    return np.stack([data[s : s + seq] for s in starts])


def every_window(text: bytes, seq: int) -> np.ndarray:
    """The text cut into consecutive windows of `seq` bytes (the tail shorter than `seq`
    dropped), as int64 token ids [len(text) // seq, seq]: every byte scored once."""
    data = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    rows = len(data) // seq
    return data[: rows * seq].reshape(rows, seq)


def _key() -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CONFIG, TRAINING], sort_keys=True).encode())
    digest.update(license_text(held_out=False))
    digest.update(license_text(held_out=True))
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


EXPORT_VERSION = 3  # the export's and token files' settings; a change re-exports the cached
# weights


def trained_lm() -> TrainedLM:
    """The trained LM's files, training (once per key) and exporting it first when needed."""
    folder = cache_dir() / f"lm-{_key()}"
    done = folder / "done.json"
    with _locked(cache_dir() / f"lm-{_key()}.lock"):
        if not (folder / "state.npz").exists():
            folder.mkdir(parents=True, exist_ok=True)
            _train(folder)
        record = json.loads(done.read_text()) if done.exists() else {}
        if record.get("export") != EXPORT_VERSION:
            _export(folder)
            record = {**json.loads((folder / "train.json").read_text()),
                      "export": EXPORT_VERSION}
            temp = done.with_suffix(".tmp")
            temp.write_text(json.dumps(record))
            temp.replace(done)
    return TrainedLM(folder / "lm.onnx", folder / "eval.npz", folder / "calib.npz",
                     float(record["train_seconds"]), float(record["train_loss"]))


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    temp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    write(temp)
    temp.replace(path)


def _train(folder: Path) -> None:
    """Train the LM; its weights go to `state.npz`, the time and final loss to `train.json`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    seq, batch, steps = int(TRAINING["seq"]), int(TRAINING["batch"]), int(TRAINING["steps"])
    torch.manual_seed(int(TRAINING["seed"]))
    generator = torch.Generator().manual_seed(int(TRAINING["seed"]))
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))  # type: ignore[arg-type]
    data = torch.from_numpy(np.frombuffer(license_text(held_out=False), np.uint8).astype(np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(TRAINING["lr"]),
                                  weight_decay=float(TRAINING["weight_decay"]))
    warmup = int(TRAINING["warmup"])

    def rate(step: int) -> float:  # linear warm-up, then cosine to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + np.cos(np.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    model.train()
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        ids = torch.stack([data[s : s + seq] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    state = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    _write_atomically(folder / "train.json", lambda p: p.write_text(json.dumps(
        {"train_seconds": seconds, "train_loss": float(np.mean(losses[-50:]))})))
    _write_atomically(folder / "state.npz", lambda p: np.savez(p, **state))


def _export(folder: Path) -> None:
    """Export the trained weights (`state.npz`) with batch and sequence symbolic, and write the
    token files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimgraph import from_torch, save

    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()  # type: ignore[arg-type]
    with np.load(folder / "state.npz") as state:
        model.load_state_dict({name: torch.from_numpy(state[name]) for name in state.files})
    example = torch.zeros((2, 16), dtype=torch.int64)  # batch 2: a batch of 1 is specialized
    exported = from_torch(
        logits_module(model), (example,), dynamic_shapes=({0: "batch", 1: "seq"},),
        input_names=["input_ids"], output_names=["logits"],
    )
    save(exported, folder / "lm.onnx")
    seq = int(TRAINING["seq"])
    np.savez(folder / "eval.npz", input_ids=every_window(license_text(held_out=True), seq))
    np.savez(folder / "calib.npz",
             input_ids=token_windows(license_text(held_out=False), CALIB_ROWS, seq, 2))


def logits_module(model):  # noqa: ANN001, ANN201 - torch types are imported lazily
    """A Hugging Face causal LM as a module taking `input_ids` and returning only the logits
    (no cache): what `from_torch` exports as `input_ids -> logits`."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, use_cache=False).logits

    return Logits().eval()



def toy_lm(vocab: int = 32, width: int = 64, seed: int = 0) -> ir.Model:
    """A hand-built LM-shaped graph for fast tests (untrained, random weights): token ids
    `input_ids` int64 [batch, seq] -> embedding Gather [vocab, width] -> MatMul [width, width]
    -> Relu -> MatMul [width, vocab] -> `logits` float32 [batch, seq, vocab]. Not causal in any
    learned sense, but shaped like one: what `runtime.perplexity` and `compare` detect."""
    rng = np.random.default_rng(seed)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((vocab, width)).astype(np.float32),
                                     "embed"),
        onnx.numpy_helper.from_array((rng.standard_normal((width, width)) * 0.2).astype(
            np.float32), "w1"),
        onnx.numpy_helper.from_array((rng.standard_normal((width, vocab)) * 0.3).astype(
            np.float32), "head"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h0"], name="embed"),
        helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="fc"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "head"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes, "toy_lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))
