"""Zero-shot calibration against real-data calibration on a MobileNetV3-small at 224x224.

The model is torchvision's MobileNetV3-small layout, written out here (no torchvision): a
hardswish stem, 11 inverted residual blocks with depthwise 3x3/5x5 convolutions, squeeze-and-
excitation (ReLU, hardsigmoid) in 9 of them, BatchNorm after every convolution, a 1x1 head and a
two-layer classifier (width 1.0, 10 classes, about 1.5M parameters). Its convolutions are seeded
random (Kaiming), its BatchNorm running statistics are fitted on real images: scikit-learn's
digits shipped with slimgraph, upsampled bilinearly from 8x8 to 224x224 and repeated on 3 channels
(the training split, train-mode forward passes). It is exported with `sg.from_torch`, which keeps
the BatchNormalization nodes zero-shot calibration reads.

Both calibrations feed `sg.quantize` (static int8, QDQ, minmax): real data is 64 training images,
zero-shot is `zero_shot_calibration(model, samples=64)` with its defaults (time budget, convergence
stop). The output cosine to the float model is measured on 200 test images. The script prints the
wall and CPU time of each step and both cosines, and exits 1 when zero-shot takes longer than
`--limit` seconds (default 180) or its cosine is more than 0.001 below real data's.

`--digits` runs the same comparison on the bundled digits CNN (8x8, 5 BatchNorms); `--steps 200
--tolerance 0 --batch-size 64 --time-budget 100000` is the synthesis as it was before it had
batches, a plateau stop and a time budget.

Run: `python benchmarks/zeroshot.py [--threads 2] [--samples 64] [--limit 180] [--digits]`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import slimgraph as sg
from slimgraph.runtime.data import as_data
from slimgraph.runtime.metrics import evaluate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "slimgraph" / "data"
SIZE = 224

# torchvision's mobilenet_v3_small: (in, kernel, expanded, out, SE, activation, stride)
SETTINGS = (
    (16, 3, 16, 16, True, "RE", 2),
    (16, 3, 72, 24, False, "RE", 2),
    (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1),
    (48, 5, 144, 48, True, "HS", 1),
    (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1),
    (96, 5, 576, 96, True, "HS", 1),
)


def _divisible(value: float, divisor: int = 8) -> int:
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int, groups: int,
             act: type[nn.Module] | None) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = _divisible(channels // 4)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)
        scale = F.hardsigmoid(self.fc2(F.relu(self.fc1(scale))))
        return x * scale


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, kernel: int, expanded: int, c_out: int, se: bool, act: str,
                 stride: int) -> None:
        super().__init__()
        activation = nn.Hardswish if act == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(_conv_bn(c_in, expanded, 1, 1, 1, activation))
        layers.append(_conv_bn(expanded, expanded, kernel, stride, expanded, activation))
        if se:
            layers.append(SqueezeExcitation(expanded))
        layers.append(_conv_bn(expanded, c_out, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class MobileNetV3Small(nn.Module):
    """torchvision's MobileNetV3-small layout (width 1.0), `classes` outputs."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 16, 3, 2, 1, nn.Hardswish)]
        layers += [InvertedResidual(*setting) for setting in SETTINGS]
        layers.append(_conv_bn(96, 576, 1, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(),
                                        nn.Linear(1024, classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def digits_224(split: str, rows: int | None = None) -> np.ndarray:
    """The shipped digits `split` ("train" or "test") as float32 [N, 3, 224, 224] in [0, 1]."""
    with np.load(DATA / f"digits_{split}.npz") as archive:
        images = archive["image"][:rows].astype(np.float32)
    images = images / max(float(images.max()), 1e-6)
    up = F.interpolate(torch.from_numpy(images), size=(SIZE, SIZE), mode="bilinear",
                       align_corners=False)
    return up.repeat(1, 3, 1, 1).numpy()


def build_model(seed: int = 0, fit_rows: int = 512, batch: int = 64) -> sg.ir.Model:
    """The MobileNetV3-small with BatchNorm statistics fitted on real images, as ONNX."""
    torch.manual_seed(seed)
    net = MobileNetV3Small()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the fitting passes
    images = torch.from_numpy(digits_224("train", fit_rows))
    net.train()
    with torch.no_grad():
        for start in range(0, len(images), batch):
            net(images[start:start + batch])
    net.eval()
    return sg.from_torch(net, (torch.zeros(2, 3, SIZE, SIZE),), input_names=["image"])


class Clock:
    """Wall and process CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--limit", type=float, default=180.0, help="seconds allowed")
    parser.add_argument("--steps", type=int, default=None, help="fixed steps (default: adaptive)")
    parser.add_argument("--time-budget", type=float, default=120.0,
                        help="zero-shot time budget in seconds (default 120, as the command's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tolerance", type=float, default=None)
    parser.add_argument("--model", type=Path, default=None,
                        help="the model .onnx (built here and written there when missing)")
    parser.add_argument("--digits", action="store_true",
                        help="the bundled digits CNN (8x8) and its calibration images instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from slimgraph.runtime.torch_backend._zeroshot import synthesize

    with Clock() as built:
        if args.digits:
            model = sg.load(DATA / "digits_cnn.onnx")
        elif args.model is not None and args.model.is_file():
            model = sg.load(args.model)
        else:
            model = build_model()
            if args.model is not None:
                sg.save(model, args.model)
    print(f"model: {sum(n.op_type == 'BatchNormalization' for n in model.graph)} BatchNorm, "
          f"built in {built.wall:.1f} s")
    if args.digits:
        test = as_data(DATA / "digits_test.npz", model)
        with np.load(DATA / "digits_calib.npz") as archive:
            real = {"image": archive["image"][:args.samples]}
    else:
        test = as_data({"image": digits_224("test", 200)}, model)
        real = {"image": digits_224("train", args.samples)}
    options: dict[str, object] = {"samples": args.samples, "batch_size": args.batch_size,
                                  "time_budget": args.time_budget, "progress": True}
    if args.steps is not None:
        options["steps"] = args.steps
    if args.tolerance is not None:
        options["tolerance"] = args.tolerance
    with Clock() as zero:
        run = synthesize(model, **options)  # type: ignore[arg-type]
    synthesized = run.feeds
    cosines = {}
    for name, calibration in (("real data", real), ("zero-shot", synthesized)):
        quantized = sg.quantize(model, calibration=calibration, progress=False)
        cosines[name] = evaluate(quantized, test, reference=model).cosine
    noise = {"image": np.random.default_rng(0).standard_normal(real["image"].shape,
                                                               dtype=np.float32)}
    quantized = sg.quantize(model, calibration=noise, progress=False)
    cosines["noise"] = evaluate(quantized, test, reference=model).cosine
    print(f"zero-shot synthesis: {zero.wall:.1f} s wall, {zero.cpu:.1f} s CPU "
          f"({args.threads} threads; limit {args.limit:.0f} s); steps per batch {run.steps} "
          f"({', '.join(run.stopped)}); loss "
          + ", ".join(f"{a:.4g} -> {b:.4g}" for a, b in run.losses))
    for name, cosine in cosines.items():
        print(f"output cosine, int8 calibrated on {name}: {cosine:.5f}")
    gap = cosines["real data"] - cosines["zero-shot"]
    print(f"real data - zero-shot: {gap:+.5f} (allowed 0.001)")
    ok = zero.wall <= args.limit and gap <= 0.001
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
