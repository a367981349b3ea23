"""W4A8 with learned rounding: float, nearest, AdaRound and AdaQuant side by side, in one run.

Two CNNs trained here on scikit-learn's digits (the bundled splits in slimgraph/data: 1347
training, 200 calibration, 450 test images of 8x8), seeded, their float weights cached in
/tmp/slimgraph_adaround_<name>_v2.pt:

- mobilenet: tests/models.MobileNetV2Tiny (width 0.5: 7 inverted residuals, depthwise 3x3
  convs, ReLU6, linear bottlenecks) with a 1-channel stride-1 stem and stride 2 in two stages
  only, for the 8x8 input;
- resnet: tests/models.ResNetTiny (widths 8..64, 8 basic blocks with residual Adds) with a
  1-channel stem.

Each is exported (`sg.from_torch`), then quantized with `sg.quantize(model, calibration=CALIB,
weight_bits=4, round=...)`: 4-bit per-channel weights (codes in [-7, 7]) and 8-bit activations,
minmax calibration on the 200 calibration images, rounding nearest, adaround or adaquant.
Columns: test accuracy on onnxruntime (450 images), the drop in points against float, the mean
squared error of the logits to the float model's, and the quantize wall time. `--per-tensor`
quantizes with one weight scale per layer, where nearest 4-bit rounding loses most. The machine
may be shared: times are one run each, not medians.

Run: python benchmarks/adaround.py [--models mobilenet resnet] [--steps N] [--per-tensor]
     [--variants nearest adaround adaquant] [--retrain]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import slimgraph as sg
from slimgraph.passes.quantize import adaround
from slimgraph.runtime.session import create_session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.models import MobileNetV2Tiny, ResNetTiny  # noqa: E402

DATA = Path(sg.__file__).resolve().parent / "data"


def _digits(split: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"digits_{split}.npz") as archive:
        return {k: archive[k] for k in archive.files}


def build(name: str) -> nn.Module:
    """The network, adapted to 1-channel 8x8 digits."""
    torch.manual_seed(0)
    if name == "mobilenet":
        # stride 2 only twice (8 -> 4 -> 2): the 8x8 digits are not downsampled to 1x1
        settings = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1))
        net = MobileNetV2Tiny(width=0.5, classes=10, settings=settings)
        stem = net.features[0]
        assert isinstance(stem, nn.Conv2d)
        net.features[0] = nn.Conv2d(1, stem.out_channels, 3, 1, 1, bias=False)
        return net
    if name == "resnet":
        net = ResNetTiny((8, 16, 32, 64), 2, 10)
        net.conv1 = nn.Conv2d(1, 8, 3, 1, 1, bias=False)
        return net
    raise SystemExit(f"unknown model {name}")


def trained(name: str, retrain: bool) -> nn.Module:
    """The network trained on the digits' training split (cached weights)."""
    net = build(name)
    cache = Path(f"/tmp/slimgraph_adaround_{name}_v2.pt")
    if cache.exists() and not retrain:
        net.load_state_dict(torch.load(cache))
        return net.eval()
    train = _digits("train")
    x = torch.as_tensor(train["image"], dtype=torch.float32)
    y = torch.as_tensor(train["labels"], dtype=torch.int64)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    epochs = 40
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            rows = order[start:start + 64]
            loss = nn.functional.cross_entropy(net(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    torch.save(net.state_dict(), cache)
    return net.eval()


def scores(model: object, test: dict[str, np.ndarray]) -> np.ndarray:
    """The class scores on onnxruntime."""
    session = create_session(model)  # type: ignore[arg-type]
    return session.run(None, {session.get_inputs()[0].name: test["image"]})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet", "resnet"])
    parser.add_argument("--steps", type=int, default=adaround.STEPS,
                        help=f"optimizer steps per layer (default {adaround.STEPS})")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--per-tensor", action="store_true",
                        help="one weight scale per layer (where nearest rounding loses most)")
    parser.add_argument("--variants", nargs="+", default=["nearest", "adaround", "adaquant"],
                        choices=adaround.ROUNDINGS)
    args = parser.parse_args()
    adaround.STEPS = args.steps
    torch.set_num_threads(2)
    calib, test = _digits("calib"), _digits("test")
    granularity = "per-tensor" if args.per_tensor else "per-channel"
    print(f"W4A8, {granularity} weights; logits MSE: mean squared error to the float logits")
    print(f"{'model':<10} {'variant':<16} {'accuracy':>9} {'drop (pt)':>10} {'logits MSE':>11} "
          f"{'time (s)':>9}")
    for name in args.models:
        net = trained(name, args.retrain)
        model = sg.from_torch(net, (torch.as_tensor(test["image"][:1]),))
        input_name = model.graph.inputs[0].name
        feeds = {input_name: calib["image"]}
        test_feeds = {"image": test["image"], "labels": test["labels"]}
        reference = scores(model, test_feeds)
        base = float((reference.argmax(1) == test["labels"]).mean())
        print(f"{name:<10} {'float':<16} {base:>9.4f} {'':>10} {'':>11} {'':>9}")
        for rounding in args.variants:
            start = time.perf_counter()
            quantized = sg.quantize(model, calibration=feeds, weight_bits=4, round=rounding,
                                    per_channel=not args.per_tensor)
            seconds = time.perf_counter() - start
            got = scores(quantized, test_feeds)
            acc = float((got.argmax(1) == test["labels"]).mean())
            mse = float(np.mean((got - reference) ** 2))
            print(f"{name:<10} {'W4A8 ' + rounding:<16} {acc:>9.4f} {100 * (base - acc):>10.2f} "
                  f"{mse:>11.4g} {seconds:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
