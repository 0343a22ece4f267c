"""A1: K stratified folds and the out-of-fold probabilities assembled from them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np


ROW_BLOCK = 65_536   # rows of an N x C table a scan reads at a time: its temporaries stay ROW_BLOCK x C


class SelectionError(ValueError):
    """Selection settings or predictions that cannot give a mixing table (K, tau, coverage)."""


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train positions, held-out positions) of K shuffled folds stratified by the given label."""
    labels = np.asarray(labels)
    if k < 2:
        raise SelectionError(f"folds must be >= 2 for cross-validation, got {k}")
    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if k > smallest:
        raise SelectionError(f"folds={k} exceeds the smallest class count ({smallest} samples of class "
                         f"{int(np.flatnonzero(counts == smallest)[0])}): every fold needs each class")
    from sklearn.model_selection import StratifiedKFold  # here: see selection/__init__.py

    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


def assemble_out_of_fold(num_samples: int, fold_outputs: Iterable[tuple[np.ndarray, np.ndarray]],
                         allocate: Callable[[tuple[int, int]], np.ndarray] | None = None) -> np.ndarray:
    """P[i] for every id from the fold that held i out; an id missing or predicted twice is an error.
    `allocate(shape)` gives the zeroed float32 N x C array to fill (np.zeros where None; a caller may hand a
    file-backed memmap, whose pages the kernel writes back and drops instead of the process's heap holding them)."""
    probs, seen = None, np.zeros(num_samples, dtype=np.int64)
    for held_ids, held_probs in fold_outputs:
        if probs is None:
            shape = (num_samples, held_probs.shape[1])
            probs = np.zeros(shape, dtype=np.float32) if allocate is None else allocate(shape)
        probs[held_ids] = held_probs
        np.add.at(seen, held_ids, 1)
    if probs is None or (seen != 1).any():
        bad = np.flatnonzero(seen != 1)
        raise SelectionError(f"out-of-fold predictions cover ids unevenly: {bad.size} ids seen != once (first {bad[:5]})")
    return probs


def check_out_of_fold(arrays: dict[str, np.ndarray], given: np.ndarray, num_classes: int,
                      source: str) -> tuple[np.ndarray, np.ndarray]:
    """(P, fold of each id; -1 where unknown) of an earlier run's out-of-fold table, checked against these labels.

    The table must hold `probs` (N x C rows on the simplex) and the `given` labels they were made for:
    predictions made for another dataset, noise draw or seed are refused, not silently misapplied.
    """
    probs, file_given = arrays["probs"], arrays["given"]
    if probs.shape != (len(given), num_classes):
        raise SelectionError(f"{source} holds {probs.shape} probabilities; this data needs ({len(given)}, {num_classes})")
    if not np.array_equal(file_given, given):
        raise SelectionError(f"{source} was made for other given labels ({int(np.sum(file_given != given))} of "
                             f"{len(given)} differ): another dataset, noise draw or seed")
    probs = np.asarray(probs, np.float32)
    if not rows_are_distributions(probs):
        raise SelectionError(f"{source}: every row of probs must be a probability vector (finite, >= 0, sum 1)")
    fold_of = arrays.get("fold", np.full(len(given), -1))
    if fold_of.shape != given.shape:
        fold_of = np.full(len(given), -1)
    return probs, fold_of.astype(np.int64)


def rows_are_distributions(probs: np.ndarray, atol: float = 1e-3) -> bool:
    """Every row finite, >= 0 and summing to 1 (within atol), read ROW_BLOCK rows at a time."""
    for start in range(0, len(probs), ROW_BLOCK):
        block = probs[start:start + ROW_BLOCK]
        if not (np.isfinite(block).all() and (block >= 0).all() and np.allclose(block.sum(axis=1), 1.0, atol=atol)):
            return False
    return True


@dataclass(frozen=True)
class Fold:
    """Fold `index`: train on positions `train`, predict positions `held`."""

    index: int
    train: np.ndarray
    held: np.ndarray


@dataclass
class FoldOutput:
    """What fitting a fold gives: the held-out ids, their predicted probabilities, and anything to report."""

    held_ids: np.ndarray
    probs: np.ndarray
    info: dict


def out_of_fold_probabilities(labels: np.ndarray, k: int, seed: int, fit_predict: Callable[[Fold], FoldOutput],
                              map: Callable = map, allocate: Callable[[tuple[int, int]], np.ndarray] | None = None,
                              ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """A1 over any classifier: (out-of-fold P for every id, fold of each id, each fold's info in fold order).

    `fit_predict(fold)` trains on the fold's train positions and predicts its held-out ones; `map` runs it
    over the K folds (the built-in map in a loop, or one Ray task per fold) and yields outputs in order. Each
    output is copied into P as it comes and then let go, so P is the one N x C array held (not P and K parts);
    `allocate` makes P (assemble_out_of_fold).
    """
    folds = [Fold(f, train, held) for f, (train, held) in enumerate(stratified_folds(labels, k, seed))]
    infos = []

    def placed(outputs: Iterable[FoldOutput]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for output in outputs:
            infos.append(output.info)
            yield output.held_ids, output.probs

    probs = assemble_out_of_fold(len(labels), placed(map(fit_predict, folds)), allocate)
    fold_of = np.empty(len(labels), dtype=np.int64)
    for fold in folds:
        fold_of[fold.held] = fold.index
    return probs, fold_of, infos


def given_label_probability(probs: np.ndarray, given: np.ndarray) -> np.ndarray:
    """P[i, y_i]: how much the out-of-fold model believes each given label (cleanlab's self-confidence)."""
    return probs[np.arange(len(given)), given]
