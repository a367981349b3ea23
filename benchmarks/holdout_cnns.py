"""Held-out CNNs for `benchmarks/finetune.py --holdout`: models no test of slimgraph uses.

Four torchvision-shaped classifiers for the digits (8x8 upsampled to 16x16, one channel, 10
classes), each trained here by a plain torch loop and exported to ONNX in its own way:

- `resnet`: ResNet-style basic blocks (3 stages x 2 blocks, widths 16/32/64, BatchNorm kept),
  `sg.from_torch` (BatchNormalization nodes in the graph);
- `mobilenet`: MobileNetV2-style inverted residuals (1x1 expand, depthwise 3x3, linear 1x1
  bottleneck, ReLU6), `sg.from_torch`;
- `vgg`: a VGG-style plain stack (6 conv-BN-ReLU, max pooling) with BatchNorm folded into the
  convolutions before export (`torch.nn.utils.fusion.fuse_conv_bn_eval`): the graph has no
  BatchNormalization, every Conv has a bias;
- `bottleneck`: ResNet-50-style bottleneck blocks (1x1-3x3-1x1, projection shortcuts), exported by
  `torch.onnx.export(dynamo=True, optimize=True)`, whose optimizer folds BatchNorm into Conv.

The digits come from the files slimgraph ships (scikit-learn's 8x8 digits, split 1347/450); the
training rows are split again into 1147 training and 200 validation rows (seeded).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import nn
from torch.nn import functional as F

import slimgraph as sg
from slimgraph.ir.names import annotate_layers

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "slimgraph" / "data"
SIZE = 16
VAL_ROWS = 200

__all__ = ["HOLDOUT", "Split", "digits_split", "train_teacher", "export", "build", "run_holdout"]


@dataclass
class Split:
    """The digits at 16x16: tensors for the torch side and .npz paths for slimgraph."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train: Path
    val: Path
    test: Path
    calib: Path


def _upsample(images: np.ndarray) -> np.ndarray:
    tensor = torch.from_numpy(images.astype(np.float32))
    return F.interpolate(tensor, size=(SIZE, SIZE), mode="bilinear", align_corners=False).numpy()


def digits_split(folder: Path) -> Split:
    """Write train/val/test/calib .npz files (input `image` [N, 1, 16, 16]) into `folder`."""
    with np.load(DATA / "digits_train.npz") as archive:
        images, labels = _upsample(archive["image"]), archive["labels"]
    with np.load(DATA / "digits_test.npz") as archive:
        test_x, test_y = _upsample(archive["image"]), archive["labels"]
    order = np.random.default_rng(0).permutation(len(images))
    val, train = order[:VAL_ROWS], order[VAL_ROWS:]
    paths = {}
    for name, x, y in (("train", images[train], labels[train]), ("val", images[val], labels[val]),
                       ("test", test_x, test_y)):  # fmt: skip
        paths[name] = folder / f"holdout_{name}.npz"
        np.savez(paths[name], image=x, labels=y)
    paths["calib"] = folder / "holdout_calib.npz"
    np.savez(paths["calib"], image=images[train][:200])
    return Split(
        torch.from_numpy(images[train]), torch.from_numpy(labels[train]),
        torch.from_numpy(images[val]), torch.from_numpy(labels[val]),
        torch.from_numpy(test_x), torch.from_numpy(test_y),
        paths["train"], paths["val"], paths["test"], paths["calib"],
    )  # fmt: skip


# --- the models --------------------------------------------------------------------------------


class _Basic(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class HoldoutResNet(nn.Module):
    """ResNet-style: 3x3 stem, 3 stages of 2 basic blocks (16, 32, 64), GAP, FC."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())  # fmt: skip
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for i, width in enumerate(widths):
            blocks += [_Basic(c_in, width, 1 if i == 0 else 2), _Basic(width, width, 1)]
            c_in = width
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class _Inverted(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.residual = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class HoldoutMobileNet(nn.Module):
    """MobileNetV2-style: stem, 6 inverted residuals with depthwise 3x3 (expand 4), 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        settings = ((16, 1), (24, 2), (24, 1), (32, 2), (32, 1), (48, 1))
        layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                   nn.ReLU6()]  # fmt: skip
        c_in = 16
        for c_out, stride in settings:
            layers.append(_Inverted(c_in, c_out, stride, 4))
            c_in = c_out
        layers += [nn.Conv2d(c_in, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class HoldoutVGG(nn.Module):
    """VGG-style: (conv-BN-ReLU) x 2, pool, x 2, pool, x 2, pool, then two linear layers."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU()]  # fmt: skip
                c_in = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(c_in * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.flatten(self.features(x), 1))))


class _Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * 4
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + identity)


class HoldoutBottleneck(nn.Module):
    """ResNet-50-style: stem, 3 stages of bottleneck blocks (widths 8/16/32, x4 expansion)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        c_in = 16
        for i, width in enumerate((8, 16, 32)):
            stride = 1 if i == 0 else 2
            blocks += [_Bottleneck(c_in, width, stride), _Bottleneck(width * 4, width, 1)]
            c_in = width * 4
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


# name -> (constructor, export: "bn" keeps BatchNorm, "fold" folds it in torch, "exporter" lets
# torch.onnx's optimizer fold it; the classifier Torch-Pruning must leave alone)
HOLDOUT: dict[str, tuple[Callable[[], nn.Module], str, str]] = {
    "resnet": (HoldoutResNet, "bn", "fc"),
    "mobilenet": (HoldoutMobileNet, "bn", "classifier"),
    "vgg": (HoldoutVGG, "fold", "fc2"),
    "bottleneck": (HoldoutBottleneck, "exporter", "fc"),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return HOLDOUT[name][0]()


def train_teacher(net: nn.Module, split: Split, *, epochs: int = 30, seed: int = 0) -> nn.Module:
    """A plain torch loop: AdamW 3e-3 (weight decay 1e-4), one-cycle schedule, batch 64, CE."""
    torch.manual_seed(seed)
    x, y = split.train_x, split.train_y
    steps = -(-len(x) // 64)
    optimizer = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * steps)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), 64):
            index = order[start : start + 64]
            if len(index) < 2:
                continue
            loss = F.cross_entropy(net(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval()


def _fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of `net` with every Conv2d -> BatchNorm2d pair of a Sequential folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(net).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.children())
        for i in range(len(children) - 1):
            conv, bn = children[i], children[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module[i] = fuse_conv_bn_eval(conv, bn)
                module[i + 1] = nn.Identity()
    return folded


def export(name: str, net: nn.Module) -> ir.Model:
    """The trained `net` as ONNX, BatchNorm kept or folded as `HOLDOUT[name]` says."""
    how = HOLDOUT[name][1]
    example = (torch.zeros(2, 1, SIZE, SIZE),)
    if how == "bn":
        return sg.from_torch(net, example, input_names=["image"])
    if how == "fold":
        model = sg.from_torch(_fold_batchnorm(net), example, input_names=["image"])
    else:
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                net, example, dynamo=True, optimize=True, verbose=False,
                dynamic_shapes=({0: torch.export.Dim("batch")},), input_names=["image"],
            )  # fmt: skip
        assert program is not None
        model = program.model
        annotate_layers(model)
    ops = {n.op_type for n in model.graph}
    assert "BatchNormalization" not in ops, f"{name}: BatchNorm was not folded"
    return model


# --- the comparison (`benchmarks/finetune.py --holdout`) ---------------------------------------

EPOCHS, BATCH, LR = 10, 64, 1e-3
PRUNE, RANK = 0.5, 0.25
MARGIN_TP = 0.003  # at least Torch-Pruning's accuracy, within 0.3 points
MARGIN_UNPRUNED = 0.01  # within 1 point of the unpruned model
MARGIN_LOWRANK = 0.02  # low-rank: within 2 points of the unfactorized model
TIME_RATIO = 1.5


def teacher(name: str, split: Split, cache: Path) -> nn.Module:
    """The trained torch model `name`, from `cache` when it was trained before."""
    path = cache / f"holdout_{name}.pt"
    net = build(name)
    if path.exists():
        net.load_state_dict(torch.load(path))
        return net.eval()
    net = train_teacher(net, split)
    torch.save(net.state_dict(), path)
    return net


def torch_pruning_loop(name: str, net: nn.Module, split: Split, *, seed: int = 0
                       ) -> tuple[float, float]:  # fmt: skip
    """Torch-Pruning (group L1, ratio 0.5, classifier kept) + a plain loop: AdamW 1e-3 (torch's
    defaults otherwise), constant rate, batch 64, cross-entropy, 10 epochs.
    Returns (test accuracy, median seconds per epoch)."""
    import time

    import torch_pruning as tp

    net = copy.deepcopy(net).eval()
    pruner = tp.pruner.MetaPruner(
        net, torch.zeros(1, 1, SIZE, SIZE), importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=PRUNE, ignored_layers=[getattr(net, HOLDOUT[name][2])],
    )  # fmt: skip
    pruner.step()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR)
    x, y = split.train_x, split.train_y
    seconds = []
    for _ in range(EPOCHS):
        start = time.perf_counter()
        net.train()
        order = torch.randperm(len(x))
        for first in range(0, len(x), BATCH):
            index = order[first : first + BATCH]
            if len(index) < 2:
                continue
            loss = F.cross_entropy(net(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    net.eval()
    with torch.no_grad():
        accuracy = float((net(split.test_x).argmax(1) == split.test_y).float().mean())
    return accuracy, float(np.median(seconds))


def run_holdout(names: list[str], cache: Path, *, ablation: bool = True) -> bool:
    """Print the held-out comparison; True when every target holds."""
    import slimgraph.runtime.torch_backend._lr_range as lr_range
    from slimgraph._tables import render_table
    from slimgraph.runtime.metrics import evaluate, load_data

    cache.mkdir(parents=True, exist_ok=True)
    split = digits_split(cache)
    rows, evidence, ok = [], [], True

    def finetune(model: ir.Model, teacher_model: ir.Model, **options: object) -> tuple:
        return sg.finetune_with_report(model, split.train, teacher=teacher_model, val=split.val,
                                       epochs=EPOCHS, progress=False, **options)  # type: ignore[arg-type]

    for name in names:
        net = teacher(name, split, cache)
        model = export(name, net)
        test = load_data(split.test, model)

        def accuracy(m: ir.Model, test: object = test) -> float:
            return evaluate(m, test).accuracy or 0.0  # type: ignore[arg-type]

        base = accuracy(model)
        tp_accuracy, tp_seconds = torch_pruning_loop(name, net, split)
        pruned = sg.prune(model, ratio=PRUNE)
        recovered, report = finetune(pruned, model)
        ours = accuracy(recovered)
        ratio = report.seconds_per_epoch / tp_seconds
        low = sg.factorize(model, rank_ratio=RANK)
        low_recovered, low_report = finetune(low, model)
        low_accuracy = accuracy(low_recovered)
        ptq = sg.quantize(model, calibration=split.calib, progress=False)
        qat, qat_report = finetune(ptq, model)
        prune_ok = ours >= tp_accuracy - MARGIN_TP and ours >= base - MARGIN_UNPRUNED
        low_ok = low_accuracy >= base - MARGIN_LOWRANK
        qat_ok = (qat_report.after or 0.0) >= (qat_report.before or 0.0)
        time_ok = ratio <= TIME_RATIO
        ok &= prune_ok and low_ok and qat_ok and time_ok
        how = {"bn": "BatchNorm kept", "fold": "BatchNorm folded (torch)",
               "exporter": "BatchNorm folded (exporter)"}[HOLDOUT[name][1]]  # fmt: skip
        rows.append([
            f"{name} ({how})", f"{base:.2%}", f"{tp_accuracy:.2%}", f"{ours:.2%}",
            "PASS" if prune_ok else "FAIL", f"{ratio:.2f}x {'PASS' if time_ok else 'FAIL'}",
            f"{low_accuracy:.2%} {'PASS' if low_ok else 'FAIL'}",
            f"{qat_report.before:.2%} -> {qat_report.after:.2%} {'PASS' if qat_ok else 'FAIL'}",
        ])  # fmt: skip
        print(f"{name}: unpruned {base:.2%}, Torch-Pruning + CE {tp_accuracy:.2%} "
              f"({tp_seconds:.2f} s/epoch), slimgraph prune + KD {ours:.2%} "
              f"({report.seconds_per_epoch:.2f} s/epoch; {report.history.lr:.3g} lr, "
              f"{report.history.unfolded} convs with batch statistics), low-rank + KD "
              f"{low_accuracy:.2%} (lr {low_report.history.lr:.3g}), QAT val "
              f"{qat_report.before:.2%} -> {qat_report.after:.2%} (lr {qat_report.history.lr:.3g}, "
              f"kept epoch {qat_report.history.kept})", flush=True)  # fmt: skip
        if not ablation:
            continue
        # What each fix contributes: the old defaults (lr 1e-3; BatchNorm-folded convolutions
        # trained without batch statistics), each fix alone, and the range test's old divisor.
        folded = bool(report.history.unfolded)
        variants: list[tuple[str, dict[str, object]]] = [
            ("old defaults (lr 1e-3" + (", no batch statistics)" if folded else ")"),
             {"lr": 1e-3, "unfold_batchnorm": False}),
        ]  # fmt: skip
        if folded:
            variants += [("lr 1e-3 + batch statistics", {"lr": 1e-3}),
                         ("range test, no batch statistics", {"unfold_batchnorm": False})]
        mine = []
        for label, options in variants:
            trained, _ = finetune(pruned, model, **options)
            mine.append([name, label, f"{accuracy(trained):.2%}"])
        below = lr_range.BELOW
        try:
            lr_range.BELOW = 10.0
            trained, rep = finetune(pruned, model)
            mine.append([name, f"range test, lowest-loss rate / 10 (lr {rep.history.lr:.3g})",
                         f"{accuracy(trained):.2%}"])  # fmt: skip
        finally:
            lr_range.BELOW = below
        mine.append([name, f"defaults: range test, lowest-loss rate / {below:g} (lr "
                     f"{report.history.lr:.3g})" + (", batch statistics" if folded else ""),
                     f"{ours:.2%}"])  # fmt: skip
        print(render_table(["model", "prune 0.5 + KD, 10 epochs", "test"], mine, align="llr"),
              flush=True)  # fmt: skip
        evidence += mine
    print()
    print(f"held-out digits CNNs: prune {PRUNE} + KD / low-rank {RANK} + KD / QAT from PTQ, "
          f"{EPOCHS} epochs, slimgraph defaults (teacher KD, val for the kept epoch) against "
          f"Torch-Pruning + a plain torch loop (AdamW {LR}, batch {BATCH}, cross-entropy)")
    print(render_table(
        ["model", "unpruned", "TP + CE", "prune+KD", "target", "s/epoch vs TP", "low-rank+KD",
         "QAT val (PTQ ->)"], rows, align="lrrrlrrr",
    ))  # fmt: skip
    print(f"targets: prune+KD >= TP + CE - {MARGIN_TP * 100:.1f} points and >= unpruned - "
          f"{MARGIN_UNPRUNED * 100:.0f} point; s/epoch <= {TIME_RATIO}x the torch loop's "
          f"(training only; the machine may be shared); low-rank+KD >= unfactorized - "
          f"{MARGIN_LOWRANK * 100:.0f} points; QAT val >= PTQ val")
    if evidence:
        print()
        print("evidence (prune 0.5 + KD, test accuracy):")
        print(render_table(["model", "variant", "test"], evidence, align="llr"))
    return ok
