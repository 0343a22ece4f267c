"""Per-sample state keyed by id (soft targets N x C, clean probability N, neighbours N x K), the exact
pass that feeds it, and how ranks keep it identical.

Consistency: every rank runs the pass over its own shards (each id exactly once across ranks), the
results are all-gathered in id order, and the two steps that could differ between ranks (the GMM
fit and the index query) run on rank 0 and are broadcast. Every rank then applies the same update.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import ray
import ray.actor
import torch
import torch.distributed as dist
import torch.nn.functional as F

from noisymix.distributed.engine import InputTransform, eval_outputs
from noisymix.distributed.index_actor import index_actor
from noisymix.mixing.mixnn import update_soft_targets
from noisymix.selection.gmm import clean_probability, normalise_losses, window_average


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(ids: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
    """All ranks' (id, row) pairs as one (total x ...) tensor in id order; every id must come exactly once."""
    if _distributed():
        count = torch.tensor([len(ids)], device=rows.device)
        counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, count)
        longest = int(max(c.item() for c in counts))
        pad = longest - len(ids)
        padded_ids = F.pad(ids.to(rows.device), (0, pad), value=-1)
        padded_rows = torch.cat([rows, rows.new_zeros((pad, *rows.shape[1:]))])
        all_ids = [torch.empty_like(padded_ids) for _ in counts]
        all_rows = [torch.empty_like(padded_rows) for _ in counts]
        dist.all_gather(all_ids, padded_ids)
        dist.all_gather(all_rows, padded_rows)
        ids, rows = torch.cat(all_ids), torch.cat(all_rows)
        keep = ids >= 0
        ids, rows = ids[keep], rows[keep]
    ids = ids.to(rows.device)
    if len(ids) != total or not torch.equal(torch.sort(ids).values, torch.arange(total, device=ids.device)):
        raise RuntimeError(f"the pass gathered {len(ids)} rows for {total} ids, not each id once: a shard is "
                           "missing, duplicated or unevenly dealt")
    out = torch.empty_like(rows)
    out[ids] = rows
    return out


def broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank."""
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def exact_pass(model, batches, transform: InputTransform, device, amp: bool, normalise_embeddings: bool):
    """(ids, given labels, logits, embeddings) of this rank's samples, un-augmented, in eval mode."""
    out = {"ids": [], "labels": [], "logits": [], "z": []}
    for ids, labels, z, logits in eval_outputs(model, batches, transform, device, amp):
        out["ids"].append(torch.from_numpy(ids))
        out["labels"].append(torch.from_numpy(labels))
        out["logits"].append(logits)
        out["z"].append(F.normalize(z, dim=1) if normalise_embeddings else z)
    return {k: torch.cat(v) if v else torch.empty(0) for k, v in out.items()}


@dataclass
class SampleState:
    """Given labels, soft targets t (N x C), clean probability w (N), neighbours (N x K), embeddings (N x d).

    Filled by the first pass; until then `ready` is False and methods train on the given labels.
    """

    num_samples: int
    num_classes: int
    given: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    clean: torch.Tensor | None = None
    neighbours: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    loss_history: list = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.targets is not None

    def state_dict(self) -> dict:
        """Checkpointable content: tensors and lists of tensors only (weights_only loading)."""
        return {"given": self.given, "targets": self.targets, "clean": self.clean, "neighbours": self.neighbours,
                "embeddings": self.embeddings, "loss_history": [torch.from_numpy(h) for h in self.loss_history]}

    def digest(self) -> str:
        """sha256 over the state's tensors: equal digests on two ranks mean equal state."""
        digest = hashlib.sha256()
        for tensor in (self.given, self.targets, self.clean, self.neighbours):
            if tensor is not None:
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def load_state_dict(self, state: dict) -> None:
        self.given, self.targets, self.clean = state["given"], state["targets"], state["clean"]
        self.neighbours, self.embeddings = state["neighbours"], state["embeddings"]
        self.loss_history = [h.numpy() for h in state["loss_history"]]


@dataclass
class PassSettings:
    """The MixNN/GMM knobs of the per-epoch refresh (docs/methods.md B1-B3)."""

    epoch_updates_targets: bool
    momentum: float
    loss_window: int
    gmm_max_iter: int
    gmm_tol: float
    gmm_reg_covar: float
    seed: int
    neighbours: int = 0               # K; 0 = no global neighbour table
    index_name: str = ""
    index_metric: str = "ip"
    index_kind: str = "flat"
    index_nlist: int = 0
    index_nprobe: int = 8
    index_threads: int = 1
    index_gpu: bool = True
    fixed_clean: np.ndarray | None = None  # `clean_from`: w for every id, in place of the GMM fit


def refresh_state(state: SampleState, model, batches, transform: InputTransform, device, amp: bool,
                  normalise_embeddings: bool, s: PassSettings) -> dict:
    """One epoch-start refresh: pass -> gather -> GMM (rank 0, broadcast) -> EMA -> neighbours. Returns timings."""
    rank = dist.get_rank() if _distributed() else 0
    timings, started = {}, time.perf_counter()
    local = exact_pass(model, batches, transform, device, amp, normalise_embeddings)
    n = state.num_samples
    labels = gather_rows(local["ids"], local["labels"].to(device), n)
    logits = gather_rows(local["ids"], local["logits"], n)
    z = gather_rows(local["ids"], local["z"], n)
    timings["pass_s"] = time.perf_counter() - started
    if not state.ready:
        state.given = labels.long()
        state.targets = F.one_hot(state.given, state.num_classes).float()
    # B1: loss against the current soft targets' argmax, on un-augmented inputs.
    losses = F.cross_entropy(logits, state.targets.argmax(dim=1), reduction="none").cpu().numpy()
    started = time.perf_counter()
    state.loss_history = (state.loss_history + [normalise_losses(losses)])[-s.loss_window:]
    w = torch.zeros(n, dtype=torch.float32, device=device)
    info = {"degenerate": 0.0}
    if rank == 0 and s.fixed_clean is not None:
        w = torch.from_numpy(s.fixed_clean.astype(np.float32)).to(device)
    elif rank == 0:
        fit = clean_probability(window_average(state.loss_history, s.loss_window), max_iter=s.gmm_max_iter,
                                tol=s.gmm_tol, reg_covar=s.gmm_reg_covar, seed=s.seed)
        w = torch.from_numpy(fit.w.astype(np.float32)).to(device)
        info = {"degenerate": float(fit.degenerate)}
    state.clean = broadcast(w)
    timings["gmm_s"] = time.perf_counter() - started
    # B2: t <- m t + (1 - m) p on the schedule the caller decided.
    if s.epoch_updates_targets:
        state.targets = update_soft_targets(state.targets, torch.softmax(logits, dim=1), s.momentum)
    state.embeddings = z
    if s.neighbours > 0:
        started = time.perf_counter()
        table = torch.zeros((n, s.neighbours), dtype=torch.int64, device=device)
        actor_timings = {"index_refresh_s": 0.0, "index_query_s": 0.0}
        if rank == 0:
            ids, actor_timings = neighbour_table(z.cpu().numpy(), s)
            table = torch.from_numpy(ids).to(device)
        state.neighbours = broadcast(table)
        timings["index_s"] = time.perf_counter() - started
        timings.update(actor_timings)
    timings["gmm_degenerate"] = info["degenerate"]
    return timings


# Handles held by this process: a named actor whose last handle is dropped is destroyed by Ray.
_INDEX_ACTORS: dict[str, ray.actor.ActorHandle] = {}


def neighbour_table(embeddings: np.ndarray, s: PassSettings) -> tuple[np.ndarray, dict[str, float]]:
    """Ask the index actor for the N x K table and its refresh/query seconds; a dead actor is re-created
    and refilled from this pass."""
    def ask():
        if s.index_name not in _INDEX_ACTORS:
            _INDEX_ACTORS[s.index_name] = index_actor(s.index_name, embeddings.shape[1], s.index_metric,
                                                      s.index_kind, s.index_threads, s.index_gpu, s.index_nlist,
                                                      s.index_nprobe)
        actor = _INDEX_ACTORS[s.index_name]
        return ray.get(actor.neighbour_table.remote(embeddings, s.neighbours))

    try:
        return ask()
    except ray.exceptions.RayActorError:
        _INDEX_ACTORS.pop(s.index_name, None)
        return ask()
