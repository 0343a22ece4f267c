"""Detection quality against true labels, where they are known (evaluation only, never training)."""

from __future__ import annotations

import numpy as np


def detection_metrics(flagged: np.ndarray, noise_score: np.ndarray, given: np.ndarray, true: np.ndarray) -> dict:
    """Precision, recall and F1 of `flagged` against "given != true", and AUROC of the noise score."""
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score  # here: see selection/__init__.py

    is_noisy = np.asarray(given) != np.asarray(true)
    precision, recall, f1, _ = precision_recall_fscore_support(is_noisy, flagged, average="binary", zero_division=0)
    both = 0 < is_noisy.sum() < len(is_noisy)
    return {
        "precision": float(precision), "recall": float(recall), "f1": float(f1),
        "auroc": float(roc_auc_score(is_noisy, noise_score)) if both else None,
        "flagged_rate": float(np.mean(flagged)), "noise_rate": float(np.mean(is_noisy)),
    }


def selection_report(flagged: np.ndarray, predicted: np.ndarray, noise_score: np.ndarray, given: np.ndarray,
                     true: np.ndarray) -> dict:
    """SelectMix's detector (flagged = mismatch, noise score = 1 - P[i, y_i]) and how often c_i is the true class."""
    report = detection_metrics(flagged, noise_score, given, true)
    report["predicted_class_acc_on_flagged"] = float(np.mean(predicted[flagged] == true[flagged])) if flagged.any() else None
    report["predicted_class_acc"] = float(np.mean(predicted == true))
    return report
