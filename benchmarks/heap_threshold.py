"""What fixing glibc's malloc thresholds (`heap_mmap_threshold_kb`), or another allocator, costs and saves in one
worker's loop: rank 0 of 2's training epoch (JPEG shards at 64 px crops, the shuffle buffer, CE steps on the small
CNN of scale.py) and its evaluation pass, in a fresh process per run, with glibc's default (the threshold grows as
large blocks are freed, and the heap keeps what is freed under it), with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_
fixed as noisymix's Ray processes get them, and (--preload LIB) with an allocator loaded through LD_PRELOAD, such as
jemalloc, and (--trim-every K) with glibc's default and malloc_trim(0) every K batches. The settings alternate, so
the machine's load falls on all alike; the report gives medians and the per-pair ratio of each setting's training
rate to the default's. Every setting's evaluation pass is trimmed every distributed.heap.TRIM_EVERY batches, as
the package's passes without gradient are since stop 45 (heap_allocators.md and heap_threshold*.md ran before).

    python benchmarks/heap_threshold.py [--sizes 20000 80000] [--repeats 3] [--threshold-kb 128] [--work /work/scale]
        [--preload /usr/lib/x86_64-linux-gnu/libjemalloc.so.2] [--trim-every 20] [--out benchmarks/results/heap_threshold]

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_support.reports import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CROP, WIDTH, BATCH, BUFFER = 64, 8, 128, 2000


def worker_loop(data_dir: str, trim_every: int = 0) -> dict:
    """One epoch of rank 0's training stream and its evaluation pass, as distributed/worker.py runs them."""
    import numpy as np
    import torch

    from noisymix.distributed import shards
    from noisymix.distributed.engine import (DataInfo, TrainSection, accuracy_counts, build_model, build_optimizer,
                                             image_stages, train_epoch, transforms)
    from noisymix.distributed.heap import trimmed
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
    stats = train_epoch(model, optimizer, trimmed(stream, trim_every), PlainTargets(data.num_classes),
                        train_transform, device, np.random.default_rng(0))
    after_training = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started, evaluated = time.perf_counter(), 0
    for split in ("val", "test"):
        batches = shards.sample_stream(shards.shard_urls(data_dir, manifest, split), images=evaluation, rank=0,
                                       world_size=2, batch_size=4 * BATCH)
        evaluated += accuracy_counts(model, trimmed(batches, trim_every), eval_transform, device)[1]
    return {"train_samples": stats.samples, "train_samples_per_s": stats.samples / stats.seconds,
            "eval_images_per_s": evaluated / (time.perf_counter() - started),
            "peak_after_training_mb": after_training,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def settings(threshold_kb: int, preload: str | None, trim_every: int = 0) -> dict[str, tuple[dict[str, str], int]]:
    """Each setting's (additions to a child's environment, its malloc_trim period): glibc's default, both
    thresholds fixed at threshold_kb, the preloaded allocator if one is given, glibc's default trimmed every
    trim_every batches if that is set."""
    from noisymix.distributed.settings import ResourcesSection

    out = {"default": ({}, 0), "fixed": (ResourcesSection(heap_mmap_threshold_kb=threshold_kb).heap_env(), 0)}
    if preload:
        out["preload"] = ({"LD_PRELOAD": preload}, 0)
    if trim_every:
        out["trim"] = ({}, trim_every)
    return out


def run_child(data_dir: Path, setting: str, additions: dict[str, str], trim_every: int = 0) -> dict:
    """One worker loop in a fresh process whose environment has no MALLOC_ variable or preload but the setting's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, __file__, "--child", str(data_dir), str(trim_every)], check=True,
                         capture_output=True, text=True, env={**env, **additions}).stdout
    return {"setting": setting, **json.loads(out)}


def summarise(n: int, runs: list[dict]) -> dict:
    """Medians per setting, and per other setting the median over pairs of (its rate / the default's)."""
    by: dict[str, list[dict]] = {}
    for run in runs:
        by.setdefault(run["setting"], []).append(run)
    median = {name: {k: statistics.median(r[k] for r in rs) for k in ("train_samples_per_s", "eval_images_per_s",
                                                                        "peak_after_training_mb", "peak_rss_mb")}
              for name, rs in by.items()}
    ratios = {name: [b["train_samples_per_s"] / a["train_samples_per_s"] for a, b in zip(by["default"], rs)]
              for name, rs in by.items() if name != "default"}
    return {"n": n, "runs": runs, "median": median, "train_rate_ratio": {k: statistics.median(v) for k, v in ratios.items()},
            "train_rate_ratios": ratios}


def markdown(results: dict) -> str:
    t = results["threshold_kb"]
    names = {"default": "default", "fixed": f"fixed at {t} KB", "preload": f"LD_PRELOAD={results.get('preload')}",
             "trim": f"default, malloc_trim(0) every {results.get('trim_every')} batches"}
    lines = ["# glibc's malloc thresholds in one worker's loop", "",
             f"Command: `{results['command']}`. Machine: {results['machine']}. Rank 0 of 2: one training epoch "
             f"(batch {BATCH}, shuffle buffer {BUFFER}, small CNN width {WIDTH}, {CROP} px crops, one thread) and "
             f"its evaluation pass (val and test, batches of {4 * BATCH}); each run a fresh process, the "
             f"settings alternating; medians over {results['repeats']} runs each. Default: glibc's own thresholds. "
             f"Fixed: MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at {t} KB (noisymix's "
             f"heap_mmap_threshold_kb={t}).", "",
             "| N | setting | training samples/s | evaluation images/s | peak RSS after training MB | "
             "peak RSS MB | training rate / default's (median of pairs) |", "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        for setting, m in row["median"].items():
            ratio = f"{row['train_rate_ratio'][setting]:.2f}x" if setting != "default" else ""
            lines.append(f"| {row['n']:,} | {names[setting]} | {m['train_samples_per_s']:,.0f} | "
                         f"{m['eval_images_per_s']:,.0f} | {m['peak_after_training_mb']:.0f} | {m['peak_rss_mb']:.0f} "
                         f"| {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(worker_loop(sys.argv[2], int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threshold-kb", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("/work/scale"))
    parser.add_argument("--preload", help="another setting: this allocator library through LD_PRELOAD")
    parser.add_argument("--trim-every", type=int, default=0,
                        help="another setting: glibc's default with malloc_trim(0) every this many batches")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "heap_threshold")
    args = parser.parse_args()
    if args.preload and not Path(args.preload).is_file():
        raise SystemExit(f"--preload {args.preload}: no such library (jemalloc: apt install libjemalloc2)")
    chosen = settings(args.threshold_kb, args.preload, args.trim_every)
    rows = []
    for n in args.sizes:
        runs = []
        for _ in range(args.repeats):
            for setting, (additions, trim_every) in chosen.items():
                runs.append(run_child(args.work / f"data-{n}-w2", setting, additions, trim_every))
                print(json.dumps({"n": n, **runs[-1]}), flush=True)
        rows.append(summarise(n, runs))
    results = {"command": shlex.join(["python", "benchmarks/heap_threshold.py", *sys.argv[1:]]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "threshold_kb": args.threshold_kb,
               "preload": args.preload, "trim_every": args.trim_every, "repeats": args.repeats, "rows": rows}
    write_report(args.out, results, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
