"""Ceiling out-of-fold tables for every bench cell that asks for one (`oof_from`, `clean_from`).

The oracle cells of a spec measure the ceiling of a method's batch rule: what SelectMix's mixing would
reach if the fold stage were perfect (flagged = exactly the wrong labels, predicted class = the true one,
trusted pools = the clean samples), and what MixNN's would reach with perfect clean probabilities
(w_i = P[i, y_i] = 1 for a correct given label, 0 for a wrong one). This writes, at each such cell's
path under the bench's `oracle/` folder, an oof.npz whose out-of-fold P is the one-hot TRUE label of the
cell's prepared data; the training run reads it as it would read an earlier run's predictions.

Under `clean_folds/` it writes the table of REAL folds trained on the true labels (same K, same split of
the ids, `--fold-epochs` each, best epoch by held-out agreement with the true labels), beside the given
labels: the detector a fold stage would be if it learned nothing of the noise, so that only how confusable
the classes are limits it. It runs the folds as Ray tasks on a local Ray.

True labels are read here, by the benchmark, never by training. A cell that names another file (a real
run's oof.npz) is left alone.

    python benchmarks/oracle_table.py benchmarks/fashion_mnist_memorise.yaml
    noisymix bench benchmarks/fashion_mnist_memorise.yaml --only '*/*_oracle*/*'
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path

import numpy as np

from noisymix.distributed import shards
from noisymix.distributed.artifacts import write_out_of_fold
from noisymix.distributed.folds import FoldTrainer, ray_map
from noisymix.distributed.runner import start_ray
from noisymix.launch.bench_spec import load_spec
from noisymix.launch.prepare import prepare
from noisymix.selection.crossval import out_of_fold_probabilities


def write_oracle_table(data_dir: Path, target: Path) -> dict:
    """One-hot true-label P beside the given labels, in oof.npz's layout; returns what it holds."""
    manifest = shards.load_manifest(data_dir)
    if not manifest["has_true_labels"]:
        raise SystemExit(f"{data_dir} has no true labels: an oracle table needs synthetic noise")
    given = shards.load_labels(str(data_dir), manifest)
    true = shards.load_labels(str(data_dir), manifest, label_key=shards.TRUE_LABEL)
    write_out_of_fold(target, np.eye(manifest["num_classes"], dtype=np.float32)[true], given)
    return {"samples": len(given), "wrong_labels": int(np.sum(given != true))}


def write_clean_fold_table(config, data_dir: Path, target: Path, fold_epochs: int, map=None) -> dict:
    """Out-of-fold P of the cell's K folds trained `fold_epochs` on the TRUE labels, beside the given labels;
    `map` runs the folds (default: one Ray task each)."""
    manifest = shards.load_manifest(data_dir)
    given = shards.load_labels(str(data_dir), manifest)
    true = shards.load_labels(str(data_dir), manifest, label_key=shards.TRUE_LABEL)
    cv = dataclasses.replace(config.method.config, fold_epochs=fold_epochs, fold_gpus=0.0)
    trainer = FoldTrainer(str(data_dir), manifest, config.train, cv, config.run.seed, labels=true)
    probs, fold_of, runs = out_of_fold_probabilities(given, cv.folds, config.run.seed, trainer,
                                                     map=map or functools.partial(ray_map, cpus=cv.fold_cpus))
    write_out_of_fold(target, probs, given, fold=fold_of)
    return {"samples": len(given), "wrong_labels": int(np.sum(given != true)),
            "fold_accuracy_on_true": float(np.mean(probs.argmax(axis=1) == true)),
            "fold_epochs_kept": [run["kept_epoch"] for run in runs]}


def cells_under(spec, work: Path, folder: str) -> list:
    """The spec's cells whose oof_from or clean_from names a file under WORK/folder."""
    root = (work / folder).resolve()
    return [c for c in spec.cells
            if root in Path(c.overrides.get("oof_from") or c.overrides.get("clean_from") or "/").resolve().parents]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--work", type=Path, help="the bench's work directory (default runs/bench/NAME)")
    parser.add_argument("--clean-folds", action="store_true",
                        help="write the tables under clean_folds/ (folds trained on the true labels) instead")
    parser.add_argument("--fold-epochs", type=int, default=8, help="epochs of each clean fold (default 8)")
    parser.add_argument("--redo", action="store_true",
                        help="write the clean-fold tables that exist already again (by default they are kept: each costs "
                             "a fold stage)")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    work = args.work or Path("runs") / "bench" / spec.name
    folder = "clean_folds" if args.clean_folds else "oracle"
    cells = cells_under(spec, work, folder)
    if not cells:
        raise SystemExit(f"no cell of {args.spec} reads a table under {work / folder} (oof_from or clean_from)")
    if args.clean_folds:
        start_ray()
    written = set()
    for cell in cells:
        config = cell.config(work)
        data_dir = prepare(config.data, config.run.seed, log=lambda line: None)
        target = Path(config.method.out_of_fold_file() or config.method.fixed_clean_file())
        if target in written or (args.clean_folds and target.exists() and not args.redo):
            continue
        held = (write_clean_fold_table(config, data_dir, target, args.fold_epochs) if args.clean_folds
                else write_oracle_table(data_dir, target))
        written.add(target)
        print(f"{cell.id}: {target} ({json.dumps(held)})")


if __name__ == "__main__":
    main()
