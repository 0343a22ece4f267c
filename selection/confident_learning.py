"""Confident learning's label-issue rule on out-of-fold probabilities (Northcutt, Jiang & Chuang, "Confident
Learning: Estimating Uncertainty in Dataset Labels", JAIR 2021): per-class thresholds, the confident joint,
its calibration, and prune by noise rate. Written from the paper (cleanlab is AGPL; we do not depend on it).

Where the argmax-mismatch rule flags every sample a fold errs on, confident learning first estimates how many
labels of each given class are wrong (the calibrated joint) and flags only that many per (given, true) pair,
the ones the folds are most sure about: its precision does not fall with the folds' accuracy the same way.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist

from noisymix.selection.crossval import ROW_BLOCK, SelectionError


def _check(probs: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs, given = np.asarray(probs), np.asarray(given)
    if probs.ndim != 2 or probs.shape[0] != len(given):
        raise SelectionError(f"{probs.shape} out-of-fold probabilities for {len(given)} labels")
    if len(given) and (given.min() < 0 or given.max() >= probs.shape[1]):
        raise SelectionError(f"given labels must lie in [0, {probs.shape[1]}), found {given.min()}..{given.max()}")
    return probs, given.astype(np.int64, copy=False)


def per_class_thresholds(probs: np.ndarray, given: np.ndarray) -> np.ndarray:
    """t_j = mean of P[i, j] over the samples labelled j (CL eq. 2); +inf for a class nobody is labelled as,
    so that no sample is confidently counted in it."""
    probs, given = _check(probs, given)
    num_classes = probs.shape[1]
    counts = np.bincount(given, minlength=num_classes)
    sums = np.bincount(given, weights=probs[np.arange(len(given)), given], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)


def confident_joint(probs: np.ndarray, given: np.ndarray, thresholds: np.ndarray,
                    counted: np.ndarray | None = None) -> np.ndarray:
    """C[i, j] = how many samples labelled i have P[x, j] >= t_j, each counted once, in its most probable such
    class j (CL eq. 1); a sample above no threshold, or outside the boolean mask `counted`, is counted nowhere.
    P is read ROW_BLOCK rows at a time, so the comparison's temporaries stay ROW_BLOCK x C, not N x C beside P."""
    probs, given = _check(probs, given)
    num_classes = probs.shape[1]
    cells = np.zeros(num_classes * num_classes, dtype=np.int64)
    for start in range(0, len(given), ROW_BLOCK):
        block, labels = probs[start:start + ROW_BLOCK], given[start:start + ROW_BLOCK]
        above = block >= thresholds[None, :]
        confident = above.any(axis=1)
        if counted is not None:
            confident &= counted[start:start + ROW_BLOCK]
        true_guess = np.where(above, block, -np.inf).argmax(axis=1)
        cells += np.bincount(labels[confident] * num_classes + true_guess[confident], minlength=num_classes ** 2)
    return cells.reshape(num_classes, num_classes)


def calibrated_joint(joint: np.ndarray, given_counts: np.ndarray) -> np.ndarray:
    """C~[i, j] = C[i, j] / sum_j C[i, j] * |X_{y~=i}| (CL eq. 3, before dividing by n): each row rescaled to its
    class's real size, so C~[i, j] estimates how many samples labelled i truly belong to j."""
    rows = joint.sum(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, joint / np.maximum(rows, 1) * np.asarray(given_counts)[:, None], 0.0)


def prune_by_noise_rate(probs: np.ndarray, given: np.ndarray, calibrated: np.ndarray) -> np.ndarray:
    """Flags: for every off-diagonal (i, j), the round(C~[i, j]) samples labelled i with the largest margin
    P[x, j] - P[x, i] (CL's PBNR). A sample chosen for several j is flagged once."""
    probs, given = _check(probs, given)
    flagged = np.zeros(len(given), dtype=bool)
    wanted = np.rint(calibrated).astype(np.int64)
    np.fill_diagonal(wanted, 0)
    for i in np.flatnonzero(wanted.any(axis=1)):
        rows = np.flatnonzero(given == i)
        columns = np.flatnonzero(wanted[i])
        margins = probs[np.ix_(rows, columns)] - probs[rows, i][:, None]
        order = np.argsort(-margins, axis=0, kind="stable")
        take = np.arange(len(rows))[:, None] < np.minimum(wanted[i, columns], len(rows))[None, :]
        flagged[rows[order[take]]] = True
    return flagged


def confident_learning_flags(probs: np.ndarray, given: np.ndarray) -> np.ndarray:
    """The label issues confident learning finds in an out-of-fold table: thresholds, joint, calibration, PBNR."""
    probs, given = _check(probs, given)
    joint = confident_joint(probs, given, per_class_thresholds(probs, given))
    calibrated = calibrated_joint(joint, np.bincount(given, minlength=probs.shape[1]))
    return prune_by_noise_rate(probs, given, calibrated)


def noise_transition(probs: np.ndarray, given: np.ndarray, counted: np.ndarray | None = None) -> np.ndarray:
    """T[j, k] = P(given label k | true class j) among the samples of the mask `counted` (all where None): the
    calibrated joint C~[k, j] of those samples (thresholds t from every sample), each true class's column
    normalised. What forward loss correction needs (docs/crossmix.md H2); a true class that no counted sample is
    confidently in keeps an identity row (no correction without evidence)."""
    probs, given = _check(probs, given)
    num_classes = probs.shape[1]
    sizes = np.bincount(given if counted is None else given[counted], minlength=num_classes)
    joint = confident_joint(probs, given, per_class_thresholds(probs, given), counted)
    by_true = calibrated_joint(joint, sizes).T
    totals = by_true.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, by_true / np.maximum(totals, 1e-12), np.eye(num_classes)).astype(np.float32)


def row_separation(transition: np.ndarray) -> np.ndarray:
    """S[j, k] = 1/2 sum_l |T[j, l] - T[k, l]|, the total variation between how true classes j and k are labelled.
    Where it is small, predicting k for j's images explains their given labels almost as well as predicting j: a
    loss forward-corrected through T hardly tells j from k (docs/crossmix.md H2)."""
    rows = np.asarray(transition, dtype=np.float64)
    return cdist(rows, rows, "cityblock") / 2 if len(rows) else np.zeros((0, 0))


def least_separated(transition: np.ndarray) -> tuple[float, int, int]:
    """(S[j, k], j, k) of the two true classes whose rows of T are closest (1.0, 0, 0 below two classes)."""
    separation = row_separation(transition)
    if len(separation) < 2:
        return 1.0, 0, 0
    np.fill_diagonal(separation, np.inf)
    j, k = np.unravel_index(int(np.argmin(separation)), separation.shape)
    return float(separation[j, k]), int(min(j, k)), int(max(j, k))
