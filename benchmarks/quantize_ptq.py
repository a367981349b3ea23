"""Per-tensor int8 of a MobileNetV2-style network, with cross-layer equalization and bias
correction (Nagel et al. 2019), side by side.

Model: tests/models.MobileNetV2Tiny's layout (inverted residuals, depthwise 3x3, ReLU6, linear
bottlenecks) with a 1-channel stride-1 stem for 8x8 inputs, trained on scikit-learn's digits
(1437 train / 360 test rows, seed 0, Adam without weight decay). Trained plainly, this network
loses nothing to per-tensor int8 (its folded depthwise ranges stay within a factor of 4), so
the ranges are made realistic: 10% of each depthwise layer's BatchNorm gains are fixed at
10**U(1, `--spread`) during training (`spread_ranges`), which gives the folded depthwise
weights a few channels one to two orders of magnitude wider than the rest, as BatchNorm
folding does in ImageNet-trained MobileNetV2 (the paper's figure 2). The trained weights are
cached (`--cache`, default ~/.cache/slimgraph-bench/); `--retrain` trains again.

Rows: float; int8 static per-channel (reference); per-tensor int8 plain, with `equalize`, with
`bias_correction`, with both. Calibration: 256 training rows, minmax. Columns: test accuracy,
output cosine to float, quantize wall time. Then: equalization alone in float (the prepared
model equalized, max relative difference of the logits on the test rows, rtol 1e-4 target).

Target (PASS/FAIL): per-tensor with equalize + bias correction recovers >= 70% of the accuracy
plain per-tensor int8 loses; equalization alone exact in float (rtol 1e-4 of the output scale).

Usage:
    python benchmarks/quantize_ptq.py [--epochs 20] [--spread 2] [--retrain]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402

import slimgraph as sg  # noqa: E402
from slimgraph.passes.quantize.equalize import equalized  # noqa: E402
from slimgraph.passes.quantize.prepare import prepare  # noqa: E402
from slimgraph.runtime.session import create_session, run  # noqa: E402
from tests.models import MobileNetV2Tiny  # noqa: E402

SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 2, 1))


def network() -> nn.Module:
    """MobileNetV2Tiny at width 1 with a 1-channel, stride-1 stem (8x8 digits)."""
    model = MobileNetV2Tiny(width=1.0, classes=10, settings=SETTINGS, last_channels=128)
    model.features[0] = nn.Conv2d(1, 32, 3, 1, 1, bias=False)
    return model


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        x, data.target, test_size=360, random_state=0, stratify=data.target)
    return x_train, x_test, y_train.astype(np.int64), y_test.astype(np.int64)


def spread_ranges(model: nn.Module, decades: float, fraction: float = 0.1) -> None:
    """Fix the BatchNorm gain of a random `fraction` of each depthwise convolution's channels at
    10**U(1, decades), not trained (the other gains train as usual): the folded depthwise
    weights then have a few channels one to `decades` orders of magnitude wider than the rest,
    as in ImageNet-trained MobileNetV2 (Nagel et al. 2019, figure 2: BatchNorm folding gives a
    few depthwise channels ranges near 100 against ~1). Seeded (0)."""
    generator = torch.Generator().manual_seed(0)
    modules = list(model.modules())
    for conv, norm in zip(modules, modules[1:], strict=False):
        if isinstance(conv, nn.Conv2d) and conv.groups > 1 and isinstance(norm, nn.BatchNorm2d):
            outliers = torch.rand(norm.num_features, generator=generator) < fraction
            exponent = 1 + (decades - 1) * torch.rand(norm.num_features, generator=generator)
            fixed = torch.where(outliers, 10.0 ** exponent, torch.ones(norm.num_features))
            with torch.no_grad():
                norm.weight.copy_(fixed)
            norm.weight.register_hook(lambda grad, keep=outliers: grad.masked_fill(keep, 0.0))


def trained(epochs: int, cache: Path, retrain: bool, decades: float) -> nn.Module:
    model = network()
    spread_ranges(model, decades)
    path = cache / f"ptq_mobilenet_digits_e{epochs}_outliers{decades:g}.pt"
    if path.exists() and not retrain:
        model.load_state_dict(torch.load(path))
        return model.eval()
    torch.manual_seed(0)
    x_train, _, y_train, _ = digits()
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if epoch % 10 == 0:
            print(f"  epoch {epoch}: loss {loss.item():.4f}", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def scores(model: sg.ir.Model, x: np.ndarray) -> np.ndarray:
    session = create_session(model)
    name = session.get_inputs()[0].name
    return np.concatenate([next(iter(run(session, {name: x[i:i + 128]}).values()))
                           for i in range(0, len(x), 128)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--cache", type=Path,
                        default=Path.home() / ".cache" / "slimgraph-bench")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--spread", type=float, default=2.0,
                        help="outlier depthwise channels' BatchNorm gains: 10**U(1, SPREAD), fixed")
    args = parser.parse_args()
    torch.set_num_threads(2)
    x_train, x_test, _, y_test = digits()
    module = trained(args.epochs, args.cache, args.retrain, args.spread)
    model = sg.from_torch(module, (torch.from_numpy(x_test[:2]),))
    name = model.graph.inputs[0].name
    calib = {name: x_train[:256]}
    reference = scores(model, x_test)
    float_acc = float((reference.argmax(1) == y_test).mean())

    def row(label: str, **options: object) -> float:
        start = time.perf_counter()
        quantized = sg.quantize(model, calibration=calib, **options)  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
        got = scores(quantized, x_test)
        acc = float((got.argmax(1) == y_test).mean())
        cos = float(np.mean(np.sum(got * reference, 1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))))
        print(f"| {label:<40} | {acc * 100:6.2f}% | {cos:.4f} | {seconds:5.1f} s |", flush=True)
        return acc

    print(f"MobileNetV2-style on digits ({args.epochs} epochs, 10% of the depthwise "
          f"gains fixed at 10**U(1, {args.spread:g})), machine shared with other jobs")
    print("| model | test accuracy | cosine to float | quantize time |")
    print("|---|---|---|---|")
    print(f"| {'float32':<40} | {float_acc * 100:6.2f}% | 1.0000 | - |")
    row("int8 per-channel (reference)", per_channel=True)
    plain = row("int8 per-tensor", per_channel=False)
    row("int8 per-tensor --equalize", per_channel=False, equalize=True)
    row("int8 per-tensor --bias-correction", per_channel=False, bias_correction=True)
    both = row("int8 per-tensor --equalize --bias-correction", per_channel=False,
               equalize=True, bias_correction=True)
    lost = float_acc - plain
    recovered = (both - plain) / lost if lost > 0 else float("nan")
    prepared = prepare(model, {name: x_test[:2]})
    eq = equalized(prepared, {name: x_test[:2]})
    a, b = scores(prepared, x_test), scores(eq, x_test)
    rel = float(np.abs(a - b).max() / np.abs(a).max())
    print(f"\nplain per-tensor loses {lost * 100:.2f} points; equalize + bias correction "
          f"recovers {recovered * 100:.1f}% of it "
          f"({'PASS' if lost > 0 and recovered >= 0.7 else 'FAIL'}: >= 70%)")
    print(f"equalization alone in float: max |difference| / max |logit| = {rel:.2e} on "
          f"{len(x_test)} test rows ({'PASS' if rel <= 1e-4 else 'FAIL'}: <= 1e-4)")


if __name__ == "__main__":
    main()
