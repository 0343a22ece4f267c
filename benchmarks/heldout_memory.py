"""A fold's held-out pass alone, and what trimming glibc's heap between its batches does to its memory and time.

Fold 0 of SelectMix's default 5 stratified folds of a prepared JPEG set (scale.py's data-N-w2 folders): an
untrained small CNN (width 8, 64 px crops, as scale.py's end-to-end runs) predicts the fold's held-out ids from
the train shards, as distributed/folds.py does after a fold's training (`engine.predict`, batches of 128, decoding
in the process). Each run is a fresh process with one thread, its heap trimmed every K batches
(distributed.heap.TRIM_EVERY = K; 0: never). The settings alternate, so the machine's load falls on all alike.
Reported: the RSS high-water mark and the anonymous memory at the end, above the process's RSS just before the
pass, and the wall and CPU seconds of the pass.

    python benchmarks/heldout_memory.py [--data /work/scale/data-320000-w2] [--every 0 20 1] [--repeats 2]
        [--out benchmarks/results/heldout_memory]
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
CROP, WIDTH, BATCH, FOLDS = 64, 8, 128, 5


def status_mb() -> dict[str, float]:
    """VmRSS, VmHWM and RssAnon of this process, in MB."""
    with open("/proc/self/status") as status:
        return {key: int(rest.split()[0]) / 1024 for key, _, rest in (line.partition(":") for line in status)
                if key in ("VmRSS", "VmHWM", "RssAnon")}


def heldout_pass(data_dir: str, every: int) -> dict:
    """Fold 0's held-out pass with the heap trimmed every `every` batches: samples, seconds, memory above the start."""
    import numpy as np
    import torch

    from noisymix.distributed import engine, heap, shards
    from noisymix.selection.crossval import stratified_folds

    torch.set_num_threads(1)
    heap.TRIM_EVERY = every
    manifest = shards.load_manifest(data_dir)
    data = engine.DataInfo.from_manifest(manifest, CROP)
    train = engine.TrainSection(model="small_cnn", width=WIDTH, crop_size=CROP, batch_size=BATCH)
    torch.manual_seed(0)
    model = engine.build_model(train, data)
    _, transform = engine.transforms(train, data)
    _, images = engine.image_stages(train, data, seed=0)
    given = shards.load_labels(data_dir, manifest)
    held_out = np.zeros(len(given), dtype=bool)
    held_out[stratified_folds(given, FOLDS, 0)[0][1]] = True
    stream = shards.sample_stream(shards.shard_urls(data_dir, manifest, "train"), images=images,
                                  batch_size=train.eval_batch, only=shards.IdFilter(held_out))
    start, cpu, wall = status_mb(), time.process_time(), time.perf_counter()
    ids, _, probs = engine.predict(model, stream, transform, torch.device("cpu"))
    end = status_mb()
    assert len(ids) == int(held_out.sum()) and probs.shape[1] == data.num_classes
    return {"every": every, "samples": len(ids), "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu, "base_rss_mb": start["VmRSS"],
            "hwm_above_base_mb": end["VmHWM"] - start["VmRSS"], "anon_growth_mb": end["RssAnon"] - start["RssAnon"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def summarise(runs: list[dict]) -> list[dict]:
    """Per setting: the medians of its runs, and its wall time over the untrimmed run's of the same repeat."""
    untrimmed = [r["wall_s"] for r in runs if r["every"] == 0]
    rows = []
    for every in dict.fromkeys(r["every"] for r in runs):
        mine = [r for r in runs if r["every"] == every]
        row = {"every": every, "runs": len(mine), "samples": mine[0]["samples"]}
        for key in ("wall_s", "cpu_s", "hwm_above_base_mb", "anon_growth_mb", "base_rss_mb"):
            row[key] = statistics.median(r[key] for r in mine)
        row["hwm_above_base_each_mb"] = [r["hwm_above_base_mb"] for r in mine]
        if len(untrimmed) == len(mine):
            row["wall_ratios"] = [r["wall_s"] / base for r, base in zip(mine, untrimmed)]
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    lines = ["# A fold's held-out pass: memory and time with the heap trimmed between batches", "",
             f"Command: `{results['command']}`. Machine: {results['machine']}. Fold 0 of {FOLDS} of "
             f"`{results['data']}`: {results['rows'][0]['samples']:,} held-out JPEGs predicted by an untrained small "
             f"CNN (width {WIDTH}, {CROP} px, batches of {BATCH}, one thread); medians of {results['repeats']} fresh "
             "processes per setting, the settings alternating. MB above the process's RSS before the pass.", "",
             "| trim every | high-water above start MB (each run) | anonymous growth MB | wall s | CPU s | "
             "wall / untrimmed (each run) |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        every = "never" if r["every"] == 0 else f"{r['every']} batch{'es' * (r['every'] > 1)}"
        ratios = ", ".join(f"{x:.2f}" for x in r.get("wall_ratios", []))
        each = ", ".join(f"{x:,.0f}" for x in r["hwm_above_base_each_mb"])
        lines.append(f"| {every} | {r['hwm_above_base_mb']:,.0f} ({each}) | {r['anon_growth_mb']:,.0f} | "
                     f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {ratios} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(heldout_pass(sys.argv[2], int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/scale/data-320000-w2")
    parser.add_argument("--every", type=int, nargs="+", default=[0, 20, 1])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "heldout_memory")
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        for every in args.every:
            out = subprocess.run([sys.executable, __file__, "--child", args.data, str(every)], check=True,
                                 capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    results = {"command": shlex.join(["python", "benchmarks/heldout_memory.py", *sys.argv[1:]]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "data": args.data,
               "repeats": args.repeats, "runs": runs, "rows": summarise(runs)}
    write_report(args.out, results, markdown(results))
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
