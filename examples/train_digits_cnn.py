"""Train the bundled demo model: a small residual CNN on scikit-learn's handwritten digits.

The digits data set (1,797 real 8x8 scans, bundled with scikit-learn, no download) is split 75/25,
stratified, with a fixed seed; the CNN (BatchNorm, two residual blocks) trains on the 75% and is
exported with slimgraph's torch frontend (dynamic batch). Writes, into slimgraph/data/:

- digits_cnn.onnx: the fp32 model, input `image` float32[batch, 1, 8, 8] (pixels / 16)
- digits_train.npz: the training 75%: `image` and `labels` (int64), for fine-tuning
- digits_test.npz: the held-out 25%: `image` and `labels` (int64)
- digits_calib.npz: 200 training images for calibration (`image` only)

Run: python examples/train_digits_cnn.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F

import slimgraph as sg

DATA = Path(__file__).resolve().parents[1] / "slimgraph" / "data"
SEED = 0


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class DigitsCNN(nn.Module):
    """Stem conv, two residual blocks, a strided conv, global average pool, linear classifier."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = ResidualBlock(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.block2 = ResidualBlock(2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.down(self.block1(self.stem(image))))
        return self.fc(x.mean((2, 3)))


def main() -> None:
    torch.manual_seed(SEED)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, stratify=labels, random_state=SEED
    )
    model = DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    epochs = 40
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=epochs * ((len(x_train) + 63) // 64)
    )
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xt))
        for start in range(0, len(xt), 64):
            idx = order[start : start + 64]
            batch = xt[idx]
            shift = torch.randint(-1, 2, (2,))  # light augmentation: shift by one pixel
            batch = torch.roll(batch, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
            loss = F.cross_entropy(model(batch), yt[idx], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"torch test accuracy: {accuracy:.4f} on {len(y_test)} held-out digits")
    onnx_model = sg.from_torch(
        model, (torch.from_numpy(x_test[:2]),),
        dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
    )
    DATA.mkdir(parents=True, exist_ok=True)
    sg.save(onnx_model, DATA / "digits_cnn.onnx")
    np.savez_compressed(DATA / "digits_train.npz", image=x_train, labels=y_train)
    np.savez_compressed(DATA / "digits_test.npz", image=x_test, labels=y_test)
    calib = np.random.default_rng(SEED).choice(len(x_train), 200, replace=False)
    np.savez_compressed(DATA / "digits_calib.npz", image=x_train[calib])
    print(f"wrote {DATA / 'digits_cnn.onnx'}, digits_train.npz, digits_test.npz, digits_calib.npz")


if __name__ == "__main__":
    main()
