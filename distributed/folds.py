"""SelectMix's selection stage on Ray: K fold trainings as parallel Ray tasks -> out-of-fold table.

`selection.crossval.out_of_fold_probabilities` is the algorithm; here are what it fits (`FoldTrainer`:
a fresh model trained with the same `train_epoch` as the main trainer, on arrays the driver put in the
object store once) and how it maps over folds (`ray_map`: one task per fold, retried, failures named).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import ray
import torch

from noisymix.distributed import shards
from noisymix.distributed.artifacts import read_out_of_fold
from noisymix.distributed.engine import (DataInfo, TrainSection, build_model, build_optimizer, build_schedule,
                                         epoch_rng, predict, train_epoch, transforms)
from noisymix.mixing.ce import PlainTargets
from noisymix.mixing.selectmix import CrossValConfig
from noisymix.selection.crossval import Fold, FoldOutput, check_out_of_fold, out_of_fold_probabilities
from noisymix.selection.mismatch import MixingTable, build_mixing_table


def array_batches(images: np.ndarray, labels: np.ndarray, positions: np.ndarray, batch_size: int,
                  rng: np.random.Generator | None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Batches of (ids, images, labels) over `positions`, shuffled by rng (None: in order)."""
    order = positions if rng is None else rng.permutation(positions)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        yield chunk, images[chunk], labels[chunk]


@dataclass
class FoldTrainer:
    """fit_predict of one fold: train on K-1 folds with CE on the given labels, predict the held-out fold.

    fold_select=`last` predicts once, after the last epoch; `best` predicts after every epoch and keeps
    the epoch whose predictions agree most with the held-out GIVEN labels (the authors' rule; true
    labels are never read), the latest of ties.

    The model is fresh, or starts from `init_state` (the main model's weights, when the selection is
    re-run mid-training). A warm start is not strictly out-of-fold: the main model has trained on the
    held-out fold's given labels, so late re-selections can inherit what it memorised.
    """

    images: np.ndarray | ray.ObjectRef    # ids are positions: the train split in id order
    labels: np.ndarray
    train: TrainSection
    cv: CrossValConfig
    data: DataInfo
    seed: int
    init_state: dict | None = None

    def __call__(self, fold: Fold) -> FoldOutput:
        started = time.perf_counter()
        images = ray.get(self.images) if isinstance(self.images, ray.ObjectRef) else self.images
        torch.set_num_threads(max(1, int(self.cv.fold_cpus)))
        device = torch.device("cuda" if self.cv.fold_gpus > 0 and torch.cuda.is_available() else "cpu")
        torch.manual_seed(self.seed * 1000 + fold.index)
        model = build_model(self.train, self.data)
        if self.init_state is not None:
            model.load_state_dict(self.init_state)
        model = model.to(device)
        optimizer = build_optimizer(model, self.train.lr, self.train.momentum, self.train.weight_decay)
        scheduler = build_schedule(optimizer, "cosine", self.cv.fold_epochs, [], 0.1)
        train_transform, eval_transform = transforms(self.train, self.data)
        rule = PlainTargets(self.data.num_classes)
        kept, best_agreement = None, -1.0  # (epoch, held ids, probabilities) of the predicting fold epoch
        for epoch in range(self.cv.fold_epochs):
            rng = epoch_rng(self.seed, epoch, 1000 + fold.index)
            batches = array_batches(images, self.labels, fold.train, self.train.batch_size, rng)
            train_epoch(model, optimizer, batches, rule, train_transform, device, rng, amp=self.train.amp)
            scheduler.step()
            if self.cv.fold_select == "best" or epoch == self.cv.fold_epochs - 1:
                held = array_batches(images, self.labels, fold.held, 4 * self.train.batch_size, None)
                held_ids, held_labels, probs = predict(model, held, eval_transform, device, self.train.amp)
                agreement = float(np.mean(probs.argmax(axis=1) == held_labels))
                if agreement >= best_agreement:
                    kept, best_agreement = (epoch + 1, held_ids, probs), agreement
        epoch, held_ids, probs = kept
        return FoldOutput(held_ids, probs, {"seconds": time.perf_counter() - started, "kept_epoch": epoch})


@ray.remote
def _run(fn, item):
    return fn(item)


def ray_map(fn: Callable, items: Sequence, *, cpus: float = 1.0, gpus: float = 0.0, retries: int = 2) -> list:
    """fn over items as parallel Ray tasks (fn put in the object store once); results in order. A task that
    dies is retried `retries` times by Ray; after that the error names the item and the others are cancelled."""
    fn_ref = ray.put(fn)
    task = _run.options(num_cpus=cpus, num_gpus=gpus, max_retries=retries, retry_exceptions=False)
    pending = [task.remote(fn_ref, item) for item in items]
    outputs = []
    for position, ref in enumerate(pending):
        try:
            outputs.append(ray.get(ref))
        except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as exc:
            for other in pending:
                ray.cancel(other, force=True)
            raise RuntimeError(f"fold {position} of {len(items)} failed after {retries} retries: {exc}") from exc
    return outputs


@dataclass
class Selection:
    """The selection stage's products: the table (with the given labels it is for), the fold of each id,
    what each fold cost, and the object-store references the workers read."""

    table: MixingTable
    fold_of: np.ndarray
    fold_runs: list[dict]
    seconds: float
    images_ref: ray.ObjectRef
    table_ref: ray.ObjectRef


def select(cv: CrossValConfig, train: TrainSection, seed: int, data_dir: str, manifest: dict,
           previous: Selection | None = None, init_state: dict | None = None) -> Selection:
    """Run the K folds as Ray tasks and build the mixing table (methods.md A1-A2).

    The first selection reads the train split once and puts its images in the object store, where
    fold tasks and train workers read them zero-copy (they also serve inputs by id); a re-selection
    reuses them and warm-starts the folds from `init_state`. With `oof_from`, the first selection takes
    an earlier run's out-of-fold probabilities instead of training folds.
    """
    started = time.perf_counter()
    if previous is None:
        ids, images, given = shards.load_split(data_dir, manifest)
        if not np.array_equal(ids, np.arange(len(ids))):
            raise shards.ShardError(f"train ids of {data_dir} are not 0..N-1: re-run prepare")
        images_ref = ray.put(images)
    else:
        images_ref, given = previous.images_ref, previous.table.given
    if previous is None and cv.oof_from:
        probs, fold_of = check_out_of_fold(read_out_of_fold(cv.oof_from), given, manifest["num_classes"],
                                           cv.oof_from)
        fold_runs = []
    else:
        trainer = FoldTrainer(images_ref, given, train, cv, DataInfo.from_manifest(manifest), seed, init_state)
        runner = functools.partial(ray_map, cpus=cv.fold_cpus, gpus=cv.fold_gpus, retries=cv.fold_retries)
        probs, fold_of, fold_runs = out_of_fold_probabilities(given, cv.folds, seed, trainer, map=runner)
    table = build_mixing_table(probs, given, cv.tau_low, cv.tau_high)
    return Selection(table, fold_of, fold_runs, time.perf_counter() - started, images_ref,
                     ray.put(table.to_arrays()))
