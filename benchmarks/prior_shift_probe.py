"""Does dropping the flagged labels shift the class prior a CrossMix model learns, and what does undoing it
at test time give? A probe on finished runs, no training.

CrossMix trains on the labels it keeps, and the flags fall unevenly on the classes (at 40% asymmetric on all
60,000 Fashion-MNIST images, 2,427 ankle-boot labels are kept against 4,038 sneaker labels, where every class has
5,400 images). A model trained on labels of prior k learns p(y | x) with that prior, so where the true prior is
pi, Bayes' rule moves each class's score by log(pi_c / k_c) (label shift; post-hoc logit adjustment, Menon et al.,
ICLR 2021). This scores each run's best model on the test split as it is and with its log-probabilities moved by
log(pi_c / k_c), where k is the prior of the labels the run trained on (the kept given labels of its oof.npz's
unflagged samples for CrossMix with the flags dropped; every given label otherwise) and pi is
- `table`: the share of each class among the out-of-fold argmax of the table (no true label read), or
- `true`: the true labels' prior (uniform on Fashion-MNIST; a ceiling: a method does not know it).

    python benchmarks/prior_shift_probe.py --table runs/bench/full_data_r/cells/asymmetric40-crossmix-seed0/run/oof.npz \
        runs/bench/full_data_r/cells/asymmetric40-{ce,mixup,crossmix}-seed0/run

Every run must have trained on the table's data (the same given labels). True labels: the test split's, for
scoring, and the training split's prior for the `true` row only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from noisymix.distributed import shards
from noisymix.distributed.artifacts import MODEL_BEST, RunDir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_support.reports import write_report  # noqa: E402
from per_class_accuracy import class_accuracies, test_predictions  # noqa: E402


def class_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The share of each class among `labels`."""
    return np.bincount(labels, minlength=num_classes) / max(len(labels), 1)


def adjusted_predictions(probs: np.ndarray, trained_prior: np.ndarray, target_prior: np.ndarray) -> np.ndarray:
    """argmax_c log p_c + log(pi_c / k_c): the model's posterior moved from the prior it trained on to pi.
    A class the run never trained on (k_c = 0) is left where it is; one of prior 0 is never predicted."""
    unshifted = np.where(trained_prior > 0, trained_prior, target_prior)
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(target_prior > 0, np.log(target_prior) - np.log(unshifted), -np.inf)
    return np.argmax(np.log(np.clip(probs, 1e-12, None)) + shift, axis=1)


def trained_labels(config: dict, given: np.ndarray, flagged: np.ndarray) -> tuple[np.ndarray, str]:
    """The given labels the run's loss read: CrossMix's unflagged ones where it dropped its flags, else all. Read
    from the config alone: a CrossMix run whose `auto` correction kept every label (its log: "auto: on") or that kept
    some flags (`keep_close_pairs`) trained on more labels than this counts."""
    if config["method"] == "crossmix" and config.get("guess", "none") == "none":
        return given[~flagged], "kept"
    return given, "given"


def probe(run: Path, given: np.ndarray, flagged: np.ndarray, table_prior: np.ndarray,
          true_prior: np.ndarray) -> dict:
    config, labels, probs = test_predictions(run)
    num_classes = probs.shape[1]
    trained, which = trained_labels(config, given, flagged)
    k = class_prior(trained, num_classes)
    row = {"run": str(run), "method": config["method"], "trained_on": which, "trained_prior": k.round(4).tolist()}
    for name, predicted in (("as trained", probs.argmax(axis=1)),
                            ("table prior", adjusted_predictions(probs, k, table_prior)),
                            ("true prior", adjusted_predictions(probs, k, true_prior))):
        row[name] = {"acc": float(np.mean(predicted == labels)),
                     "per_class": class_accuracies(predicted, labels, num_classes)}
    return row


def markdown(rows: list[dict], table_prior: np.ndarray, command: str) -> str:
    classes = len(table_prior)
    lines = ["# Class prior of the trained labels, and undoing its shift at test time", "", f"    {command}", "",
             "Best model (best NOISY validation epoch) of each run on the test split: as trained, and with its "
             "log-probabilities moved by log(pi_c / k_c), k = the prior of the labels the run trained on, pi = the "
             "table's out-of-fold argmax prior or the true one (a ceiling).", "",
             "Table prior: " + ", ".join(f"{p:.3f}" for p in table_prior), "",
             "| run | trained on | min / max k_c | scored | test acc | " + " | ".join(f"class {c}" for c in range(classes))
             + " |", "|---|---|---|---|---|" + "---|" * classes]
    for r in rows:
        name = Path(r["run"]).parts[-2]
        k = np.asarray(r["trained_prior"])
        for scored in ("as trained", "table prior", "true prior"):
            lines.append(f"| {name} | {r['trained_on']} | {k.min():.3f} / {k.max():.3f} | {scored} | "
                         f"{r[scored]['acc']:.4f} | " + " | ".join(f"{a:.2f}" for a in r[scored]["per_class"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--table", type=Path, required=True, help="the oof.npz whose flags and argmax are read")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    with np.load(args.table) as table:
        given, flagged, predicted = table["given"], table["uncertain"].astype(bool), table["predicted"]
    num_classes = int(max(given.max(), predicted.max())) + 1
    table_prior = class_prior(predicted, num_classes)
    rows = []
    for run in args.runs:
        if not (run / MODEL_BEST).is_file():
            raise SystemExit(f"{run}: no {MODEL_BEST}: not a finished run")
        data_dir = RunDir(run).config_values()["data_dir"]
        manifest = shards.load_manifest(data_dir)
        if not np.array_equal(shards.load_labels(data_dir, manifest), given):
            raise SystemExit(f"{run} trained on other given labels than {args.table}'s")
        true_prior = class_prior(shards.load_labels(data_dir, manifest, label_key=shards.TRUE_LABEL), num_classes)
        rows.append(probe(run, given, flagged, table_prior, true_prior))
    text = markdown(rows, table_prior, f"python {' '.join(sys.argv)}")
    print(text)
    if args.out:
        write_report(args.out, {"rows": rows, "table": str(args.table)}, text)


if __name__ == "__main__":
    main()
