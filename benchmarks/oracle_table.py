"""A perfect detector's out-of-fold table for every bench cell that asks for one (`oof_from`, `clean_from`).

The oracle cells of a spec measure the ceiling of a method's batch rule: what SelectMix's mixing would
reach if the fold stage were perfect (flagged = exactly the wrong labels, predicted class = the true one,
trusted pools = the clean samples), and what MixNN's would reach with perfect clean probabilities
(w_i = P[i, y_i] = 1 for a correct given label, 0 for a wrong one). This writes, at each such cell's
path, an oof.npz whose out-of-fold P is the one-hot TRUE label of the cell's prepared data; the training
run reads it as it would read an earlier run's predictions. True labels are read here, by the benchmark,
never by training. Only paths under the bench's `oracle/` folder are written: a cell that names another
file (a real run's oof.npz) is left alone.

    python benchmarks/oracle_table.py benchmarks/fashion_mnist_memorise.yaml
    noisymix bench benchmarks/fashion_mnist_memorise.yaml --only '*/*_oracle*/*'
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from noisymix.distributed import shards
from noisymix.distributed.artifacts import write_out_of_fold
from noisymix.launch.bench_spec import load_spec
from noisymix.launch.prepare import prepare


def write_oracle_table(data_dir: Path, target: Path) -> dict:
    """One-hot true-label P beside the given labels, in oof.npz's layout; returns what it holds."""
    manifest = shards.load_manifest(data_dir)
    if not manifest["has_true_labels"]:
        raise SystemExit(f"{data_dir} has no true labels: an oracle table needs synthetic noise")
    given = shards.load_labels(str(data_dir), manifest)
    true = shards.load_labels(str(data_dir), manifest, label_key=shards.TRUE_LABEL)
    write_out_of_fold(target, np.eye(manifest["num_classes"], dtype=np.float32)[true], given)
    return {"samples": len(given), "wrong_labels": int(np.sum(given != true))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--work", type=Path, help="the bench's work directory (default runs/bench/NAME)")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    work = args.work or Path("runs") / "bench" / spec.name
    oracle_dir = (work / "oracle").resolve()
    cells = [c for c in spec.cells
             if oracle_dir in Path(c.overrides.get("oof_from") or c.overrides.get("clean_from") or "/").resolve().parents]
    if not cells:
        raise SystemExit(f"no cell of {args.spec} reads a table under {work / 'oracle'} (oof_from or clean_from)")
    for cell in cells:
        config = cell.config(work)
        data_dir = prepare(config.data, config.run.seed, log=lambda line: None)
        target = Path(config.method.out_of_fold_file() or config.method.fixed_clean_file())
        held = write_oracle_table(data_dir, target)
        print(f"{cell.id}: {target} ({held['wrong_labels']} of {held['samples']} given labels wrong)")


if __name__ == "__main__":
    main()
