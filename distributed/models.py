"""Backbones written in plain torch (torchvision/timm do not run on these machines, stack-notes.md).

Every model exposes `features(x)` (the penultimate representation, used by MixNN's neighbours) and
`forward(x) = head(features(x))`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

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


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), named as torchvision names it."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    """ResNet-50 for ImageNet-size inputs (the Clothing1M / WebVision backbone), with torchvision's
    state_dict keys (conv1, bn1, layer1..layer4, fc), so torchvision's ImageNet weights load as they are."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in = width
        for stage, (blocks, stride) in enumerate(((3, 1), (4, 2), (6, 2), (3, 2)), 1):
            layers = []
            for block in range(blocks):
                layers.append(Bottleneck(c_in, width * 2 ** (stage - 1), stride if block == 0 else 1))
                c_in = width * 2 ** (stage - 1) * Bottleneck.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.feature_dim = c_in
        self.fc = nn.Linear(c_in, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class PretrainedError(ValueError):
    """A pretrained-weights file that cannot be read or does not fit the model."""


# The classifier of a backbone: trained anew for the dataset's classes, never taken from a pretrained file.
HEAD_PREFIXES = ("fc.", "head.")


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy every weight but the classifier from a state_dict file (torchvision's layout for ResNet-50;
    a plain state_dict or one under "state_dict" / "model"), read with weights_only=True. A missing or
    extra key, or a shape that differs, is named."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        raise PretrainedError(f"cannot read pretrained weights {path}: {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict):
        raise PretrainedError(f"{path} holds a {type(loaded).__name__}, not a state_dict")
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIXES)}
    theirs = {k.removeprefix("module."): v for k, v in loaded.items() if not k.startswith(HEAD_PREFIXES)}
    for key in own:
        if key not in theirs:
            raise PretrainedError(f"{path} lacks {key} of the model (first of {len(set(own) - set(theirs))} missing keys)")
        if tuple(theirs[key].shape) != tuple(own[key].shape):
            raise PretrainedError(f"{path}: {key} has shape {tuple(theirs[key].shape)}, the model's is "
                                  f"{tuple(own[key].shape)}")
    extra = sorted(set(theirs) - set(own))
    if extra:
        raise PretrainedError(f"{path} holds {extra[0]}, which the model has no place for ({len(extra)} extra keys)")
    model.load_state_dict({**model.state_dict(), **{k: theirs[k] for k in own}})
    return model


MODELS = {"small_cnn": SmallCNN, "preact_resnet18": PreActResNet18, "resnet50": ResNet50}
MODEL_CHOICES = ("auto", *MODELS)


def auto_model(image_size: int) -> str:
    """The small CNN below 32 pixels, PreAct ResNet-18 (CIFAR stem) from 32, ResNet-50 from 128."""
    return "small_cnn" if image_size < 32 else "preact_resnet18" if image_size < 128 else "resnet50"


def create_model(name: str, in_channels: int, num_classes: int, image_size: int, width: int = 0,
                 pretrained: str | None = None) -> nn.Module:
    """Build a backbone by name (`auto`: auto_model), optionally with pretrained weights."""
    if name == "auto":
        name = auto_model(image_size)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of auto, {', '.join(MODELS)}")
    kwargs = {"width": width} if width else {}
    model = MODELS[name](in_channels, num_classes, **kwargs)
    if pretrained:
        load_pretrained(model, pretrained)
    # channels_last: oneDNN's fast convolution layout on CPU (benchmarks/results/step_cost.md) and the
    # tensor-core layout on GPU; inputs of any layout work.
    return model.to(memory_format=torch.channels_last)
