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
    return _reduce(-(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1), targets, reduction)


def forward_corrected_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, transition: torch.Tensor,
                                    reduction: str = "mean") -> torch.Tensor:
    """-sum_k t_k log (p T)_k, T[j, k] = P(given k | true j): the targets are given labels, so the model's clean
    softmax p is carried through the noise first (forward correction, Patrini et al., CVPR 2017); T = I is
    soft_target_cross_entropy."""
    noisy = F.softmax(logits.float(), dim=-1) @ transition.to(logits.device, torch.float32)
    log_noisy = noisy.clamp_min(torch.finfo(torch.float32).tiny).log()
    return _reduce(-(targets * log_noisy).sum(dim=-1), targets, reduction)


def _reduce(per_sample: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    """The per-row losses, summed, or averaged over the rows whose target is not all zero."""
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    counted = (targets.sum(dim=-1) > 0).sum().clamp_min(1)
    return per_sample.sum() / counted
