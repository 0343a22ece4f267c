"""A1: K stratified folds and the out-of-fold probabilities assembled from them."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from sklearn.model_selection import StratifiedKFold


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
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


def assemble_out_of_fold(num_samples: int, fold_outputs: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """P[i] for every id from the fold that held i out; an id missing or predicted twice is an error."""
    probs, seen = None, np.zeros(num_samples, dtype=np.int64)
    for held_ids, held_probs in fold_outputs:
        if probs is None:
            probs = np.zeros((num_samples, held_probs.shape[1]), dtype=np.float32)
        probs[held_ids] = held_probs
        np.add.at(seen, held_ids, 1)
    if probs is None or (seen != 1).any():
        bad = np.flatnonzero(seen != 1)
        raise SelectionError(f"out-of-fold predictions cover ids unevenly: {bad.size} ids seen != once (first {bad[:5]})")
    return probs
