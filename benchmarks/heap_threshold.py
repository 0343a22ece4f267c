"""What fixing glibc's malloc thresholds (`heap_mmap_threshold_kb`) costs and saves in one worker's loop: rank 0 of
2's training epoch (JPEG shards at 64 px crops, the shuffle buffer, CE steps on the small CNN of scale.py) and its
evaluation pass, in a fresh process per run, with glibc's default (the threshold grows as large blocks are freed,
and the heap keeps what is freed under it) or with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ fixed, as
noisymix's Ray processes get them. The two settings alternate, so the machine's load falls on both alike; the
report gives medians and the per-pair ratio of training rates.

    python benchmarks/heap_threshold.py [--sizes 20000 80000] [--repeats 3] [--threshold-kb 128] [--work /work/scale]
        [--out benchmarks/results/heap_threshold]

Needs scale.py's prepared folders (WORK/data-N-w2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CROP, WIDTH, BATCH, BUFFER = 64, 8, 128, 2000


def worker_loop(data_dir: str) -> dict:
    """One epoch of rank 0's training stream and its evaluation pass, as distributed/worker.py runs them."""
    import numpy as np
    import torch

    from noisymix.distributed import shards
    from noisymix.distributed.engine import (DataInfo, TrainSection, accuracy_counts, build_model, build_optimizer,
                                             image_stages, train_epoch, transforms)
    from noisymix.mixing.ce import PlainTargets

    torch.set_num_threads(1)
    manifest = shards.load_manifest(data_dir)
    data = DataInfo.from_manifest(manifest, CROP)
    train = TrainSection(model="small_cnn", width=WIDTH, crop_size=CROP)
    model = build_model(train, data)
    optimizer = build_optimizer(model, train.lr, train.momentum, train.weight_decay)
    train_transform, eval_transform = transforms(train, data)
    training, evaluation = image_stages(train, data, seed=0)
    device = torch.device("cpu")
    stream = shards.sample_stream(shards.shard_urls(data_dir, manifest, "train"), images=training, rank=0,
                                  world_size=2, shard_seed=0, shuffle_buffer=BUFFER, batch_size=BATCH)
    stats = train_epoch(model, optimizer, stream, PlainTargets(data.num_classes), train_transform, device,
                        np.random.default_rng(0))
    after_training = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started, evaluated = time.perf_counter(), 0
    for split in ("val", "test"):
        batches = shards.sample_stream(shards.shard_urls(data_dir, manifest, split), images=evaluation, rank=0,
                                       world_size=2, batch_size=4 * BATCH)
        evaluated += accuracy_counts(model, batches, eval_transform, device)[1]
    return {"train_samples": stats.samples, "train_samples_per_s": stats.samples / stats.seconds,
            "eval_images_per_s": evaluated / (time.perf_counter() - started),
            "peak_after_training_mb": after_training,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def allocator_env(threshold_kb: int) -> dict[str, str]:
    """The environment of a child: glibc's default (0), or both thresholds fixed at threshold_kb."""
    from noisymix.distributed.settings import ResourcesSection

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    return {**env, **ResourcesSection(heap_mmap_threshold_kb=threshold_kb).heap_env()}


def run_child(data_dir: Path, threshold_kb: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(data_dir)], check=True, capture_output=True,
                         text=True, env=allocator_env(threshold_kb)).stdout
    return {"threshold_kb": threshold_kb, **json.loads(out)}


def summarise(n: int, runs: list[dict], threshold_kb: int) -> dict:
    """Medians per setting, and the median over pairs of (fixed rate / default rate)."""
    by = {name: [r for r in runs if r["threshold_kb"] == t] for name, t in (("default", 0), ("fixed", threshold_kb))}
    median = {name: {k: statistics.median(r[k] for r in rs) for k in ("train_samples_per_s", "eval_images_per_s",
                                                                        "peak_after_training_mb", "peak_rss_mb")}
              for name, rs in by.items()}
    ratios = [b["train_samples_per_s"] / a["train_samples_per_s"] for a, b in zip(by["default"], by["fixed"])]
    return {"n": n, "runs": runs, "median": median, "train_rate_ratio": statistics.median(ratios),
            "train_rate_ratios": ratios}


def markdown(results: dict) -> str:
    t = results["threshold_kb"]
    lines = ["# glibc's malloc thresholds in one worker's loop", "",
             f"Command: `{results['command']}`. Machine: {results['machine']}. Rank 0 of 2: one training epoch "
             f"(batch {BATCH}, shuffle buffer {BUFFER}, small CNN width {WIDTH}, {CROP} px crops, one thread) and "
             f"its evaluation pass (val and test, batches of {4 * BATCH}); each run a fresh process, the two "
             f"settings alternating; medians over {results['repeats']} runs each. Default: glibc's own thresholds. "
             f"Fixed: MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at {t} KB (noisymix's "
             f"heap_mmap_threshold_kb={t}).", "",
             "| N | setting | training samples/s | evaluation images/s | peak RSS after training MB | "
             "peak RSS MB | training rate, fixed / default (median of pairs) |", "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        for setting, name in (("default", "default"), ("fixed", f"fixed at {t} KB")):
            m = row["median"][setting]
            ratio = f"{row['train_rate_ratio']:.2f}x" if setting == "fixed" else ""
            lines.append(f"| {row['n']:,} | {name} | {m['train_samples_per_s']:,.0f} | {m['eval_images_per_s']:,.0f} "
                         f"| {m['peak_after_training_mb']:.0f} | {m['peak_rss_mb']:.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(worker_loop(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threshold-kb", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("/work/scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "heap_threshold")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        runs = []
        for _ in range(args.repeats):
            for threshold in (0, args.threshold_kb):
                runs.append(run_child(args.work / f"data-{n}-w2", threshold))
                print(json.dumps({"n": n, **runs[-1]}), flush=True)
        rows.append(summarise(n, runs, args.threshold_kb))
    results = {"command": shlex.join(["python", "benchmarks/heap_threshold.py", *sys.argv[1:]]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "threshold_kb": args.threshold_kb,
               "repeats": args.repeats, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
