"""B1: per-sample loss -> min-max normalisation -> optional window average -> 2-component GMM -> w_i."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from noisymix.selection.crossval import SelectionError, given_label_probability


def normalise_losses(losses: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant loss vector maps to zeros (there is nothing to separate)."""
    losses = np.asarray(losses, dtype=np.float64)
    if not np.isfinite(losses).all():
        bad = np.flatnonzero(~np.isfinite(losses))
        raise SelectionError(f"{bad.size} per-sample losses are not finite (first id {int(bad[0])})")
    span = losses.max() - losses.min() if losses.size else 0.0
    return (losses - losses.min()) / span if span > 0 else np.zeros_like(losses)


def window_average(history: Sequence[np.ndarray], window: int) -> np.ndarray:
    """Mean of the last `window` normalised loss vectors (window=1: the latest alone)."""
    if not history:
        raise SelectionError("no loss history to average")
    return np.mean(np.stack(history[-window:]), axis=0)


@dataclass
class CleanProbability:
    """w_i per sample and how the mixture looked; `degenerate` says the fit could not separate two modes."""

    w: np.ndarray
    means: tuple[float, float]
    degenerate: bool
    reason: str = ""


def clean_probability(losses: np.ndarray, *, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4,
                      min_separation: float = 1e-3, seed: int = 0) -> CleanProbability:
    """Posterior of the lower-mean component of a 2-component GMM on normalised losses.

    When the losses are (nearly) constant or the two means coincide, no sample can be called noisier
    than another: every w_i is 1 (all trusted), so the methods fall back to plain training and never
    see NaN weights.
    """
    x = np.asarray(losses, dtype=np.float64).reshape(-1, 1)
    if x.shape[0] < 2 or np.ptp(x) < 1e-12:
        return CleanProbability(np.ones(x.shape[0]), (0.0, 0.0), True, "losses are constant")
    from sklearn.mixture import GaussianMixture  # here: see selection/__init__.py

    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed)
    gmm.fit(x)
    means = gmm.means_.ravel()
    clean = int(np.argmin(means))
    if abs(means[0] - means[1]) < min_separation:
        return CleanProbability(np.ones(x.shape[0]), (float(means.min()), float(means.max())), True,
                                f"the two loss modes coincide ({means[0]:.4f} vs {means[1]:.4f})")
    w = gmm.predict_proba(x)[:, clean]
    if not np.isfinite(w).all():
        return CleanProbability(np.ones(x.shape[0]), (float(means.min()), float(means.max())), True,
                                "the posterior is not finite")
    return CleanProbability(w, (float(means.min()), float(means.max())), False)


def out_of_fold_clean_probability(probs: np.ndarray, given: np.ndarray, *, eps: float = 1e-12,
                                  **gmm) -> CleanProbability:
    """B1 on out-of-fold losses -log P[i, y_i] of a cross-validated table instead of training losses.

    P[i, y_i] itself is calibrated to the noisy labels (about 0.3 for a clean sample at 80% symmetric
    noise), so it ranks samples well but is no probability of being clean; the GMM puts it on that scale.
    """
    losses = -np.log(np.clip(given_label_probability(probs, given).astype(np.float64), eps, 1.0))
    return clean_probability(normalise_losses(losses), **gmm)


def given_label_verdict(given: np.ndarray, corrected: np.ndarray, clean: np.ndarray,
                        threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Whether each GIVEN label looks wrong, and a trust score in [0, 1] for ranking them.

    w_i is the clean probability of the sample's current target argmax t_i, which MixNN moves away from
    y_i as it corrects: a corrected sample has a low loss and a high w_i although its given label is
    wrong. So y_i is trusted only while the target still agrees with it: trust = (1 + w_i) / 2 there
    (from 0.5 up), (1 - w_i) / 2 where the target has moved (below 0.5, lowest where the corrected target
    is most trusted). Flagged: the target moved, or it agrees and w_i < threshold.
    """
    given, corrected, clean = np.asarray(given), np.asarray(corrected), np.asarray(clean, dtype=np.float64)
    if not (given.shape == corrected.shape == clean.shape):
        raise ValueError(f"given {given.shape}, corrected {corrected.shape} and clean {clean.shape} must match")
    agrees = corrected == given
    trust = np.where(agrees, (1.0 + clean) / 2.0, (1.0 - clean) / 2.0)
    return ~agrees | (clean < threshold), trust
