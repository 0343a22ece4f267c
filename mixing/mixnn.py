"""MixNN (methods.md B, "synthetic samples with soft labels"): B2's soft-target correction, B3's synthetic
samples built from nearest neighbours weighted by B1's clean probabilities, and the method's schedule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from noisymix.mixing.config import ConfigError, check_choice, check_epochs_or_auto, check_range
from noisymix.mixing.gmm_select import CleanProbabilityMethod, GMMConfig
from noisymix.mixing.losses import one_hot
from noisymix.mixing.method import BatchContext, BatchRule, EpochPlan, NeighbourQuery, TaskAsk, register
from noisymix.mixing.mixup import MixupConfig, mixup_batch

NEIGHBOUR_SOURCES = ("batch", "global")
INDEX_METRICS = ("ip", "l2")
INDEX_KINDS = ("auto", "flat", "ivf", "ivf_sq8")


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


def in_batch_neighbours(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of the batch nearest to each row by inner product of (normalised) embeddings, self excluded."""
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(min(k, len(embeddings) - 1), dim=1).indices


@dataclass
class MixNNTargets(BatchRule):
    """MixNN's batch rule (methods.md B3) over a per-sample state answering `targets_of(ids)`, `clean_of(ids)`,
    `embeddings_of(ids)` and, for global neighbours, `neighbours_of(ids)` (K ids each), whose inputs
    `fetch_inputs(ids, rng)` returns.

    Phase `warmup`: CE on the given labels; `mixup`: Mixup Beta(alpha, alpha) on the soft targets;
    `neighbours`: each sample mixed with its K nearest neighbours, weighted by clean probability.
    """

    state: object = None
    k: int = 1
    eps: float = 1e-3
    alpha: float = 1.0
    neighbour_source: str = "batch"
    fetch_inputs: Callable[[np.ndarray, np.random.Generator], torch.Tensor] | None = None

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
        targets = self.state.targets_of(ids).to(device)
        if self.phase == "mixup":
            return mixup_batch(inputs, targets, self.alpha, rng)
        if self.neighbour_source == "global":
            neighbour_ids = self.state.neighbours_of(ids)[:, :self.k]
            x_n = self.fetch_inputs(neighbour_ids.reshape(-1).cpu().numpy(), rng).reshape(
                len(ids), self.k, *inputs.shape[1:])
        else:
            rows = in_batch_neighbours(self.state.embeddings_of(ids), self.k).cpu()
            neighbour_ids = ids.cpu()[rows]
            x_n = inputs[rows.to(device)]
        weights = neighbour_weights(self.state.clean_of(ids).to(device), self.state.clean_of(neighbour_ids).to(device),
                                    self.eps)
        t_n = self.state.targets_of(neighbour_ids).to(device)
        return synthetic_sample(inputs, x_n, weights), synthetic_target(targets, t_n, weights)


@dataclass
class MixNNConfig(GMMConfig, MixupConfig):
    """B2-B3's knobs on top of B1's and alpha: when targets move, the neighbours and the FAISS index."""

    es: int = -1                   # -1: the authors' share, 60 of 300 epochs
    update_every: int = -1         # -1: the authors' 10 of 300 epochs
    soft_momentum: float = 0.9
    knn: int = 1
    weight_eps: float = 1e-3
    neighbour_source: str = "global"
    normalise_embeddings: bool = True
    index_metric: str = "ip"
    index_kind: str = "auto"       # auto: exact (flat) below index_auto_above embeddings, ivf_sq8 from there
    index_auto_above: int = 100_000
    index_nlist: int = 0           # IVF lists; 0 = 4 sqrt(N)
    index_nprobe: int = 8          # IVF lists searched per query
    index_cpus: float = 0.0        # the index actor's CPUs, reserved in Ray, FAISS threads; 0: shares the workers', 1 thread
    index_gpu: bool = False        # the index actor asks Ray for a GPU and builds a GPU index (noisymix[gpu])
    index_budget_s: float = 1200.0  # a refresh slower than this stops the run, naming the knobs that help

    def validate(self) -> None:
        super().validate()
        check_choice("neighbour_source", self.neighbour_source, NEIGHBOUR_SOURCES)
        check_choice("index_metric", self.index_metric, INDEX_METRICS)
        check_choice("index_kind", self.index_kind, INDEX_KINDS)
        check_epochs_or_auto("es", self.es)
        check_epochs_or_auto("update_every", self.update_every, minimum=1)
        check_range("soft_momentum", self.soft_momentum, 0.0, 1.0, hi_open=True)
        check_range("weight_eps", self.weight_eps, 0.0, None, lo_open=True)
        check_range("index_nlist", self.index_nlist, 0)
        check_range("index_cpus", self.index_cpus, 0.0)
        check_range("index_budget_s", self.index_budget_s, 0.0, lo_open=True)
        for key in ("knn", "index_nprobe", "index_auto_above"):
            check_range(key, getattr(self, key), 1)

    def resolve(self, epochs: int) -> None:
        super().resolve(epochs)
        if self.es == -1:
            self.es = max(self.warmup, round(epochs / 5))
        if self.update_every == -1:
            self.update_every = max(1, round(epochs / 30))
        if self.es < self.warmup:
            raise ConfigError(f"es={self.es} must not come before warmup={self.warmup}")


@register
class MixNN(CleanProbabilityMethod):
    name = "mixnn"
    summary = "MixNN: mix each sample with its nearest neighbours, weighted by clean probability, on soft targets"
    Config = MixNNConfig

    def fetches_inputs_by_id(self) -> bool:
        return self.config.neighbour_source == "global"

    def task_resources(self) -> list[TaskAsk]:
        c = self.config
        return [] if c.neighbour_source != "global" else [
            TaskAsk(f"the index actor (index_cpus={c.index_cpus:g}, index_gpu={str(c.index_gpu).lower()})",
                    c.index_cpus, float(c.index_gpu), alongside=True)]

    def plan(self, epoch: int) -> EpochPlan:
        """CE warm-up; then Mixup on the soft targets until `es`; then neighbours, the soft targets moving
        every `update_every` epochs (methods.md B). Each epoch after the warm-up starts with a refresh."""
        c = self.config
        if epoch < c.warmup:
            return EpochPlan("warmup")
        if epoch < c.es:
            return EpochPlan("mixup", refresh=True)
        moves = (epoch - c.es) % c.update_every == 0
        index = NeighbourQuery(c.knn, c.index_metric, c.index_kind, c.index_nlist, c.index_nprobe, c.index_gpu,
                               c.index_cpus, c.index_auto_above, c.index_budget_s)
        return EpochPlan("neighbours", refresh=True, target_momentum=c.soft_momentum if moves else None,
                         embeddings="l2" if c.normalise_embeddings else "raw",
                         neighbours=index if c.neighbour_source == "global" else None)

    def batch_rule(self, context: BatchContext) -> BatchRule:
        c = self.config
        return MixNNTargets(context.num_classes, state=context.state, k=c.knn, eps=c.weight_eps, alpha=c.alpha,
                            neighbour_source=c.neighbour_source, fetch_inputs=context.fetch_inputs)
