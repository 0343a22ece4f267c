"""Peak memory of a worker's evaluation pass: rank 0 of 2's val and test shards, in batches of 4 x 128 (what
distributed/worker.py's exact passes use), through scale.py's model (small CNN, width 8, 64 px crops), on prepared
sets of several N (benchmarks/scale.py's data-N-w2 folders). Each N runs in a fresh process, so each peak is its
own; the RSS before the pass is the base. It separates the evaluation's share of a worker's peak from the
training stream's (benchmarks/loader_memory.py).

    python benchmarks/eval_memory.py [--sizes 5000 20000 80000] [--work /work/scale]
        [--out benchmarks/results/eval_memory]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_support.reports import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CROP, WIDTH, BATCH = 64, 8, 4 * 128


def eval_peak(data_dir: str) -> dict:
    """Accuracy counts of an untrained model on rank 0's val and test shards; RSS before and after each split."""
    import torch

    from noisymix.distributed import shards
    from noisymix.distributed.engine import DataInfo, InputTransform, TrainSection, accuracy_counts, image_stages
    from noisymix.distributed.models import create_model

    manifest = shards.load_manifest(data_dir)
    data = DataInfo.from_manifest(manifest, CROP)
    model = create_model("small_cnn", data.channels, data.num_classes, data.height, WIDTH)
    transform, images = InputTransform(data.mean, data.std), image_stages(TrainSection(crop_size=CROP), data, 0, 0)[1]
    out = {"base_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for split in ("val", "test"):
        stream = shards.sample_stream(shards.shard_urls(data_dir, manifest, split), images=images, rank=0,
                                      world_size=2, batch_size=BATCH)
        out[f"{split}_images"] = accuracy_counts(model, stream, transform, torch.device("cpu"))[1]
        out[f"after_{split}_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def markdown(results: dict) -> str:
    lines = ["# A worker's evaluation pass: peak memory against N", "",
             f"Command: `{results['command']}`. Machine: {results['machine']}. Rank 0 of 2, batches of {BATCH}, "
             f"small CNN width {WIDTH} at {CROP} px, on the CPU; peak RSS (ru_maxrss) of the process.", "",
             "| N | val + test images (rank 0) | base MB | peak after val MB | peak after test MB | above base MB |",
             "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['n']:,} | {r['val_images'] + r['test_images']:,} | {r['base_rss_mb']:.0f} | "
                     f"{r['after_val_peak_rss_mb']:.0f} | {r['after_test_peak_rss_mb']:.0f} | "
                     f"{r['after_test_peak_rss_mb'] - r['base_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(eval_peak(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 20_000, 80_000])
    parser.add_argument("--work", type=Path, default=Path("/work/scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_memory")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(args.work / f"data-{n}-w2")], check=True,
                             capture_output=True, text=True).stdout
        rows.append({"n": n, **json.loads(out)})
        print(json.dumps(rows[-1]), flush=True)
    results = {"command": shlex.join(["python", "benchmarks/eval_memory.py", *sys.argv[1:]]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows}
    write_report(args.out, results, markdown(results))
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
