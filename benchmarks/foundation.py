"""Foundation benchmark: Fashion-MNIST at 40% symmetric noise through the real trainer.

Runs, side by side in one Ray session and one process:
  - ce, mixup and clean with identical settings (1 worker, 2 CPUs): headline and last test accuracy;
  - ce on 1 worker x 1 CPU and on 2 workers x 1 CPU each: the data-parallel throughput ratio;
  - the shard loader alone (decode + shuffle + batch, no model): samples/s on one thread.
Writes benchmarks/results/foundation.{json,md}.

    python benchmarks/foundation.py [--epochs 8] [--scaling-epochs 3] [--width 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from noisymix.distributed import shards
from noisymix.launch.config import build_config
from noisymix.launch.prepare import prepare
from noisymix.launch.train import train

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT.parent / "shared" / "data" / "fashion-mnist"


def base_settings(args, work: Path) -> dict:
    return {"source": "idx", "source_path": str(FASHION), "dataset": "fashion-mnist", "noise_type": "symmetric",
            "noise_rate": 0.4, "seed": 0, "model": "small_cnn", "width": args.width, "batch_size": 128,
            "lr": 0.05, "crop_padding": 2, "hflip": True, "num_shards": 8, "data_dir": str(work / "data")}


def loader_throughput(data_dir: Path, batch_size: int, passes: int = 3) -> float:
    """Median samples/s of one thread streaming the whole train split as a training rank would."""
    manifest = shards.load_manifest(data_dir)
    urls = shards.shard_urls(data_dir, manifest, "train")
    rates = []
    for epoch in range(passes):
        started, count = time.perf_counter(), 0
        for ids, _, _ in shards.sample_stream(urls, shard_seed=epoch, shuffle_buffer=2000, batch_size=batch_size):
            count += len(ids)
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def run(settings: dict, work: Path, name: str, **overrides) -> dict:
    config = build_config(overrides={**settings, **overrides, "run_dir": str(work / name)})
    summary = train(config, log=lambda line: print(f"[{name}] {line}", flush=True))
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    summary["epoch_time_s_median"] = statistics.median(r["epoch_time_s"] for r in records)
    summary["samples_per_s_per_worker_median"] = statistics.median(r["samples_per_s_per_worker"] for r in records)
    summary["name"] = name
    return summary


def markdown(results: dict) -> str:
    lines = [
        "# Foundation benchmark: Fashion-MNIST, 40% symmetric noise",
        "",
        f"Machine: {results['machine']}. Command: `{results['command']}`. Total wall time {results['total_wall_s']:.0f} s.",
        f"Model: small CNN width {results['width']}, {results['epochs']} epochs, batch 128, SGD lr 0.05 cosine, crop 2 + flip.",
        "",
        "## Accuracy (1 worker, 2 CPUs; same data, model, schedule and seed)",
        "",
        "| method | test acc (noisy-val selected) | test acc (last) | best test (labelled as such) | median epoch s | samples/s/worker | peak RSS/worker MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in results["accuracy"]:
        lines.append(f"| {s['method']} | {s['test_acc']:.4f} | {s['test_acc_last']:.4f} | {s['test_acc_best_test']:.4f} | "
                     f"{s['epoch_time_s_median']:.1f} | {s['samples_per_s_per_worker_median']:,.0f} | "
                     f"{s['peak_rss_mb_per_worker']:.0f} |")
    sc = results["scaling"]
    lines += [
        "",
        f"## Data-parallel throughput (ce, {results['scaling_epochs']} epochs, 1 CPU per worker)",
        "",
        "| workers | samples/s per worker (median epoch) | total samples/s | median epoch s |",
        "|---|---|---|---|",
    ]
    for s in sc["runs"]:
        lines.append(f"| {s['workers']} | {s['samples_per_s_per_worker_median']:,.0f} | "
                     f"{s['samples_per_s_per_worker_median'] * s['workers']:,.0f} | {s['epoch_time_s_median']:.1f} |")
    lines += [
        "",
        f"Throughput of 2 workers over 1: **{sc['ratio']:.2f}x** (target >= 1.7x).",
        "",
        f"Loader alone (one thread: tar read, npy decode, shuffle buffer, batching): "
        f"**{results['loader_samples_per_s']:,.0f} samples/s**, "
        f"{results['loader_samples_per_s'] / max(s['samples_per_s_per_worker_median'] for s in sc['runs']):.1f}x "
        "the fastest training rank.",
        "",
        f"Driver peak RSS: {results['driver_peak_rss_mb']:.0f} MB.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--scaling-epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "foundation")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="noisymix-bench-") as tmp:
        work = Path(tmp)
        settings = base_settings(args, work)
        prepare(build_config(overrides=settings))
        loader = loader_throughput(Path(settings["data_dir"]), 128)
        accuracy = [run(settings, work, method, method=method, epochs=args.epochs, num_workers=1, cpus_per_worker=2)
                    for method in ("ce", "mixup", "clean")]
        scaling = [run(settings, work, f"ce-{n}w", method="ce", epochs=args.scaling_epochs, num_workers=n,
                       cpus_per_worker=1) for n in (1, 2)]
    total = scaling[1]["samples_per_s_per_worker_median"] * 2 / scaling[0]["samples_per_s_per_worker_median"]
    results = {
        "command": "python benchmarks/foundation.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads available, "
                   f"torch {torch.__version__}",
        "epochs": args.epochs, "scaling_epochs": args.scaling_epochs, "width": args.width,
        "accuracy": accuracy, "scaling": {"runs": scaling, "ratio": total},
        "loader_samples_per_s": loader,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "total_wall_s": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
