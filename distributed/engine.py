"""The training step, the epoch over a batch stream, and evaluation: plain torch, no Ray.

The Ray Train worker, the fold tasks and the tests all call these functions; Ray only schedules them.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from noisymix.distributed.heap import trimmed
from noisymix.distributed.images import JpegCrops
from noisymix.distributed.models import MODEL_CHOICES, create_model
from noisymix.distributed.shards import NpyImages
from noisymix.mixing.config import ConfigError, Section, check_choice, check_range
from noisymix.mixing.losses import soft_target_cross_entropy

# ids, uint8 images (N, H, W, C; a tensor when they come from loader processes), labels
Batch = tuple[np.ndarray, np.ndarray | torch.Tensor, np.ndarray]


SCHEDULES = ("cosine", "multistep")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class TrainSection(Section):
    """The model, the optimiser and its schedule, augmentation and the stream's shuffle: read by the
    training workers and, with the fold schedule's length, by the fold tasks."""

    model: str = "auto"            # auto: small_cnn below 32 px, preact_resnet18 from 32, resnet50 from 128
    width: int = 0                 # 0: the model's default width
    pretrained: Optional[str] = None   # a state_dict file (torchvision's ResNet-50 layout); the classifier is new
    epochs: int = 30
    batch_size: int = 128
    eval_batch_size: int = 0       # passes without gradient (evaluation, held-out folds, loss passes); 0 = batch_size
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list = field(default_factory=list)
    gamma: float = 0.1
    crop_padding: int = -1         # -1: an eighth of the image side (npy datasets: pad-and-crop on the device)
    hflip: bool = False
    crop_size: int = 0             # JPEG datasets: RandomResizedCrop / centre-crop side; 0 = 224
    crop_scale: float = 0.08       # JPEG datasets: the smallest share of the image a training crop covers
    amp: bool = False
    shuffle_buffer: int = 2000

    def validate(self) -> None:
        super().validate()
        check_choice("model", self.model, MODEL_CHOICES)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        check_range("gamma", self.gamma, 0.0, 1.0, lo_open=True)
        check_range("lr", self.lr, 0.0, None, lo_open=True)
        for key in ("epochs", "batch_size"):
            check_range(key, getattr(self, key), 1)
        for key in ("width", "shuffle_buffer", "weight_decay", "crop_size", "eval_batch_size"):
            check_range(key, getattr(self, key), 0)
        check_range("crop_scale", self.crop_scale, 0.0, 1.0, lo_open=True)
        if self.crop_padding < -1:
            raise ConfigError(f"crop_padding must be -1 (auto) or >= 0, got {self.crop_padding}")
        if not all(isinstance(m, int) and m > 0 for m in self.milestones) or self.milestones != sorted(self.milestones):
            raise ConfigError(f"milestones must be increasing positive epochs, got {self.milestones!r}")

    @property
    def eval_batch(self) -> int:
        """Samples per batch of a pass without gradient: a training step's unless set, so that the pass reuses the
        blocks a step frees instead of growing the heap (with 4x batches a fold task peaked 110-210 MB higher at 20k-80k
        images: benchmarks/results/findings.md, Memory and the allocator)."""
        return self.eval_batch_size or self.batch_size


DEFAULT_CROP = 224


@dataclass(frozen=True)
class DataInfo:
    """What training reads of a prepared dataset's manifest: classes, the model's input side and channels,
    normalisation, counts, and whether images are npy arrays or JPEGs cropped in the loader."""

    num_classes: int
    height: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    counts: dict
    image_format: str = "npy"

    @classmethod
    def from_manifest(cls, manifest: dict, crop_size: int = 0) -> "DataInfo":
        if manifest.get("image_format") == "jpeg":
            height, channels = crop_size or DEFAULT_CROP, 3
        else:
            height, _, channels = manifest["image_shape"]
        return cls(manifest["num_classes"], height, channels, tuple(manifest["mean"]), tuple(manifest["std"]),
                   {split: info["count"] for split, info in manifest["splits"].items()},
                   manifest.get("image_format", "npy"))


def build_model(train: TrainSection, data: DataInfo) -> nn.Module:
    return create_model(train.model, data.channels, data.num_classes, data.height, train.width, train.pretrained)


def image_stages(train: TrainSection, data: DataInfo, seed: int, epoch: int = 0):
    """(training, evaluation) image stages of the loader: npy arrays as they are (augmented on the device),
    or JPEG crops decoded in the loader (distributed.images.JpegCrops)."""
    if data.image_format != "jpeg":
        return NpyImages(), NpyImages()
    return (JpegCrops(data.height, train=True, crop_scale=train.crop_scale, seed=seed, epoch=epoch),
            JpegCrops(data.height, train=False))


def build_schedule(optimizer: torch.optim.Optimizer, schedule: str, epochs: int, milestones: list[int],
                   gamma: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, epochs, milestones, gamma))


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def transforms(train: TrainSection, data: DataInfo) -> tuple["InputTransform", "InputTransform"]:
    """(training transform, evaluation transform) on the device: normalisation (ImageNet's constants for a
    pretrained model, else the dataset's), and for npy datasets the configured pad-and-crop and flip (JPEG
    crops and flips happen in the loader)."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if train.pretrained else (data.mean, data.std)
    if data.image_format == "jpeg":
        return InputTransform(mean, std), InputTransform(mean, std)
    return InputTransform(mean, std, resolve_padding(train.crop_padding, data.height), train.hflip), InputTransform(mean, std)


def epoch_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """The generator of one rank's epoch: a function of (seed, epoch, rank), so a resumed run repeats it."""
    return np.random.default_rng([seed, epoch, rank])


@dataclass(frozen=True)
class InputTransform:
    """uint8 NHWC images -> normalised float NCHW on the device, with optional crop/flip augmentation."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int = 0
    hflip: bool = False

    def __call__(self, images: np.ndarray | torch.Tensor, device: torch.device,
                 rng: np.random.Generator | None = None) -> torch.Tensor:
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        x = x.to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        x = (x - mean) / std
        if rng is not None:
            x = random_crop_flip(x, self.padding, self.hflip, rng)
        return x


def resolve_padding(crop_padding: int, image_size: int) -> int:
    """crop_padding = -1 means one eighth of the image side (4 px at 32, 3 at 28, 1 at 8)."""
    return crop_padding if crop_padding >= 0 else max(1, image_size // 8)


def random_crop_flip(x: torch.Tensor, padding: int, hflip: bool, rng: np.random.Generator) -> torch.Tensor:
    """Per-sample random crop after zero padding (of the normalised image), and a random horizontal flip."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        dy = torch.from_numpy(rng.integers(0, 2 * padding + 1, size=n)).to(x.device)
        dx = torch.from_numpy(rng.integers(0, 2 * padding + 1, size=n)).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, channel, rows, cols]
    if hflip:
        flip = torch.from_numpy(rng.random(n) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with Nesterov-free momentum and weight decay on every parameter, as the papers train."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def lr_factor(schedule: str, epochs: int, milestones: list[int], gamma: float) -> Callable[[int], float]:
    """Multiplier of the base learning rate at an epoch: cosine to zero, or steps of gamma at milestones."""
    if schedule == "cosine":
        return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "multistep":
        return lambda epoch: gamma ** sum(epoch >= m for m in milestones)
    raise ValueError(f"unknown schedule {schedule!r}")


def tune_convolutions(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape and keep the fastest, as timm's
    trainer does: a run's crop and batch sizes are fixed, so the search is paid in the first steps. For ResNet-50
    in bf16 on an H200 it found nothing faster than the heuristics (benchmarks/results/gpu_check.md). GPU steps
    were not bit-reproducible before either (atomic adds in the backward pass)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when asked; a no-op elsewhere (CPU autocast is slower than fp32 here)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
               amp: bool = False, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = soft_target_cross_entropy
               ) -> torch.Tensor:
    """One optimizer step on `loss_fn(logits, targets)` (soft-target cross-entropy unless the method's batch rule
    says otherwise); returns the detached mean loss."""
    model.train()
    with autocast(inputs.device, amp):
        logits = model(inputs)
    loss = loss_fn(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    samples: int = 0
    steps: int = 0
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Batch], method,
                transform: InputTransform, device: torch.device, rng: np.random.Generator, *, amp: bool = False,
                on_batch: Callable[[np.ndarray], None] | None = None, check_every: int = 20) -> EpochStats:
    """One pass over `batches`: augment, ask the method for (inputs, soft targets), step.

    The loss is summed on the device and checked every `check_every` steps, so a NaN stops the run
    with the step range that produced it without a host sync per step.
    """
    stats, started = EpochStats(), time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    checked_to = 0
    for ids, images, labels in batches:
        if on_batch is not None:
            on_batch(ids)
        x = transform(images, device, rng)
        y = torch.from_numpy(labels).to(device)
        x, targets = method.batch(torch.from_numpy(ids), x, y, rng)
        loss = train_step(model, optimizer, x, targets, amp, method.loss)
        loss_sum += loss * len(ids)
        stats.samples += len(ids)
        stats.steps += 1
        if stats.steps % check_every == 0:
            _check_finite(loss_sum, checked_to, stats.steps)
            checked_to = stats.steps
    _check_finite(loss_sum, checked_to, stats.steps)
    stats.loss_sum = float(loss_sum)
    stats.seconds = time.perf_counter() - started
    return stats


def _check_finite(loss_sum: torch.Tensor, first: int, last: int) -> None:
    if not torch.isfinite(loss_sum):
        raise FloatingPointError(f"training loss became {float(loss_sum)} between steps {first + 1} and {last}: "
                                 "lower lr, or check the inputs of those batches")


@torch.no_grad()
def eval_outputs(model: nn.Module, batches: Iterable[Batch], transform: InputTransform, device: torch.device,
                 amp: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]]:
    """(ids, labels, float32 penultimate features, float32 logits) per batch, in eval mode, un-augmented; the freed
    heap goes back to the system every few batches (distributed.heap: else such a pass grows with its length)."""
    model.eval()
    for ids, images, labels in trimmed(batches):
        with autocast(device, amp):
            features = model.features(transform(images, device))
            logits = model.head(features)
        yield ids, labels, features.float(), logits.float()


@dataclass
class BatchPredictions:
    """`predict(inputs)` of a batch rule: the model's softmax on already transformed inputs, in eval mode and
    without gradient (a label guess), the model back in training mode after. Give it the unwrapped module, so
    that no DDP collective runs outside the training step."""

    model: nn.Module
    amp: bool = False

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        try:
            with torch.no_grad(), autocast(inputs.device, self.amp):
                logits = self.model(inputs)
        finally:
            self.model.train()
        return torch.softmax(logits.float(), dim=1)


def predict(model: nn.Module, batches: Iterable[Batch], transform: InputTransform, device: torch.device,
            amp: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, softmax probabilities) of every sample in `batches`, in eval mode, un-augmented."""
    ids_out, labels_out, probs_out = [], [], []
    for ids, labels, _, logits in eval_outputs(model, batches, transform, device, amp):
        probs_out.append(torch.softmax(logits, dim=-1).cpu().numpy())
        ids_out.append(ids)
        labels_out.append(labels)
    if not ids_out:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 0), np.float32)
    return np.concatenate(ids_out), np.concatenate(labels_out), np.concatenate(probs_out)


def accuracy_counts(model: nn.Module, batches: Iterable[Batch], transform: InputTransform, device: torch.device,
                    amp: bool = False) -> tuple[int, int]:
    """(correct, total) of argmax predictions against the labels the stream carries."""
    _, labels, probs = predict(model, batches, transform, device, amp)
    return int((probs.argmax(axis=1) == labels).sum()) if len(labels) else 0, int(len(labels))
