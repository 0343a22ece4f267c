"""Backbones written in plain torch (torchvision/timm do not run on these machines, stack-notes.md).

Every model exposes `features(x)` (the penultimate representation, used by MixNN's neighbours) and
`forward(x) = head(features(x))`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers (w, 2w, 4w channels) with a 2x2 pool after each of the first two,
    global average pooling and a linear head.

    Sized for 8x8 (digits) to 28x28 (MNIST family) inputs on a CPU: pooling right after the first
    conv keeps the costly layers at 14x14 and 7x7.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(in_channels, width), nn.MaxPool2d(2),
            _conv_bn(width, 2 * width), nn.MaxPool2d(2),
            _conv_bn(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.feature_dim = 4 * width
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., 2016): BN-ReLU-conv twice, identity or 1x1 shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for 32x32 inputs, the backbone of the CIFAR noisy-label literature."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        layers, c_in = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for block in range(2):
                layers.append(PreActBlock(c_in, c_out, stride=2 if stage > 0 and block == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c_in)
        self.feature_dim = c_in
        self.head = nn.Linear(c_in, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.stem(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


MODELS = {"small_cnn": SmallCNN, "preact_resnet18": PreActResNet18}
MODEL_CHOICES = ("auto", *MODELS)


def create_model(name: str, in_channels: int, num_classes: int, image_size: int, width: int = 0) -> nn.Module:
    """Build a backbone by name; `auto` picks the small CNN below 32 pixels and PreAct ResNet-18 from 32."""
    if name == "auto":
        name = "small_cnn" if image_size < 32 else "preact_resnet18"
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of auto, {', '.join(MODELS)}")
    kwargs = {"width": width} if width else {}
    # channels_last: oneDNN's fast convolution layout on CPU (benchmarks/results/step_cost.md) and the
    # tensor-core layout on GPU; inputs of any layout work.
    return MODELS[name](in_channels, num_classes, **kwargs).to(memory_format=torch.channels_last)
