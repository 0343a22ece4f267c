"""A2: mismatch analysis of out-of-fold predictions -> the per-sample mixing table and trusted pools."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from noisymix.selection.confident_learning import noise_transition
from noisymix.selection.crossval import SelectionError
from noisymix.selection.flag_rules import choose_flags

NOISE_MATRIX_OVER = (None, "kept", "all")   # which samples a table's noise transition is estimated over


def predicted_class_and_confidence(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """c_i = argmax P[i] and q_i = max P[i]."""
    return probs.argmax(axis=1).astype(np.int64), probs.max(axis=1).astype(np.float32)


def uncertain_set(flagged: np.ndarray, confidence: np.ndarray, tau_low: float = 0.0) -> np.ndarray:
    """M = the flag rule's set ({i : c_i != y_i} for the paper's), plus {i : q_i < tau_low} when tau_low > 0."""
    return flagged | (confidence < tau_low)


def trusted_pools(predicted: np.ndarray, given: np.ndarray, confidence: np.ndarray, tau_high: float,
                  num_classes: int, uncertain: np.ndarray) -> list[np.ndarray]:
    """T[c] = {j not in M : c_j = c and y_j = c and q_j >= tau_high}, as sorted id arrays. With the paper's
    rule no j in M has c_j = y_j; with another rule, or tau_low, a doubted sample is no trusted partner."""
    trusted = (predicted == given) & (confidence >= tau_high) & ~uncertain
    return [np.flatnonzero(trusted & (predicted == c)) for c in range(num_classes)]


@dataclass
class MixingTable:
    """What the selection stage hands the training workers, one row per train id (ids are 0..N-1), and the
    given labels it was built for.

    pools[c] are the ids a flagged sample of predicted class c mixes with. A class whose trusted
    pool is empty falls back to every sample predicted as c (the authors' pool, tau_high = 0), which
    holds at least each flagged sample of that class itself; `fallback_classes` lists those classes.
    """

    given: np.ndarray | None
    uncertain: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray | None
    probs: np.ndarray | None
    pools: list[np.ndarray]
    fallback_classes: list[int]
    flag_rule: str = ""   # the rule that flagged (flag_rule=auto's choice); the driver's, not sent to workers
    noise_matrix: np.ndarray | None = None   # C x C: estimated P(given | true) of the unflagged or all samples (CrossMix)

    def to_arrays(self, for_workers: bool = False, probs: bool = True) -> dict[str, np.ndarray]:
        """Flat arrays for the object store: pools as one id array plus offsets. The workers' copy leaves out
        the given labels and confidences they never read, and the N x C probabilities unless asked."""
        offsets = np.cumsum([0] + [len(p) for p in self.pools]).astype(np.int64)
        arrays = {"uncertain": self.uncertain, "predicted": self.predicted,
                  "pool_ids": np.concatenate(self.pools).astype(np.int64), "pool_offsets": offsets,
                  "fallback_classes": np.asarray(self.fallback_classes, dtype=np.int64)}
        if not for_workers:
            arrays.update(given=self.given, confidence=self.confidence)
        if probs:
            arrays["probs"] = self.probs
        if self.noise_matrix is not None:
            arrays["noise_matrix"] = self.noise_matrix
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "MixingTable":
        offsets = arrays["pool_offsets"]
        pools = [arrays["pool_ids"][offsets[c]:offsets[c + 1]] for c in range(len(offsets) - 1)]
        return cls(arrays.get("given"), arrays["uncertain"], arrays["predicted"], arrays.get("confidence"),
                   arrays.get("probs"), pools, [int(c) for c in arrays["fallback_classes"]],
                   noise_matrix=arrays.get("noise_matrix"))


def build_mixing_table(probs: np.ndarray, given: np.ndarray, tau_low: float = 0.0, tau_high: float = 0.0,
                       flag_rule: str = "mismatch", seed: int = 0, noise_matrix: str | None = None) -> MixingTable:
    """The mixing table of methods.md A2 from out-of-fold probabilities and the given labels; `flag_rule`
    chooses which given labels are flagged (selection.flag_rules; `mismatch` is the paper's). `noise_matrix`:
    also estimate the noise transition of the unflagged samples (`kept`) or of every sample (`all`), one more
    pass over the N x C table."""
    for name, tau in (("tau_low", tau_low), ("tau_high", tau_high)):
        if not 0.0 <= tau <= 1.0:
            raise SelectionError(f"{name} must be in [0, 1], got {tau}")
    if noise_matrix not in NOISE_MATRIX_OVER:
        raise SelectionError(f"noise_matrix must be one of {NOISE_MATRIX_OVER}, got {noise_matrix!r}")
    if probs.shape[0] != len(given):
        raise SelectionError(f"{probs.shape[0]} out-of-fold rows for {len(given)} labels")
    num_classes = probs.shape[1]
    predicted, confidence = predicted_class_and_confidence(probs)
    rule, flagged = choose_flags(flag_rule, probs, np.asarray(given), seed, predicted)
    uncertain = uncertain_set(flagged, confidence, tau_low)
    pools = trusted_pools(predicted, given, confidence, tau_high, num_classes, uncertain)
    needed = np.unique(predicted[uncertain])
    fallback = [int(c) for c in needed if len(pools[c]) == 0]
    for c in fallback:
        pools[c] = np.flatnonzero(predicted == c)
    counted = {"kept": ~uncertain, "all": None}
    return MixingTable(np.asarray(given), uncertain, predicted, confidence, np.asarray(probs, np.float32), pools, fallback,
                       rule, noise_transition(probs, given, counted[noise_matrix]) if noise_matrix else None)
