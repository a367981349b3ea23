"""Never slower: every compressing command with its default options, timed against its input.

For each model (CNNs with channel counts that are not multiples of 8, residual, depthwise,
densely connected, grouped, a transformer encoder) and each command (`quantize` without data:
dynamic; `quantize --calib`: static; `prune --ratio 0.3`; `factorize --rank auto`; `optimize`,
the lossless preset), the command runs in-process with the speed guard on and `--allow-slower`
(so that a model the guard would refuse is still measured), and the table prints the written
model's latency as a ratio to its input at batch 1 and 64 (the guard's own side-by-side
measurement: interleaved rounds, medians, 90% paired bootstrap interval) and whether the guard
accepted it or would have refused it. A command that cannot apply to a model (no Conv to
factorize where the ranks would save) says so.

Then `prune --ratio 0.3` on the residual CNN with odd channel counts, timed at batch 64 with 25
rounds against fp32: with the default rounding (the fast channel multiple) and with
`--round-to 1` (the counts as asked).

Usage: `PYTHONPATH=. python benchmarks/speed_guard.py [--out DIR] [--models a,b]`. Ratios hold
within one run; absolute times on a shared machine do not.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import slimgraph as sg  # noqa: E402
from slimgraph._tables import render_table  # noqa: E402
from slimgraph.runtime.bench import benchmark  # noqa: E402
from slimgraph.runtime.feeds import random_feeds  # noqa: E402
from slimgraph.runtime.speed_guard import ENV_SKIP, channel_multiple  # noqa: E402
from slimgraph.tools.cli import main  # noqa: E402
from tests import models as test_models  # noqa: E402


class OddCNN(nn.Module):
    """A VGG-style plain stack whose widths are not multiples of 8 (20, 36, 52, 100)."""

    def __init__(self, widths: tuple[int, ...] = (20, 36, 52, 100), classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(c_in, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            c_in = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _resnet_odd() -> nn.Module:
    """ResNet-18 layout (4 stages of 2 basic blocks) with widths 20, 36, 76, 148."""
    return test_models.ResNetTiny((20, 36, 76, 148))


MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "odd_cnn": (OddCNN, "image"),
    "resnet_odd": (_resnet_odd, "image"),
    "resnet": (test_models.ResNetTiny, "image"),
    "mobilenetv2": (test_models.MobileNetV2Tiny, "image"),
    "densenet": (test_models.DenseNetTiny, "image"),
    "grouped": (test_models.GroupedConvNet, "image"),
    "bert": (test_models.BertStyleEncoder, "tokens"),
}

COMMANDS: dict[str, list[str]] = {
    "quantize (dynamic)": ["quantize"],
    "quantize --calib": ["quantize", "--calib", "{calib}"],
    "prune --ratio 0.3": ["prune", "--ratio", "0.3"],
    "factorize --rank auto": ["factorize", "--rank", "auto"],
    "optimize": ["optimize"],
}


def export(name: str, folder: Path) -> tuple[Path, Path]:
    """The model exported with a symbolic batch, and 64 calibration rows."""
    torch.manual_seed(0)
    build, kind = MODELS[name]
    module = test_models._randomize_batchnorm(build()).eval()
    rng = np.random.default_rng(0)
    if kind == "tokens":
        ids = torch.randint(0, 1000, (2, 16))
        mask = torch.ones(2, 16, dtype=torch.int64)
        dims = {0: "batch"}
        model = sg.from_torch(module, (ids, mask), dynamic_shapes=(dims, dims))
        calib = {"input_ids": rng.integers(0, 1000, (64, 16)).astype(np.int64),
                 "attention_mask": np.ones((64, 16), np.int64)}
    else:
        model = sg.from_torch(module, (torch.randn(1, 3, 32, 32),))
        calib = {model.graph.inputs[0].name: rng.standard_normal((64, 3, 32, 32)).astype(
            np.float32)}
    path, calib_path = folder / f"{name}.onnx", folder / f"{name}_calib.npz"
    sg.save(model, path)
    np.savez(calib_path, **calib)
    return path, calib_path


def run_command(args: list[str]) -> tuple[int, dict | None, str]:
    """`slimgraph ARGS --json` in-process: exit code, the JSON object, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--json", "--allow-slower"])
    try:
        data = json.loads(out.getvalue()) if code == 0 else None
    except json.JSONDecodeError:
        data = None
    return code, data, err.getvalue().strip()


def _cell(speed: dict, batch: int) -> str:
    for b in speed["batches"]:
        if b["batch"] == batch or (batch == 64 and b["batch"] != 1):
            size = "" if b["batch"] == batch else f" @{b['batch']}"
            return f"{b['ratio']:.2f}x ({b['low']:.2f}-{b['high']:.2f}){size}"
    return "-"


def main_table(names: list[str], folder: Path) -> list[list[str]]:
    rows = []
    for name in names:
        path, calib = export(name, folder)
        for label, template in COMMANDS.items():
            args = [a.format(calib=calib) for a in template]
            out = folder / f"{name}_{args[0]}.onnx"
            code, data, err = run_command([args[0], str(path), "-o", str(out), *args[1:]])
            if code != 0 or data is None:
                rows.append([name, label, "-", "-", f"not applied: {err[:70]}"])
                continue
            speed = data["speed_check"]
            verdict = "refused (slower)" if speed["slower"] else "accepted"
            rows.append([name, label, _cell(speed, 1), _cell(speed, 64), verdict])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def prune_at_64(folder: Path) -> str:
    """`prune --ratio 0.3` on the odd-width residual CNN: default rounding and --round-to 1,
    side by side with fp32 at batch 64."""
    path, _ = export("resnet_odd", folder)
    outs = {}
    for label, extra in (("default", []), ("--round-to 1", ["--round-to", "1"])):
        out = folder / f"pruned_{len(outs)}.onnx"
        code, data, err = run_command(["prune", str(path), "-o", str(out), "--ratio", "0.3",
                                       "--no-speed-check", *extra])
        assert code == 0, err
        assert data is not None
        outs[label] = (out, data["macs_after"] / data["macs_before"])
    model = sg.load(path)
    result = benchmark([model, *(sg.load(p) for p, _ in outs.values())],
                       random_feeds(model, batch=64), labels=["fp32", *outs], rounds=25)
    macs = ", ".join(f"{k}: MACs {v[1]:.2f}x" for k, v in outs.items())
    return f"{result}\n{macs}"


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    os.environ.pop(ENV_SKIP, None)
    folder = args.out or Path(tempfile.mkdtemp(prefix="speed_guard_"))
    folder.mkdir(parents=True, exist_ok=True)
    names = args.models.split(",")
    print(f"channel multiple (prune's default rounding here): {channel_multiple()}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    rows = main_table(names, folder)
    print()
    print(render_table(["model", "command", "batch 1", "batch 64", "guard"], rows,
                       align="llrrl"))
    print("\nratio = written model's median latency / input's, 90% paired bootstrap interval; "
          "@N: the guard timed batch N instead of 64 (its time budget)")
    print("\nprune --ratio 0.3 on resnet_odd (widths 20/36/76/148), batch 64:")
    print(prune_at_64(folder))


if __name__ == "__main__":
    main_cli()
