"""Test accuracy per true class of finished runs' best models: where a method's accuracy went (e.g. a loss
correction that folds a confusable pair onto one of its classes), beside the runs' headline.

    python benchmarks/per_class_accuracy.py --out benchmarks/results/per_class_asymmetric40 \
        runs/bench/crossmix/cells/asymmetric40-*-seed0/run runs/bench/flag_rules/cells/asymmetric40-*-seed0/run

Reads model_best.pt (weights only) and the run's test shards (npy images: the Fashion-MNIST benchmarks); the
test labels are read for evaluation only, as the runs' own test accuracy is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from noisymix.distributed import shards
from noisymix.distributed.artifacts import MODEL_BEST, RunDir, load_checkpoint
from noisymix.distributed.engine import DataInfo, InputTransform, predict
from noisymix.distributed.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_support.reports import write_report  # noqa: E402


def test_predictions(run: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """The run's config values, the test split's true labels and the best model's probabilities on it."""
    config = RunDir(run).config_values()
    manifest = shards.load_manifest(config["data_dir"])
    data = DataInfo.from_manifest(manifest)
    if data.image_format != "npy":
        raise SystemExit(f"{run}: per_class_accuracy.py reads npy shards only (this run trained on JPEG crops)")
    model = create_model(config["model"], data.channels, data.num_classes, data.height, config["width"])
    model.load_state_dict(load_checkpoint(run / MODEL_BEST)["model"])
    stream = shards.sample_stream(shards.shard_urls(config["data_dir"], manifest, "test"), batch_size=512)
    _, labels, probs = predict(model, stream, InputTransform(data.mean, data.std), torch.device("cpu"))
    return config, labels, probs


def class_accuracies(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
    """The share of each true class's samples predicted as that class."""
    return [float(np.mean(predicted[labels == c] == c)) for c in range(num_classes)]


def per_class_accuracy(run: Path) -> dict:
    """The run's method, headline and the best model's accuracy on each true class of the test split."""
    config, labels, probs = test_predictions(run)
    predicted = probs.argmax(axis=1)
    return {"run": str(run), "method": config["method"], "test_acc": float(np.mean(predicted == labels)),
            "headline": (RunDir(run).summary() or {}).get("test_acc"),
            "per_class": class_accuracies(predicted, labels, probs.shape[1])}


def markdown(rows: list[dict], command: str) -> str:
    classes = len(rows[0]["per_class"])
    lines = ["# Test accuracy per true class", "", f"    {command}", "",
             "Best model (the epoch with the best NOISY validation accuracy) of each run, on the test split.", "",
             "| run | method | test acc | " + " | ".join(f"class {c}" for c in range(classes)) + " |",
             "|---|---|---|" + "---|" * classes]
    for r in rows:
        name = Path(r["run"]).parts[-2]
        lines.append(f"| {name} | {r['method']} | {r['test_acc']:.4f} | "
                     + " | ".join(f"{a:.2f}" for a in r["per_class"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    rows = [per_class_accuracy(run) for run in args.runs if (run / MODEL_BEST).is_file()]
    if not rows:
        raise SystemExit("no finished run (with model_best.pt) among the arguments")
    text = markdown(rows, f"python {' '.join(sys.argv)}")
    print(text)
    if args.out:
        write_report(args.out, {"rows": rows}, text)


if __name__ == "__main__":
    main()
