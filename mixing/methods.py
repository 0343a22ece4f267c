"""The batch rule of each method: (inputs, given labels) -> (inputs to train on, soft targets)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from noisymix.mixing.losses import one_hot
from noisymix.mixing.mixup import mixup_batch


@dataclass
class PlainTargets:
    """CE on the labels the stream carries (given labels for `ce`, true labels for the `clean` bound)."""

    num_classes: int

    def batch(self, ids: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs, one_hot(labels, self.num_classes)


@dataclass
class MixupTargets:
    """Mixup over the whole batch, Beta(alpha, alpha)."""

    num_classes: int
    alpha: float = 1.0

    def batch(self, ids: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return mixup_batch(inputs, one_hot(labels, self.num_classes), self.alpha, rng)


@dataclass
class GMMSelectTargets:
    """Loss-GMM selection (methods.md C): phase `warmup` trains on every sample, phase `select` only on
    samples with w_i > threshold."""

    num_classes: int
    state: object
    threshold: float = 0.5
    phase: str = "warmup"

    def batch(self, ids: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        targets = one_hot(labels, self.num_classes)
        if self.phase == "warmup" or not self.state.ready:
            return inputs, targets
        keep = self.state.clean[ids.to(self.state.clean.device)].to(inputs.device) > self.threshold
        return inputs, targets * keep[:, None]
