"""Small real architectures for tests and benchmarks (torchvision does not work beside our torch).

Each is the real structure in miniature: residual blocks with BatchNorm, dense concat blocks,
inverted residuals with depthwise convs, grouped convs with channel shuffle, a transformer encoder
with an attention mask. Sizes are small so exports and runs take a second or less.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "BasicBlock",
    "ResNetTiny",
    "resnet18_style",
    "resnet18",
    "DenseNetTiny",
    "MobileNetV2Tiny",
    "mobilenet_v2",
    "GroupedConvNet",
    "TransformerMLP",
    "BertStyleEncoder",
    "ConvTransposeNet",
    "DigitsTransformer",
    "TORCH_MODELS",
    "example_input",
    "fit_batchnorm",
]


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNetTiny(nn.Module):
    """ResNet-18 layout (stem, 4 stages of 2 basic blocks, GAP, FC) with configurable widths."""

    def __init__(
        self, widths: tuple[int, ...] = (8, 16, 32, 64), blocks: int = 2, classes: int = 10,
        imagenet_stem: bool = False,
    ) -> None:
        super().__init__()
        if imagenet_stem:  # 7x7 stride-2 conv, then 3x3 stride-2 max pooling: 224 -> 56
            self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
            self.pool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.pool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        c_in = widths[0]
        for i, width in enumerate(widths):
            layers = [BasicBlock(c_in, width, 1 if i == 0 else 2)]
            layers += [BasicBlock(width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            c_in = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def resnet18_style(classes: int = 1000) -> ResNetTiny:
    """Real ResNet-18 widths (64..512) on a stride-1 3x3 stem (no downsampling before stage 1:
    27 GMACs at 224x224), for benchmarks."""
    return ResNetTiny((64, 128, 256, 512), 2, classes)


def resnet18(classes: int = 1000) -> ResNetTiny:
    """torchvision's ResNet-18 layout: 7x7 stride-2 stem and max pooling, widths 64..512
    (11.7 M parameters, 1.8 GMACs at 224x224)."""
    return ResNetTiny((64, 128, 256, 512), 2, classes, imagenet_stem=True)


class _DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class DenseNetTiny(nn.Module):
    """Dense blocks (concat of all previous features) with a transition and a flatten head."""

    def __init__(self, growth: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        layers, c = [], 16
        for _ in range(3):
            layers.append(_DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*layers)
        self.transition = nn.Sequential(
            nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 16, 1, bias=False), nn.AvgPool2d(2)
        )
        self.block2 = nn.Sequential(_DenseLayer(16, growth), _DenseLayer(16 + growth, growth))
        self.norm = nn.BatchNorm2d(16 + 2 * growth)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear((16 + 2 * growth) * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = self.pool(F.relu(self.norm(x)))
        return self.fc(torch.flatten(x, 1))


class _InvertedResidual(nn.Module):
    def __init__(
        self, c_in: int, c_out: int, stride: int, expand: int, unit_expansion: bool = True
    ) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        expansion: list[nn.Module] = []
        if expand != 1 or unit_expansion:  # torchvision has no 1x1 conv when expand == 1
            expansion = [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                         nn.ReLU6()]
        self.conv = nn.Sequential(
            *expansion,
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Tiny(nn.Module):
    """MobileNetV2 layout: inverted residuals with depthwise 3x3, ReLU6, linear bottlenecks."""

    def __init__(
        self,
        width: float = 0.25,
        classes: int = 10,
        settings: tuple[tuple[int, int, int, int], ...] = (
            (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1)
        ),
        last_channels: int = 320,
        unit_expansion: bool = True,
    ) -> None:
        super().__init__()

        def c(n: int) -> int:
            return max(8, int(n * width) // 8 * 8)
        layers: list[nn.Module] = [
            nn.Conv2d(3, c(32), 3, 2, 1, bias=False),
            nn.BatchNorm2d(c(32)),
            nn.ReLU6(),
        ]
        c_in = c(32)
        for expand, channels, repeats, stride in settings:
            for i in range(repeats):
                layers.append(_InvertedResidual(c_in, c(channels), stride if i == 0 else 1, expand,
                                                unit_expansion))
                c_in = c(channels)
        last = c(last_channels)
        layers += [nn.Conv2d(c_in, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean((2, 3))
        return self.classifier(x)


def mobilenet_v2(classes: int = 1000) -> MobileNetV2Tiny:
    """torchvision's MobileNetV2 layout at width 1.0: 17 inverted residual blocks up to 320
    channels, a 1280-channel head (3.5 M parameters, 0.3 GMACs at 224x224)."""
    settings = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))
    return MobileNetV2Tiny(1.0, classes, settings, last_channels=1280, unit_expansion=False)


class GroupedConvNet(nn.Module):
    """ShuffleNet-like: grouped 1x1 convs, a channel shuffle (reshape/transpose), depthwise 3x3."""

    def __init__(self, groups: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.groups = groups
        self.stem = nn.Conv2d(3, 32, 3, 1, 1)
        self.gconv1 = nn.Conv2d(32, 32, 1, groups=groups)
        self.bn1 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, 1, 1, groups=32)
        self.gconv2 = nn.Conv2d(32, 32, 1, groups=groups)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = F.relu(self.bn1(self.gconv1(x)))
        n, ch, h, w = y.shape
        y = y.reshape(n, self.groups, ch // self.groups, h, w).transpose(1, 2).reshape(n, ch, h, w)
        y = self.bn2(self.gconv2(self.dw(y)))
        x = F.relu(x + y)
        return self.fc(x.mean((2, 3)))


class TransformerMLP(nn.Module):
    """Two transformer feed-forward blocks (Linear, GELU, Linear) with residuals and LayerNorm."""

    def __init__(self, dim: int = 32, hidden: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(dim),
                    "fc1": nn.Linear(dim, hidden),
                    "fc2": nn.Linear(hidden, dim),
                }
            )
            for _ in range(layers)
        )
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["fc2"](F.gelu(block["fc1"](block["norm"](x))))
        return self.head(x)


class _EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, s, h, d // h).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / (d // h) ** 0.5 + mask_bias
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, s, d)
        x = self.norm1(x + self.out(context))
        return self.norm2(x + self.fc2(F.gelu(self.fc1(x))))


class BertStyleEncoder(nn.Module):
    """BERT-style encoder: token + position embeddings, attention mask, N layers, mean pooling.

    Inputs are `input_ids` (int64, [batch, seq]) and `attention_mask` (int64, 1 = token); the mask
    becomes an additive bias through a comparison and `where`, as HF models export it.
    """

    def __init__(
        self,
        vocab: int = 1000,
        dim: int = 64,
        heads: int = 4,
        hidden: int = 256,
        layers: int = 2,
        max_len: int = 128,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(_EncoderLayer(dim, heads, hidden) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.embed(input_ids) + self.position(positions))
        keep = attention_mask[:, None, None, :] > 0
        mask_bias = torch.where(keep, 0.0, torch.finfo(torch.float32).min).to(x.dtype)
        for layer in self.layers:
            x = layer(x, mask_bias)
        weights = attention_mask[..., None].to(x.dtype)
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class ConvTransposeNet(nn.Module):
    """A small decoder: Conv down, ConvTranspose up with BatchNorm (weight axis 1 is C_out)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 16, 3, 2, 1)
        self.up = nn.ConvTranspose2d(16, 8, 4, 2, 1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.up(F.relu(self.down(x))))))


def example_input(name: str, batch: int = 1) -> tuple[torch.Tensor, ...]:
    """Example inputs for a model in TORCH_MODELS."""
    generator = torch.Generator().manual_seed(0)
    if name == "bert":
        ids = torch.randint(0, 1000, (batch, 16), generator=generator)
        mask = torch.ones(batch, 16, dtype=torch.int64)
        mask[:, 12:] = 0
        return ids, mask
    if name == "mlp":
        return (torch.randn(batch, 8, 32, generator=generator),)
    return (torch.randn(batch, 3, 32, 32, generator=generator),)


def _randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics, as after training (fresh ones are identity)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            with torch.no_grad():
                layer.weight.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)
                layer.bias.copy_(torch.randn(layer.num_features, generator=generator) * 0.1)
                layer.running_mean.copy_(torch.randn(layer.num_features, generator=generator) * 0.1)
                layer.running_var.copy_(torch.rand(layer.num_features, generator=generator) + 0.5)
    return module


def fit_batchnorm(module: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Set BatchNorm running statistics from `batches`, as training would, then eval mode.

    Random conv weights shrink or grow the signal layer after layer; with statistics that do
    not match, a deep random network (MobileNetV2's 52 convs) outputs nearly the same logits
    for every input and top-1 agreement measures noise. Fitted statistics keep every layer's
    output normalized, like a trained network's.
    """
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the batches
    module.train()
    with torch.no_grad():
        for batch in batches:
            module(batch)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    return module.eval()


def build(name: str) -> nn.Module:
    """A seeded, eval-mode instance of a model in TORCH_MODELS."""
    torch.manual_seed(0)
    return _randomize_batchnorm(TORCH_MODELS[name]()).eval()


TORCH_MODELS = {
    "resnet": ResNetTiny,
    "densenet": DenseNetTiny,
    "mobilenetv2": MobileNetV2Tiny,
    "grouped": GroupedConvNet,
    "mlp": TransformerMLP,
    "bert": BertStyleEncoder,
    "convtranspose": ConvTransposeNet,
}


class DigitsTransformer(nn.Module):
    """A transformer classifier for 8x8 digits: each image row is a token of 8 features.

    Linear token embedding plus learned positions, `layers` encoder layers (multi-head attention
    and a GELU MLP, post-LayerNorm, as `BertStyleEncoder`'s), mean pooling, linear head. Input
    `image` float32 [N, 1, 8, 8] (the bundled digits files), output [N, 10] class scores.
    """

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.position = nn.Parameter(torch.zeros(1, 8, dim))
        self.layers = nn.ModuleList(_EncoderLayer(dim, heads, hidden) for _ in range(layers))
        self.head = nn.Linear(dim, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.embed(image.reshape(image.shape[0], 8, 8)) + self.position
        no_mask = torch.zeros((), dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, no_mask)
        return self.head(x.mean(1))

