"""Per-sample state keyed by id (given label, soft target, clean probability), sharded across ranks, the exact
pass that feeds it, and its per-rank checkpoint files.

Layout: each rank is the home of one contiguous id range (distributed.exchange) and holds only those rows,
soft targets in the method's compact codec. An epoch's refresh: every rank passes over the shards it will train
on this epoch, fetches those ids' targets from their homes, sends its losses to rank 0 (N floats) for the GMM,
whose clean probabilities go back to their homes; moved targets are stored back; neighbours come from the
index actor; and each rank fetches the rows of its epoch ids and their neighbours (its working rows).
Held per rank, in bytes per sample of the rank (N/W): 8 + the codec's row at home (given label, clean
probability, soft target); the working rows of (1 + K) ids each (8 + 4 + codec row, plus K ids of 8); 2d for
in-batch neighbours' float16 embeddings. Rank 0 adds 4 x loss_window bytes per sample of N (the GMM's window).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import ray.actor
import torch
import torch.distributed as dist
import torch.nn.functional as F

from noisymix.distributed.engine import InputTransform, eval_outputs
from noisymix.distributed.exchange import (agreed_slices, collective_device, fetch, from_rank0, home_range,
                                           rank_and_world, store, to_rank0)
from noisymix.distributed.index_actor import NeighbourIndexError, index_actor
from noisymix.mixing.gmm_select import GMMConfig
from noisymix.mixing.method import EpochPlan, NeighbourQuery
from noisymix.mixing.mixnn import update_soft_targets
from noisymix.mixing.soft_targets import TargetCodec
from noisymix.selection.gmm import clean_probability, normalise_losses, window_average

STATE_FILE = re.compile(r"sample_state_(\d+)_(\d+)\.pt")
CHUNK_FLOATS = 2**21   # a chunk of decoded rows (or of embeddings sent to the index) holds at most 8 MB of floats


def chunks(count: int, width: int) -> list[slice]:
    """Row slices of `count` rows, each at most CHUNK_FLOATS / width rows: bounded transients whatever C or d."""
    rows = max(1, CHUNK_FLOATS // max(width, 1))
    return [slice(i, i + rows) for i in range(0, count, rows)]


class StateCheckpointError(RuntimeError):
    """A per-sample state checkpoint that does not belong to this run (other samples, classes, or incomplete)."""


def pass_rows(model, batches, count: int, transform: InputTransform, device, amp: bool, codec: TargetCodec,
              embeddings: str) -> dict:
    """This rank's `count` samples in stream order, un-augmented, in eval mode: ids, given labels, the predictions
    p in the soft targets' codec and the embeddings, L2-normalised ("l2"), raw ("raw") or not kept (""), each
    written into a tensor of `count` rows as the batches come (no per-batch copies are joined at the end)."""
    out = {"ids": torch.empty(count, dtype=torch.int64, device=device),
           "labels": torch.empty(count, dtype=torch.int64, device=device), "probs": codec.empty(count, device),
           "z": torch.empty((count, 0), dtype=torch.float16, device=device) if embeddings else None}
    seen = 0
    for ids, labels, z, logits in eval_outputs(model, batches, transform, device, amp):
        rows = slice(seen, seen + len(ids))
        seen += len(ids)
        if seen > count:
            break
        out["ids"][rows] = torch.from_numpy(ids).to(device)
        out["labels"][rows] = torch.from_numpy(labels).to(device)
        out["probs"][rows] = codec.encode(torch.softmax(logits, dim=1))
        if embeddings:
            if out["z"].shape[1] != z.shape[1]:
                out["z"] = torch.empty((count, z.shape[1]), dtype=torch.float16, device=device)
            out["z"][rows] = F.normalize(z, dim=1) if embeddings == "l2" else z   # 2 bytes per dimension
    if seen != count:
        raise RuntimeError(f"this rank's shards hold {count} samples by the manifest but its pass read "
                           f"{'more' if seen > count else seen}: a shard does not match the manifest")
    return out


def move_targets(codec: TargetCodec, targets: torch.Tensor | None, labels: torch.Tensor, probs: torch.Tensor,
                 momentum: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """B1's loss -log p[argmax t] of each sample and its encoded target after B2's t <- m t + (1 - m) p (as it was
    without a momentum), computed a chunk of rows at a time from the encoded rows; `targets` None: the first
    refresh, t = onehot(given label)."""
    # Outputs allocated whole before the chunks: small results left between each chunk's large transients would
    # fragment the heap (glibc then kept ~2 KB per row at C=1000 that no array held).
    write = momentum is not None or targets is None
    losses = torch.empty(len(probs), device=probs.device)
    moved = codec.empty(len(probs), probs.device) if write else targets
    # A probability stored in 16 bits underflows to 0 below its smallest subnormal: cap the loss there.
    floor = max(1e-30, torch.finfo(codec.value_dtype).tiny / 1024)
    for rows in chunks(len(probs), codec.num_classes):
        p = codec.decode(probs[rows])
        t = F.one_hot(labels[rows].long(), codec.num_classes).float() if targets is None else codec.decode(targets[rows])
        losses[rows] = -torch.log(p.gather(1, t.argmax(dim=1, keepdim=True)).squeeze(1).clamp_min(floor))
        if write:
            moved[rows] = codec.encode(t if momentum is None else update_soft_targets(t, p, momentum))
    return losses, moved


@dataclass
class SampleState:
    """One rank's share of the per-sample state: its home rows (given label, encoded soft target, clean
    probability) and this epoch's working rows. Until the first refresh `ready` is False and methods train
    on the given labels. The batch rules read it by id: targets_of, clean_of, neighbours_of, embeddings_of."""

    num_samples: int
    codec: TargetCodec
    device: torch.device | str = "cpu"
    ready: bool = False
    loss_history: list = field(default_factory=list)       # rank 0 only: the GMM's loss window, N floats each

    def __post_init__(self):
        self.rank, self.world = rank_and_world()
        self.start, self.stop = home_range(self.rank, self.world, self.num_samples)
        size = self.stop - self.start
        self.given = torch.zeros(size, dtype=torch.int32, device=self.device)
        self.targets = torch.zeros((size, self.codec.width), dtype=self.codec.storage_dtype, device=self.device)
        self.clean = torch.zeros(size, dtype=torch.float32, device=self.device)
        self.epoch_ids = self.rows_ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self.epoch_rows = self.epoch_ids     # epoch_ids[i] is row epoch_rows[i] of neighbours and embeddings
        self.rows_targets, self.rows_clean = self.targets[:0], self.clean[:0]
        self.neighbours: torch.Tensor | None = None
        self.embeddings: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return self.codec.num_classes

    def _fetch(self, ids: torch.Tensor, *homes: torch.Tensor) -> list[torch.Tensor]:
        return fetch(ids, homes, self.start, self.world, self.num_samples)

    def _store(self, ids: torch.Tensor, *pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
        store(ids, pairs, self.start, self.world, self.num_samples)

    def release_working(self) -> None:
        """Drop the epoch's working rows (a refresh builds the next epoch's; holding both would double them)."""
        self.epoch_ids = self.rows_ids = self.epoch_rows = self.epoch_ids[:0]
        self.rows_targets, self.rows_clean = self.targets[:0], self.clean[:0]
        self.neighbours = self.embeddings = None

    @staticmethod
    def _at(sorted_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(sorted_ids.device).long().contiguous()
        at = torch.searchsorted(sorted_ids, ids).clamp_max(max(len(sorted_ids) - 1, 0))
        if len(ids) and (len(sorted_ids) == 0 or not torch.equal(sorted_ids[at], ids)):
            raise RuntimeError("a batch asked for per-sample state of ids this rank did not fetch for the epoch: "
                               "the epoch's shards differ from its refresh's")
        return at

    def targets_of(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(self.rows_targets[self._at(self.rows_ids, ids)])

    def clean_of(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows_clean[self._at(self.rows_ids, ids)]

    def neighbours_of(self, ids: torch.Tensor) -> torch.Tensor:
        return self.neighbours[self.epoch_rows[self._at(self.epoch_ids, ids)]]

    def embeddings_of(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings[self.epoch_rows[self._at(self.epoch_ids, ids)]].float()

    def corrected(self) -> torch.Tensor:
        """The argmax of each home soft target."""
        return corrected_labels(self.codec, self.targets)

    def digest(self) -> str:
        """sha256 over the home rows: equal digests mean equal state for this id range."""
        digest = hashlib.sha256(f"{self.start}:{self.stop}".encode())
        for tensor in (self.given, self.targets, self.clean):
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def held_bytes(self) -> dict[str, int]:
        """Bytes of the home rows and of the epoch's working rows (neighbours and embeddings included)."""
        def size(*tensors):
            return sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return {"home": size(self.given, self.targets, self.clean),
                "working": size(self.epoch_ids, self.rows_ids, self.rows_targets, self.rows_clean, self.neighbours,
                                self.embeddings)}

    def fill(self, given: torch.Tensor, targets: torch.Tensor, clean: torch.Tensor,
             neighbours: torch.Tensor | None = None, embeddings: torch.Tensor | None = None) -> None:
        """Set the whole state of a one-process run at once, every id a working row (benchmarks, tests)."""
        if self.world != 1:
            raise RuntimeError("fill() sets every id's state: one process only")
        self.given[:], self.targets[:], self.clean[:] = given, self.codec.encode(targets), clean
        self.epoch_ids = self.rows_ids = self.epoch_rows = torch.arange(self.num_samples, device=self.device)
        self.rows_targets, self.rows_clean = self.targets, self.clean
        self.neighbours, self.embeddings, self.ready = neighbours, embeddings, True

    def file_name(self) -> str:
        return f"sample_state_{self.start:012d}_{self.stop:012d}.pt"

    def save(self, directory: Path) -> None:
        """This rank's home rows as one file of the checkpoint directory (Ray Train merges the ranks' files)."""
        codec = self.codec
        torch.save({"start": self.start, "stop": self.stop, "num_samples": self.num_samples,
                    "codec": {"num_classes": codec.num_classes, "topk": codec.topk, "dtype": codec.dtype},
                    "given": self.given.cpu(), "targets": self.targets.cpu(), "clean": self.clean.cpu()},
                   Path(directory) / self.file_name())

    def load(self, directory: Path) -> bool:
        """Fill this rank's home rows from the per-rank files of a checkpoint written with any world size
        (each file memory-mapped, only its overlap with this range copied); False when it holds no state."""
        files = state_files(directory)
        if not files:
            return False
        if [(a, b) for a, b, _ in files] != list(zip([0, *[b for _, b, _ in files[:-1]]], [b for _, b, _ in files])) \
                or files[-1][1] != self.num_samples:
            raise StateCheckpointError(f"the checkpoint's per-sample state files cover {[(a, b) for a, b, _ in files]}, "
                                       f"not the {self.num_samples} samples of this run once each: it is incomplete or "
                                       "from another dataset")
        for first, last, path in files:
            lo, hi = max(first, self.start), min(last, self.stop)
            if lo >= hi:
                continue
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            self._check_saved(saved, path)
            codec = TargetCodec(**saved["codec"])
            rows = slice(lo - first, hi - first)
            at = slice(lo - self.start, hi - self.start)
            self.given[at] = saved["given"][rows].to(self.device)
            self.clean[at] = saved["clean"][rows].to(self.device)
            targets = saved["targets"][rows]
            self.targets[at] = (targets if codec == self.codec else self.codec.encode(codec.decode(targets))).to(
                self.device)
        self.ready = True
        return True

    def _check_saved(self, saved: dict, path: Path) -> None:
        if saved["num_samples"] != self.num_samples or saved["codec"]["num_classes"] != self.num_classes:
            raise StateCheckpointError(
                f"{path.name} holds per-sample state for {saved['num_samples']} samples of "
                f"{saved['codec']['num_classes']} classes; this run has {self.num_samples} samples of "
                f"{self.num_classes} classes: the checkpoint comes from another dataset")


def corrected_labels(codec: TargetCodec, rows: torch.Tensor) -> torch.Tensor:
    """The argmax class of each encoded soft target, decoded a chunk at a time (no N x C float copy)."""
    return torch.cat([codec.decode(rows[part]).argmax(dim=1) for part in chunks(len(rows), codec.num_classes)]
                     or [torch.empty(0, dtype=torch.int64, device=rows.device)])


def state_files(directory: Path) -> list[tuple[int, int, Path]]:
    """The per-rank state files of a checkpoint directory as (start, stop, path), in id order."""
    return sorted((int(m[1]), int(m[2]), path) for path in Path(directory).iterdir()
                  if (m := STATE_FILE.fullmatch(path.name)))


def read_beliefs(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(given, corrected, clean) for every id from a checkpoint's per-rank state files; None without them."""
    parts = []
    for _, _, path in state_files(directory):
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        corrected = corrected_labels(TargetCodec(**saved["codec"]), saved["targets"])
        parts.append((saved["given"].long().numpy(), corrected.cpu().numpy(), saved["clean"].numpy()))
    return None if not parts else tuple(np.concatenate(column) for column in zip(*parts))


def refresh_state(state: SampleState, model, batches, count: int, transform: InputTransform, device, amp: bool,
                  plan: EpochPlan, b1: GMMConfig, seed: int, fixed_clean: np.ndarray | None = None,
                  index_name: str = "", token: int = 0) -> dict:
    """One epoch-start refresh over this rank's epoch shards (`batches`, `count` samples): pass -> per round,
    targets from their homes, losses and moved targets, stored home -> losses to rank 0, GMM, clean probabilities
    to their homes -> neighbours -> working rows. The clean probabilities come from B1's GMM on the losses, or are
    `fixed_clean` (`clean_from`, rank 0 reads it). Returns timings."""
    timings, started = {}, time.perf_counter()
    codec, n = state.codec, state.num_samples
    state.release_working()
    local = pass_rows(model, batches, count, transform, device, amp, codec, plan.embeddings)
    ids, labels, probs = local["ids"], local.pop("labels"), local.pop("probs")
    timings["pass_s"] = time.perf_counter() - started
    # B1: loss against the current soft targets' argmax, on un-augmented inputs; B2: t <- m t + (1 - m) p; a round
    # of rows at a time, so no n x C copy of the targets is made.
    moving, first = plan.target_momentum is not None, not state.ready
    losses = torch.empty(len(ids), device=device)
    for rows in agreed_slices(len(ids), codec.bytes_per_row):
        targets = None if first else state._fetch(ids[rows], state.targets)[0]
        losses[rows], moved = move_targets(codec, targets, labels[rows], probs[rows], plan.target_momentum)
        pairs = ([(moved, state.targets)] if moving or first else []) + \
            ([(labels[rows].to(torch.int32), state.given)] if first else [])
        if pairs:
            state._store(ids[rows], *pairs)
    del labels, probs
    started = time.perf_counter()
    all_losses = to_rank0(ids, losses, n)
    w, degenerate = None, 0.0
    if all_losses is not None:
        state.loss_history = (state.loss_history + [normalise_losses(all_losses.cpu().numpy())])[-b1.loss_window:]
        if fixed_clean is not None:
            w = torch.from_numpy(fixed_clean.astype(np.float32))
        else:
            fit = clean_probability(window_average(state.loss_history, b1.loss_window), max_iter=b1.gmm_max_iter,
                                    tol=b1.gmm_tol, reg_covar=b1.gmm_reg_covar, seed=seed)
            w, degenerate = torch.from_numpy(fit.w.astype(np.float32)), float(fit.degenerate)
    from_rank0(w, state.clean, state.world, n)
    timings["gmm_s"] = time.perf_counter() - started
    state.epoch_rows = torch.argsort(ids)
    state.epoch_ids, state.embeddings, wanted = ids[state.epoch_rows], local["z"], ids
    if plan.neighbours is not None:
        started = time.perf_counter()
        table, actor_timings = neighbour_rows(ids.cpu().numpy(), local["z"], n, plan.neighbours, index_name, token)
        state.neighbours, state.embeddings = torch.from_numpy(table).to(device), None   # the index has them
        wanted = torch.cat([ids, state.neighbours.reshape(-1)])
        timings["index_s"] = time.perf_counter() - started
        timings.update(actor_timings)
    del local
    state.rows_ids = wanted = torch.unique(wanted)
    state.rows_targets, state.rows_clean = state._fetch(wanted, state.targets, state.clean)
    state.ready = True
    timings["gmm_degenerate"] = degenerate
    return timings


# Handles held by this process: a named actor whose last handle is dropped is destroyed by Ray.
_INDEX_ACTORS: dict[str, ray.actor.ActorHandle] = {}


def neighbour_rows(ids: np.ndarray, embeddings: torch.Tensor, total: int, query: NeighbourQuery, name: str,
                   token: int) -> tuple[np.ndarray, dict[str, float]]:
    """The K global neighbours of this rank's samples `ids`, from the index actor `name`: every rank streams its
    embeddings in (float32 chunks of at most 8 MB), rank 0 has the index built, every rank asks for its own ids'
    neighbours. Returns (len(ids) x K ids, rank 0's refresh/query seconds). The ranks agree after each step; a dead
    actor is re-created and refilled once, by every rank together. A refresh longer than query.budget_s stops the run
    with what would make it faster (instead of every rank waiting into Ray Train's collective timeout)."""
    rank, embeddings = rank_and_world()[0], torch.as_tensor(embeddings)
    parts = chunks(len(ids), embeddings.shape[1])

    def chunk(rows: slice) -> tuple[np.ndarray, np.ndarray]:
        return ids[rows], embeddings[rows].float().cpu().numpy()

    for attempt in range(2):
        if name not in _INDEX_ACTORS:
            _INDEX_ACTORS[name] = index_actor(name, embeddings.shape[1], query)
        actor, deadline, refresh = _INDEX_ACTORS[name], time.monotonic() + query.budget_s, token * 2 + attempt
        steps = [[lambda rows=rows: actor.add.remote(refresh, total, *chunk(rows)) for rows in parts],
                 [lambda: actor.build.remote(refresh)] if rank == 0 else [],
                 [lambda rows=rows: actor.neighbours.remote(ids[rows], query.k) for rows in parts]]
        answers = []
        for calls in steps:
            answers.append(_step(calls, deadline, query, total, embeddings.shape[1], name))
            if answers[-1] is None:
                break
        else:
            built, found = answers[1], answers[2]
            timings = {"index_refresh_s": 0.0, "index_peak_rss_mb": 0.0, "index_ivf": 0.0, **(built[0] if built else {}),
                       "index_query_s": sum(seconds for _, seconds in found)}
            table = np.concatenate([rows for rows, _ in found]) if found else np.empty((0, query.k), np.int64)
            return table, timings
        _INDEX_ACTORS.pop(name, None)
    raise NeighbourIndexError(f"the neighbour index actor {name} died twice in one refresh")


def _step(calls: list, deadline: float, query: NeighbourQuery, total: int, dim: int, name: str) -> list | None:
    """Run one step of the index protocol on this rank, one call at a time (one chunk in flight), and agree with
    the others on its outcome: its answers, or None when any rank lost the actor."""
    lost = torch.zeros(1, device=collective_device())
    try:
        answers = [ray.get(call(), timeout=max(deadline - time.monotonic(), 1e-3)) for call in calls]
    except ray.exceptions.RayActorError:
        lost[0], answers = 1.0, None
    except ray.exceptions.GetTimeoutError as exc:
        ray.kill(_INDEX_ACTORS.pop(name))
        raise NeighbourIndexError(
            f"the neighbour index took longer than index_budget_s={query.budget_s:g} for {total} embeddings of "
            f"dimension {dim} (index_kind={query.kind}, index_cpus={query.cpus:g}): use index_kind=ivf_sq8 (or a lower "
            "index_auto_above), more index_cpus, index_gpu=true, or a larger index_budget_s") from exc
    if rank_and_world()[1] > 1:
        dist.all_reduce(lost)
    return None if lost.item() else answers
