"""Peak memory of one loader process: a rank's training stream over JPEG shards (rank 0 of 2, one epoch), decoded
and cropped by JpegCrops, with and without the shuffle buffer, at small and 224 px crops, on prepared sets of N
and 4N images (benchmarks/scale.py's data-N-w2 folders). Each cell runs in a fresh process, so each peak is its
own; the loader's RSS before the stream is the base. On a GPU node every loader worker holds one such stream.

    python benchmarks/loader_memory.py [--sizes 20000 80000] [--work /work/scale] [--label LABEL]
        [--out benchmarks/results/loader_memory]

Writes OUT.json and OUT.md; with --compare OLD.json the table shows OLD's peaks beside these (OLD: the same
script run against other code, e.g. a worktree's folders on PYTHONPATH).
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_support.reports import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CROPS, BUFFERS = (64, 224), (0, 2000)


def stream_peak(data_dir: str, crop: int, buffer: int) -> dict:
    """One epoch of rank 0 of 2's training stream, batches of 128: peak RSS and images/s of this process."""
    from noisymix.distributed import shards
    from noisymix.distributed.engine import DataInfo, TrainSection, image_stages

    manifest = shards.load_manifest(data_dir)
    data = DataInfo.from_manifest(manifest, crop)
    images = image_stages(TrainSection(crop_size=crop), data, 0, 0)[0]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stream = shards.sample_stream(shards.shard_urls(data_dir, manifest, "train"), images=images, rank=0,
                                  world_size=2, shard_seed=1, shuffle_buffer=buffer, shuffle_seed=1, batch_size=128)
    started, seen = time.perf_counter(), 0
    for ids, _, _ in stream:
        seen += len(ids)
    return {"images": seen, "images_per_s": seen / (time.perf_counter() - started), "base_rss_mb": base,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(work: Path, sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        for crop in CROPS:
            for buffer in BUFFERS:
                out = subprocess.run([sys.executable, __file__, "--child", str(work / f"data-{n}-w2"), str(crop),
                                      str(buffer)], check=True, capture_output=True, text=True).stdout
                rows.append({"n": n, "crop": crop, "shuffle_buffer": buffer, **json.loads(out)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(results: dict, old: dict | None) -> str:
    before = {(r["n"], r["crop"], r["shuffle_buffer"]): r for r in old["rows"]} if old else {}
    head = ["N", "crop px", "shuffle buffer", "images", "base MB", f"peak MB ({results['label']})",
            "above base MB", "images/s"]
    if old:
        head += [f"peak MB ({old['label']})", f"above base MB ({old['label']})"]
    lines = ["# The loader's memory: one process, one rank's training stream", "",
             f"Command: `{results['command']}`. Machine: {results['machine']}. Rank 0 of 2, batches of 128, "
             "JpegCrops (RandomResizedCrop + flip); peak RSS of the loader process (ru_maxrss).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        cells = [f"{r['n']:,}", str(r["crop"]), str(r["shuffle_buffer"]), f"{r['images']:,}", f"{r['base_rss_mb']:.0f}",
                 f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] - r['base_rss_mb']:.0f}", f"{r['images_per_s']:.0f}"]
        o = before.get((r["n"], r["crop"], r["shuffle_buffer"]))
        if old:
            cells += ["-", "-"] if o is None else [f"{o['peak_rss_mb']:.0f}", f"{o['peak_rss_mb'] - o['base_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(stream_peak(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000])
    parser.add_argument("--work", type=Path, default=Path("/work/scale"))
    parser.add_argument("--label", default="this code")
    parser.add_argument("--compare", type=Path, help="an earlier OUT.json to show beside")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loader_memory")
    args = parser.parse_args()
    results = {"command": shlex.join(["python", "benchmarks/loader_memory.py", *sys.argv[1:]]), "label": args.label,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "rows": measure(args.work, args.sizes)}
    old = json.loads(args.compare.read_text()) if args.compare else None
    write_report(args.out, results, markdown(results, old))
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
