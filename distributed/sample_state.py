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
from noisymix.distributed.index_actor import NeighbourIndexError, index_actor
from noisymix.mixing.gmm_select import GMMConfig
from noisymix.mixing.method import EpochPlan, NeighbourQuery
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


def exact_pass(model, batches, transform: InputTransform, device, amp: bool, embeddings: str):
    """(ids, given labels, logits, embeddings) of this rank's samples, un-augmented, in eval mode; the
    embeddings L2-normalised ("l2"), raw ("raw") or not kept ("")."""
    out = {"ids": [], "labels": [], "logits": [], "z": []}
    for ids, labels, z, logits in eval_outputs(model, batches, transform, device, amp):
        out["ids"].append(torch.from_numpy(ids))
        out["labels"].append(torch.from_numpy(labels))
        out["logits"].append(logits)
        if embeddings:
            out["z"].append(F.normalize(z, dim=1) if embeddings == "l2" else z)
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

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        def to(value):
            return None if value is None else value.to(device)

        self.given, self.targets, self.clean = to(state["given"]), to(state["targets"]), to(state["clean"])
        self.neighbours, self.embeddings = to(state["neighbours"]), to(state["embeddings"])
        self.loss_history = [h.numpy() for h in state["loss_history"]]


def refresh_state(state: SampleState, model, batches, transform: InputTransform, device, amp: bool,
                  plan: EpochPlan, b1: GMMConfig, seed: int, fixed_clean: np.ndarray | None = None,
                  index_name: str = "") -> dict:
    """One epoch-start refresh: pass -> gather -> GMM (rank 0, broadcast) -> EMA -> neighbours. Returns timings.

    The clean probabilities come from B1's GMM on the losses, or are `fixed_clean` (`clean_from`)."""
    rank = dist.get_rank() if _distributed() else 0
    timings, started = {}, time.perf_counter()
    local = exact_pass(model, batches, transform, device, amp, plan.embeddings)
    n = state.num_samples
    labels = gather_rows(local["ids"], local["labels"].to(device), n)
    logits = gather_rows(local["ids"], local["logits"], n)
    z = gather_rows(local["ids"], local["z"], n) if plan.embeddings else None
    timings["pass_s"] = time.perf_counter() - started
    if not state.ready:
        state.given = labels.long()
        state.targets = F.one_hot(state.given, state.num_classes).float()
    # B1: loss against the current soft targets' argmax, on un-augmented inputs.
    losses = F.cross_entropy(logits, state.targets.argmax(dim=1), reduction="none").cpu().numpy()
    started = time.perf_counter()
    state.loss_history = (state.loss_history + [normalise_losses(losses)])[-b1.loss_window:]
    w = torch.zeros(n, dtype=torch.float32, device=device)
    degenerate = 0.0
    if rank == 0 and fixed_clean is not None:
        w = torch.from_numpy(fixed_clean.astype(np.float32)).to(device)
    elif rank == 0:
        fit = clean_probability(window_average(state.loss_history, b1.loss_window), max_iter=b1.gmm_max_iter,
                                tol=b1.gmm_tol, reg_covar=b1.gmm_reg_covar, seed=seed)
        w = torch.from_numpy(fit.w.astype(np.float32)).to(device)
        degenerate = float(fit.degenerate)
    state.clean = broadcast(w)
    timings["gmm_s"] = time.perf_counter() - started
    # B2: t <- m t + (1 - m) p on the schedule the method planned.
    if plan.target_momentum is not None:
        state.targets = update_soft_targets(state.targets, torch.softmax(logits, dim=1), plan.target_momentum)
    state.embeddings = z
    if plan.neighbours is not None:
        started = time.perf_counter()
        table = torch.zeros((n, plan.neighbours.k), dtype=torch.int64, device=device)
        actor_timings = {"index_refresh_s": 0.0, "index_query_s": 0.0, "index_peak_rss_mb": 0.0}
        if rank == 0:
            ids, actor_timings = neighbour_table(z.cpu().numpy(), plan.neighbours, index_name)
            table = torch.from_numpy(ids).to(device)
        state.neighbours = broadcast(table)
        timings["index_s"] = time.perf_counter() - started
        timings.update(actor_timings)
    timings["gmm_degenerate"] = degenerate
    return timings


# Handles held by this process: a named actor whose last handle is dropped is destroyed by Ray.
_INDEX_ACTORS: dict[str, ray.actor.ActorHandle] = {}


def neighbour_table(embeddings: np.ndarray, query: NeighbourQuery, name: str) -> tuple[np.ndarray, dict[str, float]]:
    """Ask the index actor `name` for the N x K table and its refresh/query seconds; a dead actor is
    re-created and refilled from this pass. A refresh longer than query.budget_s stops the run with what
    would make it faster (instead of every rank waiting into Ray Train's collective timeout)."""
    def ask():
        if name not in _INDEX_ACTORS:
            _INDEX_ACTORS[name] = index_actor(name, embeddings.shape[1], query)
        return ray.get(_INDEX_ACTORS[name].neighbour_table.remote(embeddings, query.k), timeout=query.budget_s)

    try:
        try:
            return ask()
        except ray.exceptions.RayActorError:
            _INDEX_ACTORS.pop(name, None)
            return ask()
    except ray.exceptions.GetTimeoutError as exc:
        ray.kill(_INDEX_ACTORS.pop(name))
        raise NeighbourIndexError(
            f"the neighbour index took longer than index_budget_s={query.budget_s:g} for {len(embeddings)} "
            f"embeddings of dimension {embeddings.shape[1]} (index_kind={query.kind}, index_cpus={query.cpus:g}): "
            "use index_kind=ivf (or a lower index_auto_above), more index_cpus, index_gpu=true, or a larger "
            "index_budget_s") from exc
