"""SelectMix's selection stage on Ray: K fold trainings as parallel Ray tasks -> out-of-fold table.

`selection.crossval.out_of_fold_probabilities` is the algorithm; here are what it fits (`FoldTrainer`:
a fresh model trained with the same `train_epoch` as the main trainer, streaming the train shards) and
how it maps over folds (`ray_map`: one task per fold, retried, failures named).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch

from noisymix.distributed import shards
from noisymix.distributed.artifacts import read_out_of_fold, write_atomic
from noisymix.distributed.engine import (DataInfo, TrainSection, build_model, build_optimizer, build_schedule,
                                         epoch_rng, image_stages, peak_rss_mb, predict, train_epoch, transforms,
                                         tune_convolutions)
from noisymix.mixing.ce import PlainTargets
from noisymix.mixing.method import BatchRule
from noisymix.mixing.mixup import MixupTargets
from noisymix.mixing.selectmix import CrossValConfig
from noisymix.selection.crossval import (Fold, FoldOutput, SelectionError, check_out_of_fold,
                                         out_of_fold_probabilities)
from noisymix.selection.flag_rules import corrected_labels, flag_given_labels
from noisymix.selection.mismatch import MixingTable, build_mixing_table


@dataclass
class FoldTrainer:
    """fit_predict of one fold: train on K-1 folds with CE on the given labels (or Mixup of alpha
    `fold_mixup` > 0), predict the held-out fold.
    Both passes stream the train split's shards, keeping only the fold's ids (no split is ever held).

    fold_select=`last` predicts once, after the last epoch; `best` predicts after every epoch and keeps
    the epoch whose predictions agree most with the held-out GIVEN labels (the authors' rule; true
    labels are never read), the latest of ties.

    The model is fresh, or starts from `init_state` (the main model's weights, when the selection is
    re-run mid-training). A warm start is not strictly out-of-fold: the main model has trained on the
    held-out fold's given labels, so late re-selections can inherit what it memorised.

    `labels` (a later fold round): every id's label to train on and to agree with, in place of the given one.
    `trusted` (a later round of fold_round_train=kept): only these ids of the fold's training part are trained
    on; the whole held-out part is predicted.
    """

    data_dir: str
    manifest: dict
    train: TrainSection
    cv: CrossValConfig
    seed: int
    init_state: dict | None = None
    labels: np.ndarray | None = None
    trusted: np.ndarray | None = None

    def __call__(self, fold: Fold) -> FoldOutput:
        started = time.perf_counter()
        threads = max(1, int(self.cv.fold_cpus))
        torch.set_num_threads(threads)
        device = torch.device("cuda" if self.cv.fold_gpus > 0 and torch.cuda.is_available() else "cpu")
        tune_convolutions(device)
        data = DataInfo.from_manifest(self.manifest, self.train.crop_size)
        torch.manual_seed(self.seed * 1000 + fold.index)
        model = build_model(self.train, data)
        if self.init_state is not None:
            model.load_state_dict(self.init_state)
        model = model.to(device)
        optimizer = build_optimizer(model, self.train.lr, self.train.momentum, self.train.weight_decay)
        scheduler = build_schedule(optimizer, "cosine", self.cv.fold_epochs, [], 0.1)
        train_transform, eval_transform = transforms(self.train, data)
        rule = (MixupTargets(data.num_classes, alpha=self.cv.fold_mixup) if self.cv.fold_mixup > 0
                else PlainTargets(data.num_classes))
        if self.labels is not None:
            rule = RelabelledTargets(data.num_classes, labels=self.labels, rule=rule)
        urls = shards.shard_urls(self.data_dir, self.manifest, "train")
        in_train = np.zeros(data.counts["train"], dtype=bool)
        in_train[fold.train] = True
        held_out = ~in_train
        if self.trusted is not None:
            in_train &= self.trusted
        loaders = threads - 1     # the task's other CPUs decode in loader workers
        pin = device.type == "cuda"
        kept, best_agreement = None, -1.0  # (epoch, held ids, probabilities) of the predicting fold epoch
        summed = None                      # ensemble: the held-out probabilities summed over epochs, in id order
        for epoch in range(self.cv.fold_epochs):
            rng = epoch_rng(self.seed, epoch, 1000 + fold.index)
            shard_seed, shuffle_seed = (int(v) for v in rng.integers(2**31, size=2))
            train_images, eval_images = image_stages(self.train, data, self.seed * 1000 + fold.index, epoch)
            stream = shards.sample_stream(urls, images=train_images, shard_seed=shard_seed,
                                          shuffle_buffer=self.train.shuffle_buffer, shuffle_seed=shuffle_seed,
                                          batch_size=self.train.batch_size, only=shards.IdFilter(in_train))
            stats = train_epoch(model, optimizer, shards.iterate_batches(stream, loaders, pin), rule, train_transform,
                                device, rng, amp=self.train.amp)
            if stats.samples != int(in_train.sum()):
                raise shards.ShardError(f"fold {fold.index}, epoch {epoch}: read {stats.samples} training samples of "
                                        f"{int(in_train.sum())}: a shard is short or unreadable (noisymix verify DATA_DIR)")
            scheduler.step()
            if self.cv.fold_select != "last" or epoch == self.cv.fold_epochs - 1:
                held = shards.sample_stream(urls, images=eval_images, batch_size=self.train.eval_batch,
                                            only=shards.IdFilter(held_out))
                held_ids, held_labels, probs = predict(model, shards.iterate_batches(held, loaders, pin), eval_transform,
                                                       device, self.train.amp)
                if self.cv.fold_select == "ensemble":
                    order = np.argsort(held_ids)
                    summed = probs[order] if summed is None else summed + probs[order]
                    kept = (f"mean of 1-{epoch + 1}", held_ids[order], summed / (epoch + 1))
                    continue
                reference = held_labels if self.labels is None else self.labels[held_ids]
                agreement = float(np.mean(probs.argmax(axis=1) == reference))
                if agreement >= best_agreement:
                    kept, best_agreement = (epoch + 1, held_ids, probs), agreement
        epoch, held_ids, probs = kept
        return FoldOutput(held_ids, probs, {"seconds": time.perf_counter() - started, "kept_epoch": epoch,
                                            "peak_rss_mb": peak_rss_mb()})


@dataclass
class RelabelledTargets(BatchRule):
    """`rule` applied with each sample's label looked up by id in `labels` instead of the stream's."""

    labels: np.ndarray = None
    rule: BatchRule = None

    def batch(self, ids: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rule.batch(ids, inputs, torch.from_numpy(self.labels[ids.numpy()]), rng)


TABLE_FILE = "out_of_fold.assembling.npy"


def _run(fn, item):
    return fn(item)


_task = ray.remote(_run)   # Ray names both `_run`: its processes are titled ray::_run
_task_in_a_fresh_process = ray.remote(max_calls=1)(_run)   # max_calls cannot be set through .options()


class FoldCache:
    """The finished folds of one selection round, kept in the run directory (held-out ids, probabilities,
    info), so a resumed run trains only the folds it had not finished."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _path(self, index: int) -> Path:
        return self.directory / f"fold{index}.npz"

    def has(self, index: int) -> bool:
        return self._path(index).is_file()

    def load(self, index: int) -> FoldOutput:
        with np.load(self._path(index), allow_pickle=False) as data:
            return FoldOutput(data["held_ids"], data["probs"], json.loads(str(data["info"])))

    def round(self, index: int) -> FoldCache:
        """The cache of fold round `index` (> 0) of the same selection."""
        return FoldCache(self.directory / f"round{index}")

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def table(self, shape: tuple[int, int]) -> np.ndarray:
        """The round's N x C out-of-fold table: a zeroed float32 .npy mapped into memory, so its pages belong to
        the page cache (written back, dropped under pressure), not to the driver's heap; at WebVision's 2.4M x 1000
        that is 9.6 GB the driver need not hold. Its disk space is reserved up front, so a full disk fails here as
        an OSError naming the file, not later as a SIGBUS on a write through the map. The file is scratch, never
        read back (a resumed run refills it from the fold parts); clear() removes it with the parts, and its space
        returns once the table is let go (Selection.without_probs)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / TABLE_FILE
        probs = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        try:
            with open(path, "r+b") as fh:
                os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise OSError(exc.errno, f"no room for the {np.prod(shape) * 4 / 2**30:.2f} GiB out-of-fold table: "
                          f"{exc.strerror}", str(path)) from exc
        return np.asarray(probs)   # a plain ndarray over the map (whose base keeps it open): no memmap subclass

    def save(self, index: int, output: FoldOutput) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

        def write(partial: Path) -> None:
            with open(partial, "wb") as fh:
                np.savez(fh, held_ids=output.held_ids, probs=output.probs, info=np.array(json.dumps(output.info)))

        write_atomic(self._path(index), write)


def ray_map(fn: Callable, items: Sequence, *, cpus: float = 1.0, gpus: float = 0.0, retries: int = 2,
            cache: FoldCache | None = None, fresh_process: bool = False) -> Iterator:
    """fn over items as parallel Ray tasks (fn put in the object store once), results yielded in order. Each result
    is cached as it arrives; until its turn the driver keeps only its reference, so no view pins it in the object
    store (Ray may evict or spill it) and the caller holds one at a time. Items the cache holds are not run again.
    A task that dies is retried `retries` times by Ray; after that the error names the item. `fresh_process`: each
    task in a worker process of its own, which exits after it (Ray's max_calls=1), so what one task leaves in the
    process's heap never adds to the next's peak.

    Tasks still running when the map ends early (a failure, an interrupt, the caller stops reading) are not
    cancelled: they end with the job that owns them (Ray kills a driver's tasks as it exits, a Tune trial's as its
    actor ends). A cancel that meets a task Ray is retrying aborts the driver (a Ray core check, 2.60: "Tried to
    complete task that was not pending"; CI hit it on Ctrl-C after a killed fold), which a resumable stop must not do."""
    fn_ref = ray.put(fn)
    # DEFAULT: a fold task reserves its own CPUs, also when started from inside a Ray Tune trial (whose
    # placement group would otherwise capture it).
    task = (_task_in_a_fresh_process if fresh_process else _task).options(
        num_cpus=cpus, num_gpus=gpus, max_retries=retries, retry_exceptions=False, scheduling_strategy="DEFAULT")
    refs = {k: task.remote(fn_ref, items[k]) for k in range(len(items)) if cache is None or not cache.has(k)}
    pending = {ref: k for k, ref in refs.items()}

    def result(k: int):
        try:
            return ray.get(refs[k])
        except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as exc:
            raise RuntimeError(f"fold {k} of {len(items)} failed after {retries} retries: {exc}") from exc

    for k in range(len(items)):
        if k not in refs:    # the cache held it when the map began
            yield cache.load(k)
            continue
        while refs[k] in pending:    # meanwhile, name a failure as soon as any task has one, and cache
            ready, _ = ray.wait(list(pending), num_returns=1)
            done = pending.pop(ready[0])
            finished = result(done)
            if cache is not None:
                cache.save(done, finished)
            del finished
        finished = result(k)
        del refs[k]
        yield finished
        del finished


@dataclass
class Selection:
    """The selection stage's products: the table (with the given labels it is for), the fold of each id,
    what each fold cost, and the object-store reference of what the workers read of the table."""

    table: MixingTable
    fold_of: np.ndarray
    fold_runs: list[dict]
    seconds: float
    table_ref: ray.ObjectRef

    def without_probs(self) -> Selection:
        """This selection less its N x C probabilities: what the driver keeps through training (the workers read
        their copy in the object store, oof.npz holds the table; at WebVision's size it is 9.6 GB)."""
        return dataclasses.replace(self, table=dataclasses.replace(self.table, probs=None))


def select(cv: CrossValConfig, train: TrainSection, seed: int, data_dir: str, manifest: dict,
           previous: Selection | None = None, init_state: dict | None = None,
           workers_read_probs: bool = False, cache: FoldCache | None = None,
           noise_matrix: str | None = None) -> Selection:
    """Run the K folds as Ray tasks and build the mixing table (methods.md A1-A2).

    Each fold task streams the train shards itself; the driver reads the given labels only. A re-selection
    warm-starts the folds from `init_state`. With `fold_rounds` > 1 each further round trains the same folds on
    the labels the previous round's flags corrected (y' = argmax P where flagged), or (fold_round_train=kept) on
    the given labels of the samples the previous round did not flag: only the last round's P is kept. A later
    round is out-of-fold for its own labels, not strictly for the given ones: the corrected labels and the flags
    came from folds that saw the held-out samples' given labels. With `oof_from`, the first
    selection takes an earlier run's out-of-fold probabilities instead of its first round of folds. The workers get the
    table without its N x C probabilities unless they read them (`workers_read_probs`: SelectMix's soft label),
    and with the C x C noise transition of the unflagged or of all samples where asked (`noise_matrix`, CrossMix's).
    """
    started = time.perf_counter()
    given = shards.load_labels(data_dir, manifest) if previous is None else previous.table.given
    trainer = FoldTrainer(data_dir, manifest, train, cv, seed, init_state)
    # A fold in a process of its own: a reused one's second fold peaked ~100 MB above its first at 320k
    # (findings.md), and a process start is seconds against a fold's minutes.
    runner = functools.partial(ray_map, cpus=cv.fold_cpus, gpus=cv.fold_gpus, retries=cv.fold_retries,
                               fresh_process=True)
    if previous is None and cv.oof_from:
        probs, fold_of = check_out_of_fold(read_out_of_fold(cv.oof_from), given, manifest["num_classes"],
                                           cv.oof_from)
        fold_runs = []
    else:
        probs, fold_of, fold_runs = out_of_fold_probabilities(given, cv.folds, seed, trainer,
                                                              map=functools.partial(runner, cache=cache),
                                                              allocate=None if cache is None else cache.table)
    for later in range(1, cv.fold_rounds):
        # The same folds, trained on the labels the previous round corrected or on its unflagged samples only;
        # flags still judge the given labels.
        round_cache = None if cache is None else cache.round(later)
        round_trainer = next_round(trainer, cv, probs, given, seed)
        del probs    # one N x C table at a time: this round's replaces the last
        probs, fold_of, runs = out_of_fold_probabilities(given, cv.folds, seed, round_trainer,
                                                         map=functools.partial(runner, cache=round_cache),
                                                         allocate=None if round_cache is None else round_cache.table)
        fold_runs += [{**run, "round": later + 1} for run in runs]
    table = build_mixing_table(probs, given, cv.tau_low, cv.tau_high, cv.flag_rule, seed, noise_matrix)
    return Selection(table, fold_of, fold_runs, time.perf_counter() - started,
                     ray.put(table.to_arrays(for_workers=True, probs=workers_read_probs)))


def next_round(trainer: FoldTrainer, cv: CrossValConfig, probs: np.ndarray, given: np.ndarray,
               seed: int) -> FoldTrainer:
    """The fold trainer of the round after the one that gave `probs` (fold_round_train)."""
    if cv.fold_round_train == "kept":
        trusted = ~flag_given_labels(cv.flag_rule, probs, given, seed)
        if not trusted.any():
            raise SelectionError(f"fold_round_train=kept: flag_rule={cv.flag_rule} flagged every sample, so a later "
                                 "fold round has nothing to train on")
        return dataclasses.replace(trainer, trusted=trusted)
    return dataclasses.replace(trainer, labels=corrected_labels(cv.flag_rule, probs, given, seed))


def restore_selection(arrays: dict[str, np.ndarray], cv: CrossValConfig, seed: int,
                      workers_read_probs: bool = False, noise_matrix: str | None = None) -> Selection:
    """The latest selection of an interrupted run, rebuilt from its oof.npz (the same table: it is a function
    of the out-of-fold probabilities, the given labels, the flag rule, the thresholds and the seed)."""
    table = build_mixing_table(arrays["probs"], arrays["given"], cv.tau_low, cv.tau_high, cv.flag_rule, seed,
                               noise_matrix)
    fold_of = arrays.get("fold", np.full(len(table.given), -1))
    return Selection(table, fold_of, [], 0.0, ray.put(table.to_arrays(for_workers=True, probs=workers_read_probs)))
