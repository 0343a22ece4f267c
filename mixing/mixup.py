"""Mixup (Zhang et al., 2018): convex combinations of random sample pairs and of their targets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from noisymix.mixing.config import Section, check_range
from noisymix.mixing.losses import one_hot
from noisymix.mixing.method import BatchContext, BatchRule, Method, register


def sample_lambda(alpha: float, size: int, rng: np.random.Generator) -> torch.Tensor:
    """lambda ~ Beta(alpha, alpha), drawn from the run's seeded generator."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return torch.from_numpy(rng.beta(alpha, alpha, size=size)).float()


def mix(x_a: torch.Tensor, x_b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lambda * a + (1 - lambda) * b, with one lambda per row (broadcast over the other dims)."""
    lam = lam.to(device=x_a.device, dtype=x_a.dtype).reshape(-1, *([1] * (x_a.dim() - 1)))
    return lam * x_a + (1 - lam) * x_b


def mixup_batch(inputs: torch.Tensor, targets: torch.Tensor, alpha: float,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with a random partner of the same batch, one lambda per batch as in the paper."""
    lam = sample_lambda(alpha, 1, rng).expand(inputs.shape[0])
    perm = torch.from_numpy(rng.permutation(inputs.shape[0])).to(inputs.device)
    return mix(inputs, inputs[perm], lam), mix(targets, targets[perm], lam)


@dataclass
class MixupConfig(Section):
    """alpha of Beta(alpha, alpha): Mixup's, SelectMix's and MixNN's mixing coefficient."""

    alpha: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_range("alpha", self.alpha, 0.0, None, lo_open=True)


@dataclass
class MixupTargets(BatchRule):
    """Mixup over the whole batch, Beta(alpha, alpha)."""

    alpha: float = 1.0

    def batch(self, ids: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return mixup_batch(inputs, one_hot(labels, self.num_classes), self.alpha, rng)


@register
class Mixup(Method):
    name = "mixup"
    summary = "Mixup on every batch (the blind-mixing baseline)"
    Config = MixupConfig

    def batch_rule(self, context: BatchContext) -> BatchRule:
        return MixupTargets(context.num_classes, alpha=self.config.alpha)
