"""`slimgraph demo [-o DIR]`: the main job on a bundled real model and real data.

The bundled model is a small residual CNN (BatchNorm, residual adds) trained on scikit-learn's
handwritten digits (examples/train_digits_cnn.py). The demo quantizes it to static int8 with the
bundled calibration images, then prints model size, latency (side by side, batch 1 and the whole
test set as one batch) and accuracy on the held-out test split, fp32 against int8. Nothing is
written unless `-o DIR` is given.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import numpy as np

from slimgraph import ir as sg_ir
from slimgraph import runtime
from slimgraph.errors import OutputPathError
from slimgraph.passes.quantize import quantize, report_of
from slimgraph.tools.tables import emit, format_bytes, render_table, to_json

__all__ = ["register", "run", "bundled"]


def bundled(name: str) -> Path:
    """Path of a file shipped in slimgraph/data (digits_cnn.onnx, digits_calib.npz, ...)."""
    return Path(str(resources.files("slimgraph") / "data" / name))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="quantize a bundled digits CNN to int8: size, latency and accuracy, fp32 vs int8",
        description=(
            "Quantize the bundled residual CNN (trained on scikit-learn's handwritten digits) "
            "to static int8 and compare it with fp32 on the held-out test split."
        ),
    )
    parser.add_argument("-o", "--output", metavar="DIR",
                        help="also write fp32 and int8 models into DIR")
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds (default 20)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    model = sg_ir.load(bundled("digits_cnn.onnx"))
    images, labels = _load_test(model)
    start = time.perf_counter()
    quantized = quantize(model, calibration=bundled("digits_calib.npz"), report=True,
                         progress=False)
    seconds = time.perf_counter() - start
    sessions = [runtime.create_session(m) for m in (model, quantized)]  # one each, reused
    fp32_acc, int8_acc = (_accuracy(session, images, labels) for session in sessions)
    size_fp32, size_int8 = len(runtime.model_bytes(model)), len(runtime.model_bytes(quantized))
    rounds = max(1, args.rounds)
    one = runtime.benchmark(sessions, {"image": images[:1]}, labels=["fp32", "int8"],
                            rounds=rounds)
    full = runtime.benchmark(sessions, {"image": images}, labels=["fp32", "int8"],
                             rounds=rounds)
    written = []
    if args.output:
        folder = Path(args.output)
        if not folder.is_dir():
            raise OutputPathError(f"{folder}: no such folder")
        for name, m in (("digits_cnn.fp32.onnx", model), ("digits_cnn.int8.onnx", quantized)):
            sg_ir.save(m, folder / name)
            written.append(str(folder / name))
    report = report_of(quantized)
    batch = len(images)
    if args.json:
        emit(to_json({
            "samples": batch,
            "quantize_seconds": seconds,
            "fp32": {"size_bytes": size_fp32, "accuracy": fp32_acc,
                     "latency_ms_batch1": one.timings[0].median_ms,
                     f"latency_ms_batch{batch}": full.timings[0].median_ms},
            "int8": {"size_bytes": size_int8, "accuracy": int8_acc,
                     "latency_ratio_batch1": one.timings[1].ratio,
                     f"latency_ratio_batch{batch}": full.timings[1].ratio},
            "written": written,
        }))
        return 0
    rows = [
        ["size", format_bytes(size_fp32), format_bytes(size_int8),
         f"{size_int8 / size_fp32:.2f}x"],
        ["latency, batch 1", f"{one.timings[0].median_ms:.3f} ms",
         f"{one.timings[1].median_ms:.3f} ms", f"{one.timings[1].ratio:.2f}x"],
        [f"latency, batch {batch}", f"{full.timings[0].median_ms:.2f} ms",
         f"{full.timings[1].median_ms:.2f} ms", f"{full.timings[1].ratio:.2f}x"],
        [f"test accuracy ({batch} digits)", f"{fp32_acc:.2%}", f"{int8_acc:.2%}",
         f"{(int8_acc - fp32_acc) * 100:+.2f} pts"],
    ]
    text = [
        "slimgraph demo: residual CNN trained on scikit-learn's handwritten digits (8x8 scans)",
        f"static int8 (QDQ, per-channel weights, uint8 activations, 200 calibration images) "
        f"in {seconds:.1f} s",
        "",
        render_table(["", "fp32", "int8", "int8 / fp32"], rows, align="lrrr"),
        "",
        f"latency: onnxruntime CPU, {one.threads} threads, medians of {rounds} interleaved rounds",
    ]
    if report is not None:
        text += ["", report.summary(top=3)]
    if written:
        text += ["", "wrote " + ", ".join(written)]
    emit("\n".join(text))
    return 0


def _load_test(model) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    with np.load(bundled("digits_test.npz"), allow_pickle=False) as archive:
        images, labels = archive["image"], archive["labels"]
    runtime.check_feeds(model, {"image": images}, source="digits_test.npz")
    return images, labels


def _accuracy(session, images: np.ndarray, labels: np.ndarray) -> float:  # noqa: ANN001
    logits = runtime.run(session, {"image": images})
    scores = next(iter(logits.values()))
    return float((scores.argmax(axis=1) == labels).mean())
