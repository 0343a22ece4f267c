"""Decision rules on an out-of-fold table: which given labels look wrong (the flagged set M of methods.md A2).

`mismatch` is the paper's rule; the others read the same probabilities differently (issue 21), so that
detection can be chosen, compared and searched without retraining the folds; `auto` chooses between two of them
from the table itself (never from true labels).
"""

from __future__ import annotations

import numpy as np

from noisymix.selection.confident_learning import confident_learning_flags
from noisymix.selection.crossval import SelectionError
from noisymix.selection.gmm import out_of_fold_clean_probability

FLAG_RULES = ("mismatch", "confident", "oof_gmm", "agree", "auto", "none")
# `auto` takes the GMM's flags when its flagged count is within this factor of confident learning's (either way).
AUTO_AGREEMENT = 0.75
FLAG_RULE_HELP = {
    "mismatch": "argmax P[i] != y_i (SelectMix)",
    "confident": "confident learning, prune by noise rate (Northcutt et al. 2021)",
    "oof_gmm": "clean probability < 0.5 of a 2-component GMM on the out-of-fold losses -log P[i, y_i]",
    "agree": "flagged by both confident and oof_gmm (two detectors that read the table differently)",
    "auto": f"oof_gmm where it flags {AUTO_AGREEMENT:g}x-{1 / AUTO_AGREEMENT:.3g}x as many as confident, else "
            "confident",
    "none": "no label is flagged (CrossMix's forward correction then corrects every label through the table)",
}


def choose_flags(rule: str, probs: np.ndarray, given: np.ndarray, seed: int = 0,
                 predicted: np.ndarray | None = None) -> tuple[str, np.ndarray]:
    """(the rule that flagged, the boolean flag per sample) of `rule` on out-of-fold probabilities P and given
    labels y; the rule is `rule` itself except for `auto` (`predicted`: argmax P where the caller has it already,
    so an N x C table is not scanned twice)."""
    if rule not in FLAG_RULES:
        raise SelectionError(f"flag_rule={rule!r} is not one of {', '.join(FLAG_RULES)}")
    if rule == "none":
        return rule, np.zeros(len(given), dtype=bool)
    if rule == "mismatch":
        return rule, (probs.argmax(axis=1) if predicted is None else predicted) != given
    if rule == "confident":
        return rule, confident_learning_flags(probs, given)
    gmm = out_of_fold_clean_probability(probs, given, seed=seed).w < 0.5
    if rule == "oof_gmm":
        return rule, gmm
    confident = confident_learning_flags(probs, given)
    return (rule, gmm & confident) if rule == "agree" else auto_flags(gmm, confident)


def auto_flags(gmm: np.ndarray, confident: np.ndarray) -> tuple[str, np.ndarray]:
    """The GMM's flags where the two detectors agree on how many labels are wrong (within AUTO_AGREEMENT), else
    confident learning's. Noise that follows the classes (pair flips, class maps, instance-dependent) is partly
    learned by the out-of-fold models, so its losses form no separate mode and the GMM flags far fewer than
    confident learning's per-class estimate; where the counts agree the losses separate, and there the GMM's
    per-sample ranking flagged better (benchmarks/results/flag_rules_detection.md)."""
    ratio = int(gmm.sum()) / max(int(confident.sum()), 1)
    return ("oof_gmm", gmm) if AUTO_AGREEMENT <= ratio <= 1 / AUTO_AGREEMENT else ("confident", confident)


def flag_given_labels(rule: str, probs: np.ndarray, given: np.ndarray, seed: int = 0,
                      predicted: np.ndarray | None = None) -> np.ndarray:
    """The boolean flag per sample of `rule` (choose_flags without the name of the rule that flagged)."""
    return choose_flags(rule, probs, given, seed, predicted)[1]


def corrected_labels(rule: str, probs: np.ndarray, given: np.ndarray, seed: int = 0) -> np.ndarray:
    """y'_i = argmax P[i] where `rule` flags i, else y_i: the labels a later round of folds trains on."""
    predicted = probs.argmax(axis=1)
    return np.where(flag_given_labels(rule, probs, given, seed, predicted), predicted, given)
