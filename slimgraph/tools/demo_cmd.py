"""`slimgraph demo [-o DIR]`: the whole story on a bundled real model and real data.

The bundled model is a small residual CNN (BatchNorm, residual adds) trained on scikit-learn's
handwritten digits (examples/train_digits_cnn.py). The demo shows, side by side on the held-out
test split (accuracy, size, latency at batch 1 and at the whole test set as one batch):

1. fp32: the model as shipped after slimgraph's exact cleanup and fusion (`optimize`), the
   baseline every ratio is taken against (the exporter's raw graph, shown as "fp32 as exported",
   carries shape arithmetic that the cleanup removes: crediting that gain to int8 or pruning
   would overstate them);
2. int8: static QDQ quantization with the bundled calibration images;
3. pruned 0.5: half the channels of every group removed; the accuracy collapses;
4. pruned + distilled: a few epochs of knowledge distillation (response + feature) from the fp32
   model on the bundled training split bring it back;
5. pruned + distilled + int8: quantized, then one short epoch of quantization-aware training.

Nothing is written unless `-o DIR` is given.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import numpy as np
import onnx_ir as ir

import slimgraph.ir as sg_ir
import slimgraph.runtime as runtime
from slimgraph._optional import require_torch
from slimgraph._tables import emit, format_bytes, render_table, to_json
from slimgraph.api.finetune import finetune_with_report
from slimgraph.api.optimize import optimize
from slimgraph.api.prune import prune_with_report
from slimgraph.api.quantize import quantize
from slimgraph.errors import OutputPathError
from slimgraph.tools._common import add_json_option

__all__ = ["register", "run", "bundled", "STAGES"]

# (key, label, file suffix) of the models compared, in order; the first is the baseline.
STAGES = (
    ("fp32", "fp32 (lossless)", "fp32"),
    ("exported", "fp32 as exported", "exported"),
    ("int8", "int8", "int8"),
    ("pruned", "pruned 0.5", "pruned"),
    ("distilled", "pruned + distilled", "distilled"),
    ("distilled_int8", "pruned + distilled + int8 QAT", "distilled.int8"),
)


def bundled(name: str) -> Path:
    """Path of a file shipped in slimgraph/data (digits_cnn.onnx, digits_calib.npz, ...)."""
    return Path(str(resources.files("slimgraph") / "data" / name))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole story on a bundled digits CNN: int8, pruning, distillation, QAT",
        description=(
            "On the bundled residual CNN (trained on scikit-learn's handwritten digits): "
            "quantize to int8, prune half the channels (accuracy collapses), distil the pruned "
            "model from the original (accuracy comes back), then quantize it with a short QAT; "
            "accuracy, size and latency side by side on the held-out test split."
        ),
    )
    parser.add_argument("-o", "--output", metavar="DIR",
                        help="also write the six models into DIR")
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds (default 20)")
    parser.add_argument("--epochs", type=int, default=5,
                        help="distillation epochs for the pruned model (default 5)")
    parser.add_argument("--qat-epochs", dest="qat_epochs", type=int, default=1,
                        help="quantization-aware training epochs (default 1)")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    require_torch()  # distillation and QAT train through torch: say so before the first step
    folder = Path(args.output) if args.output else None
    if folder is not None and not folder.is_dir():
        raise OutputPathError(f"{folder}: no such folder")
    total_start = time.perf_counter()
    model = sg_ir.load(bundled("digits_cnn.onnx"))
    images, labels = _load_test(model)
    train, calib = bundled("digits_train.npz"), bundled("digits_calib.npz")
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    int8 = quantize(model, calibration=calib, progress=False)
    seconds["int8"] = time.perf_counter() - start
    start = time.perf_counter()
    pruned, prune_report = prune_with_report(model, ratio=0.5)
    seconds["pruned"] = time.perf_counter() - start
    start = time.perf_counter()
    distilled, distil_report = finetune_with_report(
        pruned, train, teacher=model, kd=("response", "feature"), epochs=max(0, args.epochs),
        lr=3e-3, seed=0, progress=False,
    )  # fmt: skip
    seconds["distilled"] = time.perf_counter() - start
    start = time.perf_counter()
    distilled_int8 = quantize(distilled, calibration=calib, progress=False)
    distilled_int8, qat_report = finetune_with_report(
        distilled_int8, train, teacher=model, epochs=max(0, args.qat_epochs), lr=1e-4, seed=0,
        progress=False,
    )  # fmt: skip
    seconds["distilled_int8"] = time.perf_counter() - start
    models: dict[str, ir.Model] = {"fp32": optimize(model), "exported": model, "int8": int8,
                                   "pruned": pruned,
                                   "distilled": distilled, "distilled_int8": distilled_int8}
    sessions = [runtime.create_session(models[key]) for key, _, _ in STAGES]
    accuracy = {key: _accuracy(s, images, labels) for (key, _, _), s in zip(STAGES, sessions,
                                                                              strict=True)}
    size = {key: len(runtime.model_bytes(m)) for key, m in models.items()}
    rounds = max(1, args.rounds)
    names = [label for _, label, _ in STAGES]
    one = runtime.benchmark(sessions, {"image": images[:1]}, labels=names, rounds=rounds)
    full = runtime.benchmark(sessions, {"image": images}, labels=names, rounds=rounds)
    written = []
    if folder is not None:
        for key, _, suffix in STAGES:
            sg_ir.save(models[key], folder / f"digits_cnn.{suffix}.onnx")
            written.append(str(folder / f"digits_cnn.{suffix}.onnx"))
    batch = len(images)
    params = (prune_report.params_before, prune_report.params_after)
    if args.json:
        result: dict[str, object] = {"samples": batch, "quantize_seconds": seconds["int8"],
                                     "seconds": time.perf_counter() - total_start}  # fmt: skip
        for i, (key, label, _) in enumerate(STAGES):
            entry: dict[str, object] = {
                "label": label, "size_bytes": size[key], "accuracy": accuracy[key],
                "latency_ms_batch1": one.timings[i].median_ms,
                f"latency_ms_batch{batch}": full.timings[i].median_ms,
                "latency_ratio_batch1": one.timings[i].ratio,
                f"latency_ratio_batch{batch}": full.timings[i].ratio,
                "seconds": seconds.get(key, 0.0),
            }  # fmt: skip
            result[key] = entry
        result["parameters"] = {"fp32": params[0], "pruned": params[1]}
        result["distillation"] = distil_report.to_dict()
        result["qat"] = qat_report.to_dict()
        result["written"] = written
        emit(to_json(result))
        return 0
    rows = []
    for i, (key, label, _) in enumerate(STAGES):
        rows.append([
            label, f"{accuracy[key]:.2%}", f"{(accuracy[key] - accuracy['fp32']) * 100:+.2f}",
            format_bytes(size[key]), f"{size[key] / size['fp32']:.2f}x",
            f"{one.timings[i].median_ms:.3f} ms", f"{one.timings[i].ratio:.2f}x",
            f"{full.timings[i].median_ms:.2f} ms", f"{full.timings[i].ratio:.2f}x",
        ])  # fmt: skip
    text = [
        "slimgraph demo: residual CNN trained on scikit-learn's handwritten digits (8x8 scans)",
        f"test accuracy on {batch} held-out digits; latency: onnxruntime CPU, {one.threads} "
        f"threads, medians of {rounds} interleaved rounds",
        "ratios (x) are against fp32 after the exact cleanup and fusion (`slimgraph optimize`)",
        "",
        render_table(["model", "accuracy", "pts", "size", "size x", "batch 1", "x",
                      f"batch {batch}", "x"], rows, align="lrrrrrrrr"),  # fmt: skip
        "",
        f"int8: static QDQ (per-channel weights, 200 calibration images), {seconds['int8']:.1f} s",
        f"pruned 0.5: parameters {params[0]:,} -> {params[1]:,}; accuracy collapses without "
        "retraining",
        f"distilled: {distil_report.epochs} epochs of response + feature KD from the fp32 model "
        f"on {distil_report.samples} training digits, {seconds['distilled']:.1f} s",
        f"int8 QAT: quantized, then {qat_report.epochs} epoch(s) of quantization-aware training "
        "of the QDQ graph (same op types and counts)",
        f"total {time.perf_counter() - total_start:.1f} s",
    ]
    if written:
        text += ["", "wrote " + ", ".join(written)]
    emit("\n".join(text))
    return 0


def _load_test(model: ir.Model) -> tuple[np.ndarray, np.ndarray]:
    with np.load(bundled("digits_test.npz"), allow_pickle=False) as archive:
        images, labels = archive["image"], archive["labels"]
    runtime.check_feeds(model, {"image": images}, source="digits_test.npz")
    return images, labels


def _accuracy(session, images: np.ndarray, labels: np.ndarray) -> float:  # noqa: ANN001
    logits = runtime.run(session, {"image": images})
    scores = next(iter(logits.values()))
    return float((scores.argmax(axis=1) == labels).mean())
