"""The Ray Train per-worker loop: an ordinary PyTorch loop with Ray at the points marked `# Ray`.

Everything method-specific is a call to the method object (docs/design.md): its plan for the epoch, its
batch rule, and whether it keeps per-sample state. Records go to the driver as typed messages (messages.py).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from noisymix.distributed import shards
from noisymix.distributed.artifacts import CHECKPOINT_FILE, load_checkpoint, save_checkpoint, unwrap
from noisymix.distributed.engine import (BatchPredictions, DataInfo, InputTransform, TrainSection, accuracy_counts,
                                         build_model, build_optimizer, build_schedule, epoch_rng, image_stages,
                                         peak_rss_mb, train_epoch, transforms, tune_convolutions)
from noisymix.distributed.exchange import distributed
from noisymix.distributed.messages import EpochRecord, StateDigest, StateSnapshot, TrainedIds
from noisymix.distributed.sample_state import SampleState, refresh_state
from noisymix.distributed.settings import AuditSection
from noisymix.mixing.method import BatchContext, EpochPlan, Method
from noisymix.selection.mismatch import MixingTable


@dataclass
class WorkerJob:
    """Everything a training worker needs, typed: the method, the training section, where the data is,
    the epochs to run, and the object-store references the driver prepared."""

    method: Method
    train: TrainSection
    audit: AuditSection
    seed: int
    data_dir: str
    manifest: dict
    stop_epoch: int
    threads: int = 1
    loader_workers: int = 0
    index_name: str = ""
    table: ray.ObjectRef | None = None          # the out-of-fold mixing table's arrays
    fixed_clean: ray.ObjectRef | None = None    # w for every id (`clean_from`)
    channel: object = None                      # a ray.util.queue.Queue to the driver


JOB_KEY = "job"   # the loop's config holds one entry: an object-store reference to the WorkerJob


def train_loop(config: dict) -> None:
    """Run on every worker by TorchTrainer: train, evaluate, checkpoint and report each epoch."""
    job: WorkerJob = ray.get(config[JOB_KEY])  # Ray
    context = ray.train.get_context()  # Ray
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # Ray
    torch.set_num_threads(job.threads)
    tune_convolutions(device)
    data, train = DataInfo.from_manifest(job.manifest, job.train.crop_size), job.train
    torch.manual_seed(job.seed)
    model = ray.train.torch.prepare_model(build_model(train, data))  # Ray
    optimizer = build_optimizer(model, train.lr, train.momentum, train.weight_decay)
    scheduler = build_schedule(optimizer, train.schedule, train.epochs, train.milestones, train.gamma)
    state = None
    if job.method.uses_sample_state:
        state = SampleState(data.counts["train"], job.method.target_codec(data.num_classes), device)
    resumed_from = restore(ray.train.get_checkpoint(), model, optimizer, scheduler, state)  # Ray
    train_transform, eval_transform = transforms(train, data)
    context = batch_context(job, data, state, train_transform, device, unwrap(model))
    rule = job.method.batch_rule(context)
    streams = Streams(job, data, rank, world, pin_memory=device.type == "cuda")
    for epoch in range(resumed_from or 0, job.stop_epoch):
        started, plan = time.perf_counter(), job.method.plan(epoch)
        rule.phase = plan.phase
        if context.fetch_inputs is not None:
            context.fetch_inputs.epoch = epoch
        refresh = {}
        if plan.refresh:
            refresh = refresh_state(state, unwrap(model), streams.exact("train", epoch),
                                    streams.dealt_count("train", epoch), eval_transform, device, train.amp, plan,
                                    job.method.config, job.seed, fixed_clean(job, rank), job.index_name, token=epoch)
            send_state(job, epoch, rank, state)
        elif state is not None and state.ready:
            raise RuntimeError(f"{job.method.name} plans epoch {epoch} without a refresh after its per-sample state "
                               "exists: each epoch's state rows are fetched for that epoch's shards by its refresh")
        stats, ids = run_epoch(model, optimizer, streams.train(epoch), rule, train_transform, device,
                               epoch_rng(job.seed, epoch, rank), train.amp, job.audit.audit_ids, epoch)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics = epoch_metrics(job, epoch, plan, stats, rule.counts, refresh, evaluate(model, streams, eval_transform,
                                device, train.amp), lr, started, world, resumed_from, device)
        if job.audit.audit_ids:
            send(job, TrainedIds(epoch, rank, ids))
        due = checkpoint_due(epoch, job.method.checkpoint_every, job.stop_epoch)
        checkpoint_and_report(metrics, rank, model, optimizer, scheduler, epoch, job.seed, state, due)
        if rank == 0:
            send(job, EpochRecord(metrics))


def checkpoint_due(epoch: int, every: int, stop_epoch: int) -> bool:
    """Whether epoch `epoch` ends with a checkpoint: every `every` epochs, and always at the segment's last."""
    return (epoch + 1) % every == 0 or epoch + 1 == stop_epoch


def send(job: WorkerJob, message) -> None:
    if job.channel is not None:
        job.channel.put(message)


def fixed_clean(job: WorkerJob, rank: int) -> np.ndarray | None:
    """w for every id (`clean_from`), read on rank 0 only: the GMM's rank."""
    return None if job.fixed_clean is None or rank != 0 else ray.get(job.fixed_clean)


def send_state(job: WorkerJob, epoch: int, rank: int, state: SampleState) -> None:
    """Each rank sends its home range's beliefs (and, audited, their digest) to the driver: 12 bytes per sample
    (given and corrected label as int32, clean probability as float32), which the driver joins over all N."""
    if job.audit.audit_state:
        send(job, StateDigest(epoch, rank, state.start, state.stop, state.digest()))
    send(job, StateSnapshot(epoch, state.given.cpu().numpy(), state.corrected().to(torch.int32).cpu().numpy(),
                            state.clean.cpu().numpy(), state.start, state.world))


def restore(checkpoint, model, optimizer, scheduler, state: SampleState | None) -> int | None:
    """Load Ray Train's latest checkpoint, if any, and this rank's home range of the per-sample state from the
    ranks' files in it (written with any world size); returns the epoch to resume from (None: a fresh start)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        saved = load_checkpoint(Path(directory) / CHECKPOINT_FILE)
        if state is not None and state.load(Path(directory)):
            state.loss_history = [h.numpy() for h in saved.get("loss_history", [])] if state.rank == 0 else []
    unwrap(model).load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return saved["epoch"] + 1


@dataclass
class InputsById:
    """Training inputs by id (partners, neighbours): read from the shards at their indexed offsets, decoded
    and cropped like the epoch's training stream, then transformed on the device with the batch's rng."""

    reader: shards.SampleReader
    train: TrainSection
    data: DataInfo
    seed: int
    transform: InputTransform
    device: torch.device
    epoch: int = 0

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        stage = image_stages(self.train, self.data, self.seed, self.epoch)[0]
        images = np.stack([stage(self.reader.read(int(i)), int(i)) for i in ids])
        return self.transform(images, self.device, rng)


def batch_context(job: WorkerJob, data: DataInfo, state: SampleState | None, transform: InputTransform,
                  device: torch.device, model: torch.nn.Module) -> BatchContext:
    """What the method's batch rule reads: the table from the object store (put there once by the driver,
    read zero-copy by the node's workers), inputs by id from the shards, and the (unwrapped) model's
    predictions on a batch."""
    table = None if job.table is None else MixingTable.from_arrays(ray.get(job.table))
    fetch = None
    if job.method.fetches_inputs_by_id():
        reader = shards.SampleReader(job.data_dir, job.manifest, "train")
        fetch = InputsById(reader, job.train, data, job.seed, transform, device)
    predict = BatchPredictions(model, job.train.amp) if job.method.predicts_in_batch() else None
    return BatchContext(data.num_classes, table=table, state=state, fetch_inputs=fetch, predict=predict)


@dataclass
class Streams:
    """This rank's shard streams: the shuffled training stream of an epoch, and exact passes of a split."""

    job: WorkerJob
    data: DataInfo
    rank: int
    world: int
    pin_memory: bool = False   # batches from loader processes go to page-locked memory (a CUDA device)

    def __post_init__(self):
        self.urls = {split: shards.shard_urls(self.job.data_dir, self.job.manifest, split)
                     for split in ("train", "val", "test")}

    def shard_seed(self, epoch: int) -> int:
        return self.job.seed * 100_003 + epoch

    def train(self, epoch: int):
        """Shards re-dealt to ranks with a seeded permutation each epoch, samples shuffled in a seeded buffer."""
        job = self.job
        images = image_stages(job.train, self.data, job.seed, epoch)[0]
        stream = shards.sample_stream(
            self.urls["train"], images=images, label_key=shards.LABEL_KEYS[job.method.label_key], rank=self.rank,
            world_size=self.world, shard_seed=self.shard_seed(epoch), shuffle_buffer=job.train.shuffle_buffer,
            shuffle_seed=int(epoch_rng(job.seed, epoch, self.rank).integers(2**31)), batch_size=job.train.batch_size)
        return shards.iterate_batches(stream, job.loader_workers, self.pin_memory)

    def dealt_count(self, split: str, epoch: int | None = None) -> int:
        """How many samples `exact(split, epoch)` yields on this rank."""
        return shards.dealt_count(self.job.manifest, split, self.rank, self.world,
                                  None if epoch is None else self.shard_seed(epoch))

    def exact(self, split: str, epoch: int | None = None):
        """Every sample of this rank's shards of `split` once, in order, with its given label; with `epoch`, the
        shards this rank trains on in that epoch (its per-sample state refresh)."""
        images = image_stages(self.job.train, self.data, self.job.seed)[1]
        stream = shards.sample_stream(self.urls[split], images=images, rank=self.rank, world_size=self.world,
                                      shard_seed=None if epoch is None else self.shard_seed(epoch),
                                      batch_size=self.job.train.eval_batch)
        return shards.iterate_batches(stream, self.job.loader_workers, self.pin_memory)


def run_epoch(model, optimizer, batches, rule, transform, device, rng, amp: bool, audit_ids: bool, epoch: int):
    """One training epoch; returns its stats and, when audited, the ids it trained on. A non-finite loss
    stops the run, naming the epoch and steps."""
    seen: list[np.ndarray] = []
    rule.counts.update(dict.fromkeys(rule.counts, 0))
    # Ranks hold different sample counts (whole shards each); Join lets a rank that runs out first
    # shadow the others' gradient all-reduces instead of hanging DDP.
    joiner = Join([model]) if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
    with joiner:
        try:
            stats = train_epoch(model, optimizer, batches, rule, transform, device, rng, amp=amp,
                                on_batch=seen.append if audit_ids else None)
        except FloatingPointError as exc:
            raise FloatingPointError(f"epoch {epoch}: {exc}") from exc
    return stats, np.concatenate(seen) if seen else np.empty(0, np.int64)


def evaluate(model, streams: Streams, transform, device, amp: bool) -> list[int]:
    """[val correct, val total, test correct, test total] on this rank's shards."""
    val = accuracy_counts(unwrap(model), streams.exact("val"), transform, device, amp)
    test = accuracy_counts(unwrap(model), streams.exact("test"), transform, device, amp)
    return [*val, *test]


def epoch_metrics(job: WorkerJob, epoch: int, plan: EpochPlan, stats, counts: dict, refresh: dict,
                  accuracy: list[int], lr: float, started: float, world: int, resumed_from, device) -> dict:
    """The epoch's record, summed over ranks; a training pass that missed samples stops the run."""
    totals = _all_reduce([stats.loss_sum, stats.samples, stats.samples / max(stats.seconds, 1e-9), *accuracy], device)
    loss_sum, samples, rate_sum, val_correct, val_total, test_correct, test_total = totals
    (peak_rss,) = _all_reduce([peak_rss_mb()], device, dist.ReduceOp.MAX)
    method_counts = dict(zip(counts, map(int, _all_reduce([float(v) for v in counts.values()], device))))
    for split, read in (("train", samples), ("val", val_total), ("test", test_total)):
        expected = job.manifest["splits"][split]["count"]
        if int(read) != expected:
            raise shards.ShardError(f"epoch {epoch}: the ranks read {int(read)} {split} samples, the manifest lists "
                                    f"{expected}: a shard is short or unreadable (noisymix verify DATA_DIR)")
    return {
        "epoch": epoch, "phase": plan.phase, "train_loss": loss_sum / samples, "val_acc": val_correct / max(val_total, 1),
        "test_acc": test_correct / max(test_total, 1), "lr": lr, "epoch_time_s": time.perf_counter() - started,
        "train_time_s": stats.seconds, "samples_per_s_per_worker": rate_sum / world, "workers": world,
        "resumed_from_epoch": resumed_from, "peak_rss_mb_per_worker": peak_rss,
        **{f"samples_{key}": value for key, value in method_counts.items()}, **refresh,
    }


def checkpoint_and_report(metrics: dict, rank: int, model, optimizer, scheduler, epoch: int, seed: int,
                          state: SampleState | None, due: bool = True) -> None:
    """When `due`, rank 0 writes the checkpoint and each rank its home range of the per-sample state (Ray Train
    merges the ranks' files into one checkpoint); every rank reports (a barrier). Ray keeps the epoch with the
    best noisy-validation accuracy beside the latest; the full record goes to the driver once, as an EpochRecord."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if due and state is not None and state.ready:
            state.save(Path(directory))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        if due and rank == 0:
            history = {"loss_history": [torch.from_numpy(h) for h in state.loss_history]} if state is not None else {}
            save_checkpoint(Path(directory) / CHECKPOINT_FILE, model, optimizer, scheduler, epoch, seed, history)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({"epoch": epoch, "val_acc": metrics["val_acc"]}, checkpoint=checkpoint)  # Ray


def _all_reduce(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    """Reduce numbers across ranks (identity without a process group)."""
    if not distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()

