"""Would a vote of feature-space neighbours make the folds better detectors than their own softmax? One fold of
the memorising regime's fold stage (issue 21), scored on the TRUE labels of its held-out samples.

A probe outside the trainer, in one process: fold 0 of fold_loss_probe.py (the data, noise, split, folds, width-32
small CNN and schedule of fashion_mnist_memorise.yaml's folds), trained with cross-entropy. After every epoch each
held-out sample gets these predictions:
- `softmax`: the fold model's argmax (what the fold stage writes to the out-of-fold table);
- `knn k`: the most common GIVEN label among its k nearest training samples of the fold, by cosine similarity
  of the model's penultimate features (deep k-NN, Bahri, Jiang & Gupta, ICML 2020): a neighbourhood of many
  labels outvotes the random wrong ones that the network memorised one by one;
- `blend k`: the argmax of (softmax + the k neighbours' label shares) / 2;
- `pixels knn k`, `pixels blend k`: the same with neighbours by cosine on the pixels (centred on the fold's training
  mean), features that no label shaped;
Flag F1: the mismatch rule (flagged = the prediction differs from the given label) against the truly wrong labels.
Kept epoch: the fold stage's `fold_select=best`, from the softmax's agreement with the given labels. True labels
are read here to score, never to train or to choose.

    python benchmarks/fold_knn_probe.py --settings symmetric40 asymmetric40 --seeds 0 1 [--epochs 8] \
        [--out benchmarks/results/fold_knn_probe]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fold_loss_probe import (SETTINGS, fold_arguments, fold_data, grouped, report_head, scored_fold,  # noqa: E402
                             write_report)

NEIGHBOURS = (10, 50, 200)
BLEND_K = 50


def neighbour_shares(held_features: torch.Tensor, fit_features: torch.Tensor, fit_labels: torch.Tensor,
                     ks: tuple[int, ...], num_classes: int) -> dict[int, torch.Tensor]:
    """Per k, per held-out row, the share of each given label among its k most cosine-similar training rows (the
    similarities computed once for every k)."""
    similar = F.normalize(held_features, dim=1) @ F.normalize(fit_features, dim=1).T
    return {k: F.one_hot(fit_labels[similar.topk(k, dim=1).indices], num_classes).float().mean(dim=1) for k in ks}


def pixel_shares(images: torch.Tensor, fit: np.ndarray, held: np.ndarray, given: torch.Tensor,
                 num_classes: int) -> dict[int, torch.Tensor]:
    """neighbour_shares by cosine on the pixels centred on the fold's training mean: the same every epoch."""
    pixels = images.flatten(1) - images[fit].flatten(1).mean(dim=0)
    return neighbour_shares(pixels[held], pixels[fit], given[fit], NEIGHBOURS, num_classes)


def predictors(model, images: torch.Tensor, fit: np.ndarray, held: np.ndarray, given: torch.Tensor,
               num_classes: int, pixels: dict[int, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every prediction of the module docstring for the held-out rows (`pixels`: pixel_shares')."""
    held_features, fit_features = model.features(images[held]), model.features(images[fit])
    probs = model.head(held_features).softmax(dim=1)
    out = {"softmax": probs.argmax(dim=1)}
    spaces = {"": neighbour_shares(held_features, fit_features, given[fit], NEIGHBOURS, num_classes),
              "pixels ": pixels}
    for prefix, shares in spaces.items():
        out.update({f"{prefix}knn {k}": shares[k].argmax(dim=1) for k in NEIGHBOURS})
        out[f"{prefix}blend {BLEND_K}"] = ((probs + shares[BLEND_K]) / 2).argmax(dim=1)
    return {name: predicted.numpy() for name, predicted in out.items()}


def probe(setting: str, seed: int, epochs: int, data: tuple) -> dict:
    """Fold 0 of `data` with cross-entropy; every predictor's accuracy on the true labels and flag F1, per epoch."""
    _, given, true, fit, held = data
    given_held, true_held = given[held].numpy(), true[held].numpy()
    num_classes = int(given.max()) + 1
    pixels = {}   # the standardised images' pixel shares, made at the first epoch's scoring

    def score(model, images):
        if not pixels:
            pixels.update(pixel_shares(images, fit, held, given, num_classes))
        predicted = predictors(model, images, fit, held, given, num_classes, pixels)
        return {"agree_given": float(np.mean(predicted["softmax"] == given_held)),
                **{name: {"acc_true": float(np.mean(p == true_held)),
                          "flag_f1": float(f1_score(given_held != true_held, p != given_held, zero_division=0))}
                   for name, p in predicted.items()}}

    run = scored_fold(data, "ce", seed, epochs, score)
    return {"setting": setting, "seed": seed, **run, "kept": run["per_epoch"][run["kept_epoch"] - 1]}


def markdown(result: dict) -> str:
    """Per setting and predictor, the kept epoch's accuracy on the true labels and flag F1, mean over seeds."""
    lines = report_head("Neighbours' vote or the fold's softmax? One fold, held-out, on the true labels",
                        result["command"], __doc__, ["setting", "seeds", "kept epochs", "predictor",
                                                     "acc on true labels", "flag F1", "vs softmax (acc / F1)"])
    for setting, rows in grouped(result["runs"], lambda r: r["setting"]).items():
        names = [key for key in rows[0]["kept"] if key != "agree_given"]
        mean = {name: {metric: statistics.mean(r["kept"][name][metric] for r in rows)
                       for metric in ("acc_true", "flag_f1")} for name in names}
        for name in names:
            acc, f1 = mean[name]["acc_true"], mean[name]["flag_f1"]
            lines.append(f"| {setting} | {','.join(str(r['seed']) for r in rows)} | "
                         f"{','.join(str(r['kept_epoch']) for r in rows)} | {name} | {acc:.3f} | {f1:.3f} | "
                         f"{acc - mean['softmax']['acc_true']:+.3f} / {f1 - mean['softmax']['flag_f1']:+.3f} |")
    seconds = statistics.median(r["seconds"] for r in result["runs"])
    return "\n".join(lines) + f"\n\nMedian seconds per fold run, every predictor scored every epoch: {seconds:.0f}.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS))
    args = fold_arguments(parser, "fold_knn_probe")
    command = (f"python benchmarks/fold_knn_probe.py --settings {' '.join(args.settings)} "
               f"--seeds {' '.join(map(str, args.seeds))} --epochs {args.epochs}")
    runs = []
    for setting in args.settings:
        for seed in args.seeds:
            runs.append(probe(setting, seed, args.epochs, fold_data(setting, seed, args.source)))
            kept = runs[-1]["kept"]
            print(f"{setting} seed {seed}: kept epoch {runs[-1]['kept_epoch']}, " + ", ".join(
                f"{name} {v['acc_true']:.3f}/{v['flag_f1']:.3f}" for name, v in kept.items() if name != "agree_given"),
                flush=True)
    write_report(args.out, {"command": command, "runs": runs}, markdown)


if __name__ == "__main__":
    main()
