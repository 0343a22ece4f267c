"""SelectMix's selection stage: K fold trainings as parallel Ray tasks -> out-of-fold probabilities.

Each fold task trains a fresh model with the same `train_epoch` as the main trainer, on arrays that
the driver puts in the object store once (read zero-copy by every task), then predicts its held-out
fold. `run_folds_in_process` runs the very same function in sequence, for tests and laptops.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray
import torch

from noisymix.distributed import shards
from noisymix.distributed.engine import (InputTransform, build_optimizer, epoch_rng, lr_factor, predict,
                                         resolve_padding, train_epoch)
from noisymix.distributed.models import create_model
from noisymix.mixing.methods import PlainTargets
from noisymix.selection.crossval import assemble_out_of_fold, load_out_of_fold, stratified_folds
from noisymix.selection.mismatch import MixingTable, build_mixing_table


@dataclass(frozen=True)
class FoldSettings:
    """What a fold training needs; the epochs are the fold schedule (`fold_epochs`), not the main one."""

    model: str
    width: int
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int
    hflip: bool
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    seed: int
    threads: int = 1
    use_gpu: bool = False
    amp: bool = False
    keep: str = "best"     # the fold epoch that predicts: `best` held-out agreement with the given labels, or `last`


@dataclass
class FoldResult:
    """One fold's held-out predictions, the fold epoch they come from (1-based), and its wall time."""

    fold: int
    held_ids: np.ndarray
    probs: np.ndarray
    kept_epoch: int
    seconds: float


def load_split(data_dir: str, manifest: dict, split: str = "train",
               label_key: str = shards.GIVEN_LABEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, uint8 images, labels) of a whole split in id order: one exact pass over its shards.

    label_key is the given label unless an evaluation asks for the true one.
    """
    stream = shards.sample_stream(shards.shard_urls(data_dir, manifest, split), label_key=label_key, batch_size=4096)
    parts = list(stream)
    ids = np.concatenate([p[0] for p in parts])
    order = np.argsort(ids)
    return ids[order], np.concatenate([p[1] for p in parts])[order], np.concatenate([p[2] for p in parts])[order]


def load_labels(data_dir: str, manifest: dict, split: str = "train", label_key: str = shards.GIVEN_LABEL) -> np.ndarray:
    """The labels of a whole split in id order, read without the images (load_split's labels, cheaply)."""
    pairs = np.array(list(shards.label_stream(shards.shard_urls(data_dir, manifest, split), label_key=label_key)),
                     dtype=np.int64).reshape(-1, 2)
    return pairs[np.argsort(pairs[:, 0]), 1]


def array_batches(images: np.ndarray, labels: np.ndarray, positions: np.ndarray, batch_size: int,
                  rng: np.random.Generator | None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batches of (ids, images, labels) over `positions`, shuffled by rng (None: in order)."""
    order = positions if rng is None else rng.permutation(positions)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        yield chunk, images[chunk], labels[chunk]


def train_fold(fold: int, train_pos: np.ndarray, held_pos: np.ndarray, images: np.ndarray, labels: np.ndarray,
               s: FoldSettings, init_state: dict | None = None) -> FoldResult:
    """Train a model on K-1 folds with CE on the given labels; predict the held-out fold.

    keep=`last` predicts once, after the last epoch; keep=`best` predicts after every epoch and keeps
    the epoch whose predictions agree most with the held-out GIVEN labels (the authors' rule; true
    labels are never read), the latest of ties.

    The model is fresh, or starts from `init_state` (the main model's weights, when the selection is
    re-run mid-training). A warm start is not strictly out-of-fold: the main model has trained on the
    held-out fold's given labels, so late re-selections can inherit what it memorised.
    """
    started = time.perf_counter()
    torch.set_num_threads(s.threads)
    device = torch.device("cuda" if s.use_gpu and torch.cuda.is_available() else "cpu")
    torch.manual_seed(s.seed * 1000 + fold)
    model = create_model(s.model, s.channels, s.num_classes, s.image_size, s.width)
    if init_state is not None:
        model.load_state_dict(init_state)
    model = model.to(device)
    optimizer = build_optimizer(model, s.lr, s.momentum, s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor("cosine", s.epochs, [], 0.1))
    transform = InputTransform(s.mean, s.std, s.padding, s.hflip)
    method = PlainTargets(s.num_classes)
    kept, best_agreement = None, -1.0  # (epoch, held ids, probabilities) of the predicting fold epoch
    for epoch in range(s.epochs):
        rng = epoch_rng(s.seed, epoch, 1000 + fold)
        train_epoch(model, optimizer, array_batches(images, labels, train_pos, s.batch_size, rng), method,
                    transform, device, rng, amp=s.amp)
        scheduler.step()
        if s.keep == "best" or epoch == s.epochs - 1:
            held_ids, held_labels, probs = predict(
                model, array_batches(images, labels, held_pos, 4 * s.batch_size, None), InputTransform(s.mean, s.std),
                device, s.amp)
            agreement = float(np.mean(probs.argmax(axis=1) == held_labels))
            if agreement >= best_agreement:
                kept, best_agreement = (epoch + 1, held_ids, probs), agreement
    epoch, held_ids, probs = kept
    return FoldResult(fold, held_ids, probs, epoch, time.perf_counter() - started)


@ray.remote
def _fold_task(fold, train_pos, held_pos, images, labels, settings, init_state):
    return train_fold(fold, train_pos, held_pos, images, labels, settings, init_state)


def run_folds_parallel(images_ref: ray.ObjectRef, labels: np.ndarray, k: int, settings: FoldSettings, *,
                       cpus: float = 1.0, gpus: float = 0.0, retries: int = 2,
                       init_state: dict | None = None) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(out-of-fold P, fold of each id, per fold {seconds, kept_epoch}): K tasks over images already in the
    object store.

    A task that dies is retried `retries` times by Ray; after that the error names the fold.
    """
    folds = stratified_folds(labels, k, settings.seed)
    labels_ref, init_ref = ray.put(labels), ray.put(init_state)
    task = _fold_task.options(num_cpus=cpus, num_gpus=gpus, max_retries=retries, retry_exceptions=False)
    pending = {task.remote(f, tr, held, images_ref, labels_ref, settings, init_ref): f
               for f, (tr, held) in enumerate(folds)}
    outputs = []
    for ref, fold in pending.items():
        try:
            outputs.append(ray.get(ref))
        except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as exc:
            for other in pending:
                ray.cancel(other, force=True)
            raise RuntimeError(f"fold {fold} of {k} failed after {retries} retries: {exc}") from exc
    return _assemble(outputs, folds, len(labels))


def run_folds_in_process(images: np.ndarray, labels: np.ndarray, k: int,
                         settings: FoldSettings) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """The same folds, trained one after another in this process."""
    folds = stratified_folds(labels, k, settings.seed)
    outputs = [train_fold(f, tr, held, images, labels, settings) for f, (tr, held) in enumerate(folds)]
    return _assemble(outputs, folds, len(labels))


def _assemble(outputs: list[FoldResult], folds: list, n: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    probs = assemble_out_of_fold(n, ((o.held_ids, o.probs) for o in outputs))
    fold_of = np.empty(n, dtype=np.int64)
    for f, (_, held) in enumerate(folds):
        fold_of[held] = f
    return probs, fold_of, [{"seconds": o.seconds, "kept_epoch": o.kept_epoch}
                            for o in sorted(outputs, key=lambda o: o.fold)]


@dataclass
class Selection:
    """The selection stage's products: the table, the inputs behind it, and what it cost."""

    table: MixingTable
    given: np.ndarray
    fold_of: np.ndarray
    fold_runs: list[dict]
    seconds: float
    images_ref: ray.ObjectRef
    table_ref: ray.ObjectRef


def fold_settings(cfg, manifest: dict) -> FoldSettings:
    height, _, channels = manifest["image_shape"]
    return FoldSettings(
        model=cfg.model, width=cfg.width, num_classes=manifest["num_classes"], image_size=height, channels=channels,
        mean=tuple(manifest["mean"]), std=tuple(manifest["std"]), padding=resolve_padding(cfg.crop_padding, height),
        hflip=cfg.hflip, epochs=cfg.fold_epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, seed=cfg.seed, threads=max(1, int(cfg.fold_cpus)),
        use_gpu=cfg.fold_gpus > 0, amp=cfg.amp, keep=cfg.fold_select,
    )


def selection_stage(cfg, manifest: dict, data_dir: str, previous: Selection | None = None,
                    init_state: dict | None = None) -> Selection:
    """Run the K folds as Ray tasks and build the mixing table (methods.md A1-A2).

    The first selection reads the train split once and puts its images in the object store, where
    fold tasks and train workers read them zero-copy (they also serve `partner_source=global`); a
    re-selection reuses them and warm-starts the folds from `init_state`. With `oof_from`, the first
    selection takes an earlier run's out-of-fold probabilities instead of training folds.
    """
    started = time.perf_counter()
    if previous is None:
        ids, images, given = load_split(data_dir, manifest)
        if not np.array_equal(ids, np.arange(len(ids))):
            raise shards.ShardError(f"train ids of {data_dir} are not 0..N-1: re-run prepare")
        images_ref = ray.put(images)
    else:
        images_ref, given = previous.images_ref, previous.given
    if previous is None and cfg.oof_from:
        probs, fold_of = load_out_of_fold(cfg.oof_from, given, manifest["num_classes"])
        fold_runs = []
    else:
        probs, fold_of, fold_runs = run_folds_parallel(images_ref, given, cfg.folds, fold_settings(cfg, manifest),
                                                       cpus=cfg.fold_cpus, gpus=cfg.fold_gpus,
                                                       retries=cfg.fold_retries, init_state=init_state)
    table = build_mixing_table(probs, given, cfg.tau_low, cfg.tau_high)
    return Selection(table, given, fold_of, fold_runs, time.perf_counter() - started, images_ref,
                     ray.put(table.to_arrays()))
