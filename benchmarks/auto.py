"""`slimgraph auto` against its targets (issue 26), ratios side by side in one run.

Two runs of the command line, as a user types them, each timed by the wall clock:

- digits: the bundled digits CNN (slimgraph/data/digits_cnn.onnx) with
  `--train digits_train.npz --data digits_test.npz --max-drop 0.01 --batch 256`. References:
  onnxruntime's own static int8 on the same model (`quantize_static`, QDQ, U8S8 — activations
  uint8, weights int8 — per-channel, MinMax calibration on digits_calib.npz) on the export as
  given, on it after slimgraph's `lossless` preset (BatchNorm folded into the convolutions, which
  onnxruntime's quantizer does not do itself), and after onnxruntime's recommended
  pre-processing (`quant_pre_process`, where it runs: it fails on this export); the fastest at
  batch 256 is the reference. Targets: the winner's accuracy on digits_test within 1 point of
  fp32, its latency at most 0.5x of the reference's, the command under 15 minutes.
- encoder: a MiniLM-sized `BertModel` (6 layers, hidden 384, 12 heads, FFN 1536; seeded random
  weights from a config, nothing downloaded), exported with `sg.from_torch` (batch and sequence
  symbolic), 32 rows of 128 tokens with padded rows, no labels, `--min-cosine 0.995 --batch 8`.
  Targets: the winner's worst-row output cosine to fp32 at least 0.995, its latency at most
  0.55x of fp32's. fp32 is the export as given and after slimgraph's `lossless` preset (the
  stricter baseline); both are printed.

Latency: all models of a run in one `slimgraph.runtime.benchmark` (interleaved shuffled rounds,
medians, 90% paired bootstrap intervals, all cores). The machine is shared: ratios hold, absolute
times do not.

Run: python benchmarks/auto.py [--models digits,encoder] [--rounds N] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# this file's folder comes first on sys.path, where benchmarks/transformers.py would shadow the
# transformers package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import slimgraph as sg  # noqa: E402
from slimgraph.runtime.metrics import evaluate, load_data  # noqa: E402

DATA = ROOT / "slimgraph" / "data"
SEQ, VOCAB = 128, 1000
KEEP: Path | None = None  # --keep: where the winners are written


def _children_cpu() -> float:
    """CPU seconds (user + system) of finished child processes and the ones they waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _auto(model: Path, out: Path, *extra: str) -> float:
    """Run `slimgraph auto` as a user would; returns its wall time in seconds."""
    command = [sys.executable, "-m", "slimgraph.tools.cli", "auto", str(model), "-o", str(out),
               "--no-progress", *extra]
    print("  $ slimgraph " + " ".join(command[3:]), flush=True)
    start = time.perf_counter()
    cpu = _children_cpu()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "OMP_WAIT_POLICY": "PASSIVE"})
    seconds = time.perf_counter() - start
    print(f"  wall {seconds / 60:.1f} min, CPU {(_children_cpu() - cpu) / 60:.1f} min (the "
          "command and its dask workers)")
    print("  " + done.stdout.replace("\n", "\n  ").rstrip())
    if done.returncode != 0:
        print(f"  exit {done.returncode}: {done.stderr.strip()}")
    return seconds


def _ort_static(model: Path, folder: Path, name: str, *, pre: bool = False) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            with np.load(DATA / "digits_calib.npz") as archive:
                images = archive["image"].astype(np.float32)
            self.rows = iter([{"image": images[i:i + 32]} for i in range(0, len(images), 32)])

        def get_next(self):  # noqa: ANN202
            return next(self.rows, None)

    source = model
    if pre:
        source = folder / f"{name}_input.onnx"
        quant_pre_process(str(model), str(source))
    out = folder / f"{name}.onnx"
    quantize_static(str(source), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True)
    return out


def digits(rounds: int, workers: str | None) -> list[tuple[str, bool]]:
    print("\n=== digits CNN, --train, --max-drop 0.01, batch 256")
    model = DATA / "digits_cnn.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        out = folder / "auto.onnx"
        extra = ("--workers", workers) if workers else ()
        if KEEP is not None:
            out = KEEP / "digits_auto.onnx"
        seconds = _auto(model, out, "--data", str(DATA / "digits_test.npz"), "--train",
                        str(DATA / "digits_train.npz"), "--max-drop", "0.01", "--batch", "256",
                        *extra)
        if not out.exists():
            return [("digits: auto wrote a model", False)]
        fp32 = sg.load(model)
        lossless = folder / "lossless.onnx"  # BatchNorm folded, the exporter's clutter gone
        sg.save(sg.passes.lossless(fp32, verify=False).model, lossless)
        models = {"fp32": model, "ort int8": _ort_static(model, folder, "ort_int8")}
        models["ort int8 lossless"] = _ort_static(lossless, folder, "ort_int8_lossless")
        try:
            models["ort int8 pre"] = _ort_static(model, folder, "ort_int8_pre", pre=True)
        except Exception as error:  # onnxruntime's pre-processing fails on some exports
            print(f"  ort int8 pre: quant_pre_process failed ({type(error).__name__}: {error})")
        models["auto"] = out
        values = load_data(DATA / "digits_test.npz", fp32)
        feed = next(values.batches(256, fp32))[0]
        timed = sg.benchmark(list(models.values()), feed, labels=list(models), rounds=rounds)
        print(timed)
        accuracy = {k: evaluate(sg.load(p), values).accuracy for k, p in models.items()}
        ratios = {t.label: t.ratio for t in timed.timings}
        ref = min((k for k in models if k.startswith("ort")), key=lambda k: ratios[k])
        versus = ratios["auto"] / ratios[ref]
        pair = next(c for c in timed.comparisons if {c.a, c.b} == {ref, "auto"})
        interval = (pair.low, pair.high) if pair.a == "auto" else (1 / pair.high, 1 / pair.low)
        for label in models:
            print(f"  {label:13s} accuracy {accuracy[label]:.2%}  latency {ratios[label]:.3f}x "
                  "of fp32")
        drop = (accuracy["fp32"] or 0) - (accuracy["auto"] or 0)
        return [
            (f"digits: accuracy drop {drop * 100:.2f} points <= 1", drop <= 0.01 + 1e-9),
            (f"digits: auto latency {versus:.3f}x of {ref} [{interval[0]:.2f}-"
             f"{interval[1]:.2f}] <= 0.5", versus <= 0.5),
            (f"digits: command took {seconds / 60:.1f} min < 15", seconds < 15 * 60),
        ]


def _encoder(folder: Path) -> tuple[Path, Path]:
    import torch
    import transformers as tf

    from tests.models_hf import wrap

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=384, num_hidden_layers=6,
                           num_attention_heads=12, intermediate_size=1536,
                           max_position_embeddings=512, attn_implementation="sdpa")
    model = tf.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    export = sg.from_torch(wrap(model, ("input_ids", "attention_mask")),
                           (ids, torch.ones(2, 16, dtype=torch.int64)),
                           dynamic_shapes=({0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}),
                           input_names=["input_ids", "attention_mask"])
    path = folder / "bert.onnx"
    sg.save(export, path)
    rng = np.random.default_rng(0)
    rows = 32
    mask = np.ones((rows, SEQ), np.int64)
    for row in range(1, rows):
        mask[row, rng.integers(SEQ // 4, SEQ + 1):] = 0
    data = folder / "val.npz"
    np.savez(data, input_ids=rng.integers(0, VOCAB, (rows, SEQ)).astype(np.int64),
             attention_mask=mask)
    return path, data


def encoder(rounds: int, workers: str | None) -> list[tuple[str, bool]]:
    print("\n=== MiniLM-sized encoder, --min-cosine 0.995, no training data, batch 8")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, data = _encoder(folder)
        out = folder / "auto.onnx" if KEEP is None else KEEP / "encoder_auto.onnx"
        extra = ("--workers", workers) if workers else ()
        seconds = _auto(model, out, "--data", str(data), "--min-cosine", "0.995", "--batch", "8",
                        *extra)
        if not out.exists():
            return [("encoder: auto wrote a model", False)]
        fp32 = sg.load(model)
        lossless = folder / "lossless.onnx"
        sg.save(sg.passes.lossless(fp32, verify=False).model, lossless)
        values = load_data(data, fp32)
        cosine = evaluate(sg.load(out), values, reference=fp32).cosine or 0.0
        feed = next(values.batches(8, fp32))[0]
        models = {"fp32": model, "fp32 lossless": lossless, "auto": out}
        timed = sg.benchmark(list(models.values()), feed, labels=list(models), rounds=rounds)
        print(timed)
        ratios = {t.label: t.ratio for t in timed.timings}
        to_lossless = ratios["auto"] / ratios["fp32 lossless"]
        print(f"  auto: cosine {cosine:.6f}, latency {ratios['auto']:.3f}x of fp32, "
              f"{to_lossless:.3f}x of fp32 lossless; command {seconds / 60:.1f} min")
        return [
            (f"encoder: cosine {cosine:.6f} >= 0.995", cosine >= 0.995),
            (f"encoder: latency {ratios['auto']:.3f}x of fp32 <= 0.55", ratios["auto"] <= 0.55),
            (f"encoder: latency {to_lossless:.3f}x of fp32 lossless <= 0.55",
             to_lossless <= 0.55),
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,encoder")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--workers", default=None, help="passed to slimgraph auto")
    parser.add_argument("--keep", type=Path, default=None,
                        help="write the winners (and their reports) into this folder")
    args = parser.parse_args()
    global KEEP
    KEEP = args.keep
    checks: list[tuple[str, bool]] = []
    runs = {"digits": digits, "encoder": encoder}
    for name in args.models.split(","):
        checks += runs[name](args.rounds, args.workers)
    print()
    for line, passed in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {line}")
    return 0 if all(passed for _, passed in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
