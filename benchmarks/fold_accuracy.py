"""How good SelectMix's folds were, how good they would have to be for a detection F1 target, and (--rules)
what each flag rule of selection.flag_rules makes of the same out-of-fold table.

The flag is "out-of-fold prediction != given label". A wrongly labelled sample is flagged unless the fold
predicts exactly its wrong label (recall stays near 1); a correctly labelled one is flagged whenever the
fold errs on it. With noise rate n, recall r and the folds' error rate e on correctly labelled samples,
precision = n r / (n r + (1 - n) e), so an F1 target f caps e, i.e. asks for a fold accuracy on the
correctly labelled samples of at least 1 - e_max. Scored against the shards' true labels (evaluation only).

    python benchmarks/fold_accuracy.py --f1 0.9 --out benchmarks/results/fold_accuracy \\
        runs/bench/fashion_mnist_memorise/cells/*-selectmix{,_folds8,_folds8_best}-seed0/run \\
        runs/bench/fashion_mnist/cells/symmetric40-selectmix-seed*/run runs/bench/fashion_mnist_long/cells/*selectmix*/run
    python benchmarks/fold_accuracy.py --rules --floors 0.5 0.7 --out benchmarks/results/flag_rules_detection \
        runs/bench/detection_tables/cells/*-folds*-seed0/run

With --rules, each rule's row also scores the noise matrix CrossMix's forward correction would estimate from the
samples it keeps (selection.confident_learning.noise_transition) against the kept samples' true one, and
--floors adds confident learning's flags kept only where the out-of-fold top probability reaches each floor
(is there a smaller, surer flagged set?).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from noisymix.distributed import shards
from noisymix.distributed.artifacts import RunDir
from noisymix.selection.confident_learning import noise_transition
from noisymix.selection.crossval import given_label_probability
from noisymix.selection.detection import detection_metrics
from noisymix.selection.flag_rules import FLAG_RULE_HELP, FLAG_RULES, flag_given_labels

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_support.reports import write_report  # noqa: E402


def required_clean_accuracy(noise_rate: float, recall: float, f1: float) -> float:
    """The fold accuracy on correctly labelled samples below which F1 < f1, at this noise rate and recall."""
    if 2 * recall <= f1:
        return float("nan")
    precision = f1 * recall / (2 * recall - f1)
    error = noise_rate * recall * (1 / precision - 1) / (1 - noise_rate)
    return 1.0 - error


def load_run(run: Path) -> tuple[dict, dict, np.ndarray]:
    """A run's config, its out-of-fold table and the true labels of its training split (evaluation only)."""
    config = RunDir(run).config_values()
    manifest = shards.load_manifest(config["data_dir"])
    true = shards.load_labels(config["data_dir"], manifest, label_key=shards.TRUE_LABEL)
    return config, RunDir(run).out_of_fold(), true


def true_noise_matrix(given: np.ndarray, true: np.ndarray, counted: np.ndarray, num_classes: int) -> np.ndarray:
    """P(given k | true j) over the counted samples, from the true labels (evaluation only); identity rows where
    no counted sample is of class j."""
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (true[counted], given[counted]), 1)
    totals = counts.sum(axis=1, keepdims=True)
    return np.where(totals > 0, counts / np.maximum(totals, 1), np.eye(num_classes))


def rule_scores(run: Path, floors: list[float] = ()) -> list[dict]:
    """Each flag rule on the run's out-of-fold table (and confident learning's flags above each confidence floor):
    its flags scored against the true labels, how often the out-of-fold argmax (the class a flagged sample is mixed
    towards) is the true class of a flagged one, and the largest error of the kept samples' estimated noise matrix."""
    config, oof, true = load_run(run)
    selections = (RunDir(run).summary() or {}).get("selections") or [{}]
    probs, given = oof["probs"], oof["given"]
    predicted, noise_score = probs.argmax(axis=1), 1.0 - given_label_probability(probs, given)
    flags = {rule: flag_given_labels(rule, probs, given, config["seed"]) for rule in FLAG_RULES}
    top = probs.max(axis=1)
    flags.update({f"confident, top P >= {floor:g}": flags["confident"] & (top >= floor) for floor in floors})
    rows = []
    for rule, flagged in flags.items():
        scores = detection_metrics(flagged, noise_score, given, true)
        estimated = noise_transition(probs, given, ~flagged)
        actual = true_noise_matrix(given, true, ~flagged, probs.shape[1])
        corrected = float(np.mean(predicted[flagged] == true[flagged])) if flagged.any() else None
        rows.append({"run": str(run), "rule": rule, "folds": config["folds"], "fold_epochs": config["fold_epochs"],
                     "noise_type": config["noise_type"], "noise": scores["noise_rate"],
                     "fold_seconds": selections[0].get("seconds"),
                     "oof_acc": float(np.mean(predicted == true)), "precision": scores["precision"],
                     "recall": scores["recall"], "f1": scores["f1"], "flagged_rate": scores["flagged_rate"],
                     "auroc": scores["auroc"], "class_acc_on_flagged": corrected,
                     "kept_noise": float(np.mean(given[~flagged] != true[~flagged])),
                     "noise_matrix_max_error": float(np.abs(estimated - actual).max())})
    return rows


def fold_quality(run: Path, f1_target: float) -> dict:
    config, oof, true = load_run(run)
    given, predicted = oof["given"], oof["probs"].argmax(axis=1)
    wrong, right = given != true, predicted == true
    scores = detection_metrics(predicted != given, 1.0 - given_label_probability(oof["probs"], given), given, true)
    return {"run": str(run), "train": len(given), "noise": scores["noise_rate"], "folds": config["folds"],
            "fold_epochs": config["fold_epochs"], "fold_select": config.get("fold_select", "last"),
            "oof_acc": float(np.mean(right)), "oof_acc_on_clean": float(np.mean(right[~wrong])),
            "oof_acc_on_wrong": float(np.mean(right[wrong])), "precision": scores["precision"],
            "recall": scores["recall"], "f1": scores["f1"],
            "needed_acc_on_clean": required_clean_accuracy(scores["noise_rate"], scores["recall"], f1_target)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--f1", type=float, default=0.9, help="the F1 target whose fold accuracy is asked for")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    parser.add_argument("--rules", action="store_true", help="score every flag rule on each run's table instead")
    parser.add_argument("--floors", type=float, nargs="*", default=[],
                        help="with --rules: also confident learning's flags where the top probability reaches each")
    args = parser.parse_args()
    if args.rules:
        return write_rules([row for run in args.runs if (run / "oof.npz").is_file()
                            for row in rule_scores(run, args.floors)], args.out)
    rows = [fold_quality(run, args.f1) for run in args.runs if (run / "oof.npz").is_file()]
    lines = [f"| run | train | noise | folds x epochs (kept) | OOF acc | on clean labels | F1 | P | R | "
             f"acc on clean labels needed for F1 {args.f1} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "/".join(Path(r["run"]).parts[-4:-1:2])
        lines.append(f"| {name} | {r['train']:,} | {r['noise']:.3f} | {r['folds']} x {r['fold_epochs']} ({r['fold_select']}) "
                     f"| {r['oof_acc']:.3f} | {r['oof_acc_on_clean']:.3f} | {r['f1']:.3f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['needed_acc_on_clean']:.3f} |")
    print("\n".join(lines))
    if args.out:
        write_report(args.out, {"f1_target": args.f1, "runs": rows},
                     "# SelectMix fold quality against the F1 target\n\n" + "\n\n".join(__doc__.split("\n\n")[1:3])
                     + "\n\n" + "\n".join(lines) + "\n")


def write_rules(rows: list[dict], out: Path | None) -> None:
    lines = ["| table | noise | folds x epochs | folds s | OOF acc (true labels) | rule | flagged | P | R | F1 | "
             "c_i true on flagged | noise of the kept | their T max error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = Path(r["run"]).parts[-2]
        acc = "" if r["class_acc_on_flagged"] is None else f"{r['class_acc_on_flagged']:.3f}"
        seconds = "" if r["fold_seconds"] is None else f"{r['fold_seconds']:.0f}"
        lines.append(f"| {name} | {r['noise_type']} {r['noise']:.3f} | {r['folds']} x {r['fold_epochs']} | {seconds} | "
                     f"{r['oof_acc']:.3f} | {r['rule']} | {r['flagged_rate']:.3f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | **{r['f1']:.3f}** | {acc} | {r['kept_noise']:.3f} | "
                     f"{r['noise_matrix_max_error']:.3f} |")
    print("\n".join(lines))
    if out:
        rules = "\n".join(f"- `{rule}`: {text}" for rule, text in FLAG_RULE_HELP.items())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=1))
        out.with_suffix(".md").write_text(
            "# Flag rules on the same out-of-fold tables\n\nScored against the shards' true labels (evaluation "
            "only); the rules never read them. c_i true on flagged: how often the out-of-fold argmax, the class a "
            "flagged sample is mixed towards, is its true class. Folds s: the fold stage's wall time. Noise of the "
            "kept: the share of wrong labels among the samples the rule does not flag; their T max error: the "
            "largest |T^ - T| of the noise matrix P(given | true) that CrossMix's forward correction estimates from "
            "those samples (docs/crossmix.md H2) against their true one.\n\n"
            f"    python {' '.join(sys.argv)}\n\n" + rules + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
