"""What a detector says about each given label: the rows of label_issues.csv, and their scores against
true labels where those are known (evaluation only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from noisymix.selection.crossval import given_label_probability
from noisymix.selection.detection import detection_metrics, selection_report
from noisymix.selection.gmm import given_label_verdict

NOISE_SCORE = "noise_score"
FLAGGED = "flagged"


@dataclass
class LabelReport:
    """One row per training id (position = id): named columns, the column ranking them (ascending: least
    trusted given label first), and `noise_score` (higher: more likely wrong; the detector's curve)."""

    columns: dict[str, np.ndarray]
    trust: str

    def __post_init__(self):
        lengths = {len(v) for v in self.columns.values()}
        missing = {self.trust, NOISE_SCORE, FLAGGED, "given_label"} - set(self.columns)
        if len(lengths) != 1 or missing:
            raise ValueError(f"a label report needs equal-length columns incl. {sorted(missing)}")

    @property
    def given(self) -> np.ndarray:
        return self.columns["given_label"]

    @property
    def flagged(self) -> np.ndarray:
        return self.columns[FLAGGED].astype(bool)

    @property
    def noise_score(self) -> np.ndarray:
        return self.columns[NOISE_SCORE]


def out_of_fold_report(probs: np.ndarray, given: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
                       flagged: np.ndarray) -> LabelReport:
    """SelectMix's beliefs: the out-of-fold prediction is the suggested label; trust is P[i, y_i]."""
    trust = given_label_probability(probs, given)
    return LabelReport({"given_label": given, "suggested_label": predicted, "confidence": confidence,
                        "given_label_prob": trust, FLAGGED: flagged.astype(np.int64),
                        NOISE_SCORE: 1.0 - trust}, trust="given_label_prob")


def evaluate_out_of_fold(report: LabelReport, true: np.ndarray) -> dict:
    """Flag = mismatch, score = 1 - P[i, y_i], and how often the suggested class is the true one."""
    c = report.columns
    return {"detection": selection_report(report.flagged, c["suggested_label"], c[NOISE_SCORE], c["given_label"],
                                          true)}


def clean_probability_report(given: np.ndarray, corrected: np.ndarray, clean: np.ndarray,
                             threshold: float) -> LabelReport:
    """The GMM methods' beliefs: the corrected target argmax t_i, the clean probability w_i and the
    given-label verdict (selection.gmm.given_label_verdict); the detector score is 1 - w_i."""
    flagged, trust = given_label_verdict(given, corrected, clean, threshold)
    return LabelReport({"given_label": given, "corrected_label": corrected, "clean_probability": clean,
                        "given_label_trust": trust, FLAGGED: flagged.astype(np.int64),
                        NOISE_SCORE: 1.0 - np.asarray(clean, dtype=np.float64)}, trust="given_label_trust")


def evaluate_clean_probability(report: LabelReport, true: np.ndarray, threshold: float) -> dict:
    """Accuracy of the corrected labels; `detection` scores w_i < threshold (the clean probability itself),
    `given_label_detection` the given-label flag of label_issues.csv."""
    c = report.columns
    clean = c["clean_probability"]
    return {"corrected_label_acc": float(np.mean(c["corrected_label"] == true)),
            "detection": detection_metrics(clean < threshold, 1.0 - clean, c["given_label"], true),
            "given_label_detection": detection_metrics(report.flagged, 1.0 - c["given_label_trust"],
                                                       c["given_label"], true)}
