"""Peak resident memory of static-quantization calibration against the number of samples.

Issue 10 (kind 11): calibration must stream its data, so peak memory is flat in the sample count.
Each measurement is a fresh child process (`python -c ...`) that runs `sg.quantize` on a small
CNN over 64x64 images read from an `.npz` of 100 or 5,000 samples; the parent reads the child's
peak RSS from `os.wait4` (ru_maxrss). Sizes are interleaved in shuffled rounds; medians and the
ratio are printed side by side. The machine may be loaded: memory, unlike time, does not care.

Run: `PYTHONPATH=$PWD python benchmarks/calibration_memory.py [--rounds 3]`
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZES = (100, 5000)
CHILD = """
import sys, slimgraph as sg
model = sg.load(sys.argv[1])
sg.quantize(model, calibration=sys.argv[2], batch_size=32, progress=False)
"""


def cnn(path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((8, 1, 3, 3)), "w2": rng.standard_normal((16, 8, 3, 3)),
        "fc": rng.standard_normal((16, 10)),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["c2"], ["r2"]),
            helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("MatMul", ["f", "fc"], ["logits"]),
        ],
        "cnn64",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def peak_rss_mb(model: Path, data: Path) -> float:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    process = subprocess.Popen([sys.executable, "-c", CHILD, str(model), str(data)], env=env)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"child failed with status {status}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="calib-mem-") as folder:
        root = Path(folder)
        cnn(root / "cnn.onnx")
        rng = np.random.default_rng(1)
        files = {}
        for size in SIZES:
            files[size] = root / f"calib_{size}.npz"
            np.savez(files[size], image=rng.random((size, 1, 64, 64), dtype=np.float32))
        peaks: dict[int, list[float]] = {size: [] for size in SIZES}
        for _ in range(args.rounds):
            order = list(SIZES)
            random.shuffle(order)
            for size in order:
                peaks[size].append(peak_rss_mb(root / "cnn.onnx", files[size]))
        medians = {size: statistics.median(values) for size, values in peaks.items()}
        print(f"{'samples':>8} {'npz MB':>8} {'peak RSS MB (median)':>22}  rounds")
        for size in SIZES:
            mb = files[size].stat().st_size / 2**20
            runs = ", ".join(f"{v:.0f}" for v in peaks[size])
            print(f"{size:>8} {mb:>8.1f} {medians[size]:>22.1f}  {runs}")
        ratio = medians[SIZES[-1]] / medians[SIZES[0]]
        print(f"peak RSS ratio {SIZES[-1]} / {SIZES[0]} samples: {ratio:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
