"""B2-B3: MixNN's soft-target correction and its synthetic samples built from nearest neighbours."""

from __future__ import annotations

import torch


def update_soft_targets(targets: torch.Tensor, predictions: torch.Tensor, momentum: float) -> torch.Tensor:
    """t_i <- m * t_i + (1 - m) * p_i, with p_i the detached prediction on the un-mixed sample."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum m must be in [0, 1), got {momentum}")
    return momentum * targets + (1.0 - momentum) * predictions.detach()


def neighbour_weights(w_self: torch.Tensor, w_neighbours: torch.Tensor, eps: float) -> torch.Tensor:
    """a_k = (w_k + eps) / sum_{l in S_i} (w_l + eps) over S_i = {i} U N_K(i); rows sum to 1."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0 so that weights never divide by zero, got {eps}")
    w = torch.cat([w_self[:, None], w_neighbours], dim=1) + eps
    return w / w.sum(dim=1, keepdim=True)


def synthetic_sample(x_self: torch.Tensor, x_neighbours: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x^_i = sum_k a_k x_k over the sample and its K neighbours (x_neighbours: B x K x ...)."""
    stacked = torch.cat([x_self[:, None], x_neighbours], dim=1)
    shape = (*weights.shape, *([1] * (stacked.dim() - 2)))
    return (weights.reshape(shape).to(stacked.dtype) * stacked).sum(dim=1)


def synthetic_target(t_self: torch.Tensor, t_neighbours: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """t^_i = sum_k a_k t_k: the same weights as the inputs, so the target says what was mixed."""
    return synthetic_sample(t_self, t_neighbours, weights)
