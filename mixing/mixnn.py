"""B2-B3: MixNN's soft-target correction and its synthetic samples built from nearest neighbours."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from noisymix.mixing.losses import one_hot
from noisymix.mixing.mixup import mixup_batch


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


NEIGHBOUR_SOURCES = ("batch", "global")
PHASES = ("warmup", "mixup", "neighbours")


def in_batch_neighbours(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of the batch nearest to each row by inner product of (normalised) embeddings, self excluded."""
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(min(k, len(embeddings) - 1), dim=1).indices


@dataclass
class MixNNTargets:
    """MixNN's batch rule (methods.md B3) over a per-sample state with `targets`, `clean`, `embeddings`
    and, for global neighbours, `neighbours` (N x K ids) whose inputs `fetch_inputs(ids, rng)` returns.

    Phase `warmup`: CE on the given labels; `mixup`: Mixup Beta(alpha, alpha) on the soft targets;
    `neighbours`: each sample mixed with its K nearest neighbours, weighted by clean probability.
    """

    num_classes: int
    state: object
    k: int = 1
    eps: float = 1e-3
    alpha: float = 1.0
    neighbour_source: str = "batch"
    fetch_inputs: Callable[[np.ndarray, np.random.Generator], torch.Tensor] | None = None
    phase: str = "warmup"

    def __post_init__(self):
        if self.neighbour_source not in NEIGHBOUR_SOURCES:
            raise ValueError(f"neighbour_source={self.neighbour_source!r} is not one of {', '.join(NEIGHBOUR_SOURCES)}")
        if self.k < 1:
            raise ValueError(f"K must be >= 1 neighbour, got {self.k}")
        if self.neighbour_source == "global" and self.fetch_inputs is None:
            raise ValueError("global neighbours need fetch_inputs")

    def batch(self, ids: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.phase == "warmup" or not self.state.ready:
            return inputs, one_hot(labels, self.num_classes)
        device = inputs.device
        ids_d = ids.to(self.state.targets.device)
        targets = self.state.targets[ids_d].to(device)
        if self.phase == "mixup":
            return mixup_batch(inputs, targets, self.alpha, rng)
        if self.neighbour_source == "global":
            neighbour_ids = self.state.neighbours[ids_d][:, :self.k]
            flat = neighbour_ids.reshape(-1).cpu().numpy()
            x_n = self.fetch_inputs(flat, rng).reshape(len(ids), self.k, *inputs.shape[1:])
        else:
            rows = in_batch_neighbours(self.state.embeddings[ids_d], self.k).to(device)
            neighbour_ids = ids_d[rows.to(ids_d.device)]
            x_n = inputs[rows]
        weights = neighbour_weights(self.state.clean[ids_d].to(device), self.state.clean[neighbour_ids].to(device),
                                    self.eps)
        t_n = self.state.targets[neighbour_ids].to(device)
        return synthetic_sample(inputs, x_n, weights), synthetic_target(targets, t_n, weights)
