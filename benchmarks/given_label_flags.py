"""Given-label detection of finished MixNN / GMM-selection runs, from their label_issues.csv.

Runs trained before summary.json carried `given_label_detection` still hold what it needs: the given
and corrected labels and the clean probability per id. This scores the given-label flag of
`selection.gmm.given_label_verdict` against the shards' true labels (evaluation only), beside the
clean-probability F1 the run recorded.

    python benchmarks/given_label_flags.py runs/bench/fashion_mnist_memorise/cells/*mixnn*/run
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from noisymix.distributed import shards
from noisymix.distributed.folds import load_labels
from noisymix.selection.detection import detection_metrics
from noisymix.selection.gmm import given_label_verdict


def given_label_detection(run: Path) -> dict:
    config = yaml.safe_load((run / "config.yaml").read_text())
    manifest = shards.load_manifest(config["data_dir"])
    true = load_labels(config["data_dir"], manifest, label_key=shards.TRUE_LABEL)
    with open(run / "label_issues.csv") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: int(r["id"]))
    given = np.array([int(r["given_label"]) for r in rows])
    corrected = np.array([int(r["corrected_label"]) for r in rows])
    clean = np.array([float(r["clean_probability"]) for r in rows])
    flagged, trust = given_label_verdict(given, corrected, clean, config["gmm_threshold"])
    return detection_metrics(flagged, 1.0 - trust, given, true)


def main() -> None:
    for run in map(Path, sys.argv[1:]):
        metrics = given_label_detection(run)
        recorded = json.loads((run / "summary.json").read_text())["detection"]["f1"]
        print(f"{run}: given-label F1 {metrics['f1']:.3f} (P {metrics['precision']:.3f}, R {metrics['recall']:.3f}), "
              f"AUROC {metrics['auroc']:.3f}; clean-probability F1 {recorded:.3f}")


if __name__ == "__main__":
    main()
