"""The Ray Train per-worker loop: an ordinary PyTorch loop plus get_context, prepare_model, report, get_checkpoint."""

from __future__ import annotations

import contextlib
import resource
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from noisymix.distributed import shards
from noisymix.distributed.engine import (InputTransform, accuracy_counts, build_optimizer, epoch_rng, lr_factor,
                                         resolve_padding, train_epoch)
from noisymix.distributed.models import create_model
from noisymix.distributed.sample_state import PassSettings, SampleState, refresh_state
from noisymix.mixing.methods import GMMSelectTargets, MixupTargets, PlainTargets
from noisymix.mixing.mixnn import MixNNTargets
from noisymix.mixing.selectmix import SelectMixTargets
from noisymix.selection.mismatch import MixingTable

CHECKPOINT_FILE = "state.pt"


def _fetch_by_id(loop_config: dict, transform: InputTransform, device: torch.device):
    """Random access to training inputs by id, from the arrays the driver put in the object store once."""
    images = ray.get(loop_config["train_images"])  # zero-copy, shared by the node's workers

    def fetch(ids: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        return transform(images[ids], device, rng)

    return fetch


def make_method(cfg: SimpleNamespace, num_classes: int, loop_config: dict, transform: InputTransform,
                device: torch.device, sample_state: SampleState | None):
    """The batch rule of cfg.method (docs/methods.md A3, B3, and C for the baselines)."""
    if cfg.method in ("ce", "clean"):
        return PlainTargets(num_classes)
    if cfg.method == "mixup":
        return MixupTargets(num_classes, cfg.alpha)
    if cfg.method == "selectmix":
        table = MixingTable.from_arrays(ray.get(loop_config["selectmix_table"]))
        fetch = _fetch_by_id(loop_config, transform, device) if cfg.partner_source == "global" else None
        return SelectMixTargets(num_classes, table.uncertain, table.predicted, table.probs, table.pools,
                                alpha=cfg.alpha, partners=cfg.partners, label=cfg.selectmix_label,
                                partner_source=cfg.partner_source, lambda_per=cfg.lambda_per,
                                buffer_size=cfg.buffer_size, fetch_inputs=fetch)
    if cfg.method == "mixnn":
        fetch = _fetch_by_id(loop_config, transform, device) if cfg.neighbour_source == "global" else None
        return MixNNTargets(num_classes, sample_state, k=cfg.knn, eps=cfg.weight_eps, alpha=cfg.alpha,
                            neighbour_source=cfg.neighbour_source, fetch_inputs=fetch)
    if cfg.method == "gmm_select":
        return GMMSelectTargets(num_classes, sample_state, cfg.gmm_threshold)
    raise ValueError(f"method {cfg.method!r} has no batch rule")


def phase_for(cfg: SimpleNamespace, epoch: int) -> str:
    """MixNN: CE warm-up, Mixup until `es`, then neighbours (methods.md B); GMM selection: warm-up, select."""
    if epoch < cfg.warmup:
        return "warmup"
    if cfg.method == "gmm_select":
        return "select"
    return "mixup" if epoch < cfg.es else "neighbours"


def pass_settings(cfg: SimpleNamespace, epoch: int, index_name: str,
                  fixed_clean: np.ndarray | None = None) -> PassSettings:
    """What this epoch's refresh does: soft targets move from `es` every `update_every` epochs; the clean
    probabilities come from the loss GMM unless `clean_from` fixed them."""
    mixnn_main = cfg.method == "mixnn" and epoch >= cfg.es
    return PassSettings(
        epoch_updates_targets=mixnn_main and (epoch - cfg.es) % cfg.update_every == 0,
        momentum=cfg.soft_momentum, loss_window=cfg.loss_window, gmm_max_iter=cfg.gmm_max_iter,
        gmm_tol=cfg.gmm_tol, gmm_reg_covar=cfg.gmm_reg_covar, seed=cfg.seed,
        neighbours=cfg.knn if mixnn_main and cfg.neighbour_source == "global" else 0,
        index_name=index_name, index_metric=cfg.index_metric, index_kind=cfg.index_kind,
        index_nlist=cfg.index_nlist, index_nprobe=cfg.index_nprobe,
        index_threads=max(1, int(cfg.cpus_per_worker)), index_gpu=cfg.index_gpu, fixed_clean=fixed_clean,
    )


def training_label_key(cfg: SimpleNamespace) -> str:
    """Only the clean upper bound trains on true labels; every other method streams the given ones."""
    return shards.TRUE_LABEL if cfg.method == "clean" else shards.GIVEN_LABEL


def save_state(path: Path, model, optimizer, scheduler, epoch: int, seed: int,
               sample_state: SampleState | None = None) -> None:
    """Everything a resumed run needs; the RNG state is a function of (seed, epoch, rank): see epoch_rng."""
    cpu = torch.device("cpu")
    extra = {} if sample_state is None else {
        "sample_state": {k: _to_device(v, cpu) for k, v in sample_state.state_dict().items()}}
    torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "seed": seed,
                "torch_rng": torch.get_rng_state(), **extra}, path)


def load_state(path: Path) -> dict:
    """A checkpoint saved by save_state, read with weights_only=True (no arbitrary unpickling)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_device(value, device: torch.device):
    """Tensors, and lists of them, moved to `device`; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return [_to_device(v, device) for v in value] if isinstance(value, list) else value


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def _all_reduce(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    """Reduce numbers across ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def _peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_loop(loop_config: dict) -> None:
    """Run on every worker by TorchTrainer: train, evaluate, checkpoint and report each epoch."""
    cfg = SimpleNamespace(**loop_config["config"])
    manifest, data_dir, channel = loop_config["manifest"], loop_config["data_dir"], loop_config.get("channel")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop_config["threads"])
    device = ray.train.torch.get_device()

    height, _, channels = manifest["image_shape"]
    num_classes = manifest["num_classes"]
    torch.manual_seed(cfg.seed)
    model = ray.train.torch.prepare_model(create_model(cfg.model, channels, num_classes, height, cfg.width))
    optimizer = build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.schedule, cfg.epochs, cfg.milestones, cfg.gamma))
    start_epoch, resumed_from = 0, None
    needs_pass = cfg.method in ("mixnn", "gmm_select")
    sample_state = SampleState(manifest["splits"]["train"]["count"], num_classes) if needs_pass else None
    fixed_clean = ray.get(loop_config["fixed_clean"]) if "fixed_clean" in loop_config else None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(Path(directory) / CHECKPOINT_FILE)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = resumed_from = state["epoch"] + 1
        if sample_state is not None and "sample_state" in state:
            sample_state.load_state_dict({k: _to_device(v, device) for k, v in state["sample_state"].items()})

    mean, std = tuple(manifest["mean"]), tuple(manifest["std"])
    train_transform = InputTransform(mean, std, resolve_padding(cfg.crop_padding, height), cfg.hflip)
    eval_transform = InputTransform(mean, std)
    method = make_method(cfg, num_classes, loop_config, train_transform, device, sample_state)
    counts = getattr(method, "counts", {})
    label_key = training_label_key(cfg)
    urls = {split: shards.shard_urls(data_dir, manifest, split) for split in ("train", "val", "test")}

    def eval_stream(split: str):
        stream = shards.sample_stream(urls[split], rank=rank, world_size=world, batch_size=4 * cfg.batch_size)
        return shards.iterate_batches(stream, cfg.loader_workers)

    for epoch in range(start_epoch, loop_config.get("stop_epoch", cfg.epochs)):
        started = time.perf_counter()
        stream = shards.sample_stream(
            urls["train"], label_key=label_key, rank=rank, world_size=world, shard_seed=cfg.seed * 100_003 + epoch,
            shuffle_buffer=cfg.shuffle_buffer, shuffle_seed=int(epoch_rng(cfg.seed, epoch, rank).integers(2**31)),
            batch_size=cfg.batch_size,
        )
        seen: list[np.ndarray] = []
        counts.update(dict.fromkeys(counts, 0))
        refresh: dict = {}
        if needs_pass:
            method.phase = phase_for(cfg, epoch)
            if epoch >= cfg.warmup:
                refresh = refresh_state(sample_state, _unwrap(model), eval_stream("train"), eval_transform, device,
                                        cfg.amp, cfg.normalise_embeddings,
                                        pass_settings(cfg, epoch, loop_config["index_name"], fixed_clean))
                if channel is not None and cfg.audit_state:
                    channel.put({"kind": "state_digest", "epoch": epoch, "rank": rank, "digest": sample_state.digest()})
                if channel is not None and rank == 0:
                    channel.put({"kind": "state", "epoch": epoch, "given": sample_state.given.cpu().numpy(),
                                 "corrected": sample_state.targets.argmax(dim=1).cpu().numpy(),
                                 "clean": sample_state.clean.cpu().numpy()})
        # Ranks hold different sample counts (whole shards each); Join lets a rank that runs out
        # first shadow the others' gradient all-reduces instead of hanging DDP.
        joiner = Join([model]) if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
        with joiner:
            stats = train_epoch(model, optimizer, shards.iterate_batches(stream, cfg.loader_workers), method,
                                train_transform, device, epoch_rng(cfg.seed, epoch, rank), amp=cfg.amp,
                                on_batch=seen.append if cfg.audit_ids else None)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val_correct, val_total = accuracy_counts(_unwrap(model), eval_stream("val"), eval_transform, device, cfg.amp)
        test_correct, test_total = accuracy_counts(_unwrap(model), eval_stream("test"), eval_transform, device, cfg.amp)
        totals = _all_reduce([stats.loss_sum, stats.samples, stats.samples / max(stats.seconds, 1e-9),
                           val_correct, val_total, test_correct, test_total], device)
        loss_sum, samples, rate_sum, val_correct, val_total, test_correct, test_total = totals
        (peak_rss_mb,) = _all_reduce([_peak_rss_mb()], device, dist.ReduceOp.MAX)
        method_counts = dict(zip(counts, map(int, _all_reduce([float(v) for v in counts.values()], device))))
        if int(samples) != manifest["splits"]["train"]["count"]:
            raise shards.ShardError(f"epoch {epoch}: the ranks read {int(samples)} training samples, the manifest "
                                    f"lists {manifest['splits']['train']['count']}: a shard is short or unreadable")
        metrics = {
            "epoch": epoch, "train_loss": loss_sum / samples, "val_acc": val_correct / max(val_total, 1),
            "test_acc": test_correct / max(test_total, 1), "lr": lr, "epoch_time_s": time.perf_counter() - started,
            "train_time_s": stats.seconds, "samples_per_s_per_worker": rate_sum / world, "workers": world,
            "resumed_from_epoch": resumed_from, "peak_rss_mb_per_worker": peak_rss_mb,
            **{f"samples_{key}": value for key, value in method_counts.items()}, **refresh,
            **({"phase": method.phase} if needs_pass else {}),
        }
        if channel is not None and cfg.audit_ids:
            channel.put({"kind": "ids", "epoch": epoch, "rank": rank,
                         "ids": np.concatenate(seen) if seen else np.empty(0, np.int64)})
        with tempfile.TemporaryDirectory() as directory:
            ckpt = None
            if rank == 0:
                save_state(Path(directory) / CHECKPOINT_FILE, model, optimizer, scheduler, epoch, cfg.seed, sample_state)
                ckpt = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=ckpt)
        if channel is not None and rank == 0:
            channel.put({"kind": "epoch", **metrics})
