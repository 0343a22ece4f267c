"""Decision rules on an out-of-fold table: which given labels look wrong (the flagged set M of methods.md A2).

`mismatch` is the paper's rule; the others read the same probabilities differently (issue 21), so that
detection can be chosen, compared and searched without retraining the folds.
"""

from __future__ import annotations

import numpy as np

from noisymix.selection.confident_learning import confident_learning_flags
from noisymix.selection.crossval import SelectionError
from noisymix.selection.gmm import out_of_fold_clean_probability

FLAG_RULES = ("mismatch", "confident", "oof_gmm", "agree")
FLAG_RULE_HELP = {
    "mismatch": "argmax P[i] != y_i (SelectMix)",
    "confident": "confident learning, prune by noise rate (Northcutt et al. 2021)",
    "oof_gmm": "clean probability < 0.5 of a 2-component GMM on the out-of-fold losses -log P[i, y_i]",
    "agree": "flagged by both confident and oof_gmm (two detectors that read the table differently)",
}


def flag_given_labels(rule: str, probs: np.ndarray, given: np.ndarray, seed: int = 0,
                      predicted: np.ndarray | None = None) -> np.ndarray:
    """The boolean flag per sample of `rule` on out-of-fold probabilities P and given labels y (`predicted`:
    argmax P where the caller has it already, so an N x C table is not scanned twice)."""
    if rule not in FLAG_RULES:
        raise SelectionError(f"flag_rule={rule!r} is not one of {', '.join(FLAG_RULES)}")
    if rule == "mismatch":
        return (probs.argmax(axis=1) if predicted is None else predicted) != given
    if rule == "confident":
        return confident_learning_flags(probs, given)
    gmm = out_of_fold_clean_probability(probs, given, seed=seed).w < 0.5
    return gmm if rule == "oof_gmm" else gmm & confident_learning_flags(probs, given)


def corrected_labels(rule: str, probs: np.ndarray, given: np.ndarray, seed: int = 0) -> np.ndarray:
    """y'_i = argmax P[i] where `rule` flags i, else y_i: the labels a later round of folds trains on."""
    predicted = probs.argmax(axis=1)
    return np.where(flag_given_labels(rule, probs, given, seed, predicted), predicted, given)
