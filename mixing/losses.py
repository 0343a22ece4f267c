"""Soft-target losses: every method here trains against a distribution over classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot targets; labels outside [0, C) are an error, not a silent wrap."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    return F.one_hot(labels.long(), num_classes).float()


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """-sum_c t_c log p_c(x): cross-entropy against soft targets t (rows in the simplex).

    A row whose target is all zero carries no loss and is left out of the mean: that is how a method
    drops a sample from a batch without breaking the ranks' lockstep (selection-only training).
    """
    per_sample = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    counted = (targets.sum(dim=-1) > 0).sum().clamp_min(1)
    return per_sample.sum() / counted
