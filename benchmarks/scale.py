"""Scale: prepare, the loader and SelectMix / MixNN end to end on synthetic JPEG sets of N and 4N images,
with every process's peak memory, extrapolated to Clothing1M (1M images, 14 classes) and WebVision (2.4M,
1000 classes).

Per N (synthetic 200-500 px JPEGs, `noisymix synth`):
  - a bare loop on one core (PIL decode + shorter-side resize to 256), the reference rate, run before, between
    and after the two prepares;
  - prepare with 1 and 2 writer processes (stored_size 256): images/s per core against the bare loops run just
    before and after it, the
    writers' and the driver's peak RSS; prepare with stored_size 0: shard bytes against the source bytes;
  - the loader: decode + RandomResizedCrop(224) + flip, images/s per loader process against the bare loop;
  - SelectMix (global partners) and MixNN (global neighbours) on 2 workers at 64 px crops (a CPU budget:
    memory, not accuracy, is measured): peak RSS of the driver, the workers, the fold tasks, the index actor.
Every prepare and training run is its own `noisymix` process with its own Ray, so each peak is its own.

    python benchmarks/scale.py [--sizes 20000 80000] [--work runs/scale] [--out benchmarks/results/scale]
    python benchmarks/scale.py --prepare-only --sizes 20000 --out benchmarks/results/scale_prepare

With --prepare-only, the bare loop and the two re-encoding prepares only (a few minutes, for a change to prepare);
with --render, OUT.md rewritten from OUT.json (a change to the report or the extrapolation).

Writes OUT.json and OUT.md; data under WORK is reused by a re-run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from noisymix.distributed import shards
from noisymix.distributed.artifacts import RunDir
from noisymix.distributed.images import JpegCrops
from noisymix.launch.synth import SynthSection, synthesize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_support.reports import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEST_SHARE, CLASSES = 10, 14
TARGETS = {"clothing1m": (1_000_000, 14), "webvision": (2_400_000, 1000)}
# The end-to-end runs: a CPU budget (memory, not accuracy, is measured), and each method's keys
END_TO_END_KEYS = ["crop_size=64", "model=small_cnn", "width=8", "num_workers=2", "cpus_per_worker=1", "loader_workers=0"]
END_TO_END_METHODS = {"selectmix": ["method=selectmix", "partner_source=global", "fold_epochs=1", "epochs=1"],
                      "mixnn": ["method=mixnn", "epochs=3", "warmup=1", "es=2"]}


def bare_loop(source: Path, count: int, passes: int = 3) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of the reference loop on one core: open, decode to RGB,
    resize the shorter side to 256. Medians of `passes` passes after one that only reads the files (the prepares
    too read from the page cache). CPU seconds do not count what other processes take from the core: on a
    shared machine the wall rates of the loop and of a prepare minutes later differ by up to 1.4x."""
    paths = [source / line.split()[0] for line in (source / "train.txt").read_text().splitlines()[:count]]
    for path in paths:
        path.read_bytes()
    wall, cpu = [], []
    for _ in range(passes):
        started, cpu_started = time.perf_counter(), time.process_time()
        for path in paths:
            with Image.open(path) as image:
                image = image.convert("RGB")
                scale = 256 / min(image.size)
                image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        wall.append(len(paths) / (time.perf_counter() - started))
        cpu.append(len(paths) / (time.process_time() - cpu_started))
    return statistics.median(wall), statistics.median(cpu)


def bracketing_loops(loops: list[tuple[float, float]]) -> dict:
    """A prepare's reference rates: the mean of the bare loops run just before and just after it, so that a
    machine that slows or speeds up over minutes moves both sides of the ratio alike."""
    return {"bare_images_per_s": statistics.mean(wall for wall, _ in loops),
            "bare_images_per_cpu_s": statistics.mean(cpu for _, cpu in loops)}


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process and its waited-for descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def noisymix(*args: str) -> None:
    """Run one noisymix command in its own process (and its own Ray), so each peak RSS is its own."""
    subprocess.run([sys.executable, "-m", "noisymix.launch.cli", *args], check=True)


def list_keys(source: Path, data_dir: Path) -> list[str]:
    return ["source=image_list", f"source_path={source}", "noise_type=none", "noise_rate=0", "num_shards=16",
            f"data_dir={data_dir}"]


def timed_prepare(source: Path, data_dir: Path, workers: int, stored_size: int) -> dict:
    """Prepare (or reuse: the manifest records how long its prepare took; one that does not is prepared again)."""
    manifest = shards.load_manifest(data_dir) if (data_dir / shards.MANIFEST).is_file() else {}
    cpu_seconds = None
    if "seconds" not in manifest.get("prepare", {}):
        shutil.rmtree(data_dir, ignore_errors=True)
        cpu_started = children_cpu_seconds()
        noisymix("prepare", *list_keys(source, data_dir), f"prepare_workers={workers}", f"stored_size={stored_size}")
        cpu_seconds = children_cpu_seconds() - cpu_started
        manifest = shards.load_manifest(data_dir)
    seconds = manifest["prepare"]["seconds"]
    images = sum(info["count"] for info in manifest["splits"].values())
    shard_bytes = sum(s["bytes"] for info in manifest["splits"].values() for s in info["shards"])
    return {"workers": workers, "stored_size": stored_size, "seconds": seconds, "images": images,
            "images_per_s": images / seconds, "images_per_s_per_core": images / seconds / workers,
            "cpu_seconds": cpu_seconds, "images_per_cpu_s": images / cpu_seconds if cpu_seconds else None,
            "shard_bytes": shard_bytes, **manifest["prepare"]}


def loader_rate(data_dir: Path, loader_workers: int, count: int) -> float:
    """Images/s through the training loader: decode + RandomResizedCrop(224) + flip in loader processes."""
    manifest = shards.load_manifest(data_dir)
    stream = shards.sample_stream(shards.shard_urls(data_dir, manifest, "train"),
                                  images=JpegCrops(224, train=True), batch_size=64)
    seen, started = 0, None
    for batch in shards.iterate_batches(stream, loader_workers):
        started = started or time.perf_counter()    # the first batch pays the processes' start
        seen += len(batch[0])
        if seen >= count:
            break
    return (seen - 64) / (time.perf_counter() - started)


def end_to_end(data_dir: Path, source: Path, run_dir: Path, method: list[str]) -> dict:
    """A run (or the finished one in run_dir): its wall time as summary.json records it, and the peaks."""
    if not (run_dir / "summary.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        noisymix("train", *list_keys(source, data_dir), f"run_dir={run_dir}", *END_TO_END_KEYS, *method)
    summary, records = RunDir(run_dir).summary(), RunDir(run_dir).metrics()
    folds = [f for s in summary.get("selections", []) for f in s["folds"]]
    return {"method": summary["method"], "wall_s": summary["wall_time_s"],
            "driver_peak_rss_mb": summary["driver_peak_rss_mb"],
            "worker_peak_rss_mb": max(r["peak_rss_mb_per_worker"] for r in records),
            "fold_task_peak_rss_mb": max((f["peak_rss_mb"] for f in folds), default=None),
            "index_actor_peak_rss_mb": max((r.get("index_peak_rss_mb", 0.0) for r in records), default=0.0) or None}


def measure(n: int, work: Path, log, prepare_only: bool = False) -> dict:
    source = work / f"synth-{n}"
    if not (source / "train.txt").is_file():
        synthesize(SynthSection.from_values({"out": str(source), "train": n, "test": n // TEST_SHARE,
                                             "classes": CLASSES, "noise_rate": 0.3}), log=log)
    source_bytes = sum(p.stat().st_size for p in (source / "images").rglob("*.jpg"))
    loops = [bare_loop(source, 1000)]
    row = {"n": n, "source_bytes": source_bytes, "prepare": []}
    for workers in (1, 2):
        prepared = timed_prepare(source, work / f"data-{n}-w{workers}", workers, 256)
        loops.append(bare_loop(source, 1000))
        row["prepare"].append({**prepared, **bracketing_loops(loops[-2:])})
    row["bare_loop_images_per_s"] = statistics.median(wall for wall, _ in loops)
    row["bare_loop_images_per_cpu_s"] = statistics.median(cpu for _, cpu in loops)
    if prepare_only:
        return row
    row["prepare_as_is"] = timed_prepare(source, work / f"data-{n}-asis", 2, 0)
    row["loader_images_per_s"] = {w: loader_rate(work / f"data-{n}-w2", w, 3000) for w in (1, 2)}
    row["end_to_end"] = [end_to_end(work / f"data-{n}-w2", source, work / f"run-{n}-{name}", method)
                         for name, method in END_TO_END_METHODS.items()]
    return row


def extrapolate(rows: list[dict]) -> list[dict]:
    """Per-process peak RSS at a target size from the smallest and largest measured N, two ways: through log N
    (growth per doubling fixed) and linear in N (growth per sample fixed); and prepare hours on 16 cores at the
    measured per-core rate. Two sizes fit both exactly: which holds beyond them needs more sizes
    (rss_breakdown.py's runs at 5k-320k: the workers' growth slowed, the fold tasks' did not; findings.md)."""
    small, large = rows[0], rows[-1]
    out = []
    for name, (n, _) in TARGETS.items():
        entry = {"dataset": name, "n": n, "memory_mb": {}}
        rate = statistics.median(p["images_per_s_per_core"] for p in large["prepare"])
        entry["prepare_hours_16_cores"] = n / (rate * 16) / 3600
        for a, b in zip(small["end_to_end"], large["end_to_end"]):
            for key in ("driver_peak_rss_mb", "worker_peak_rss_mb", "fold_task_peak_rss_mb", "index_actor_peak_rss_mb"):
                if a.get(key) and b.get(key):
                    rise = b[key] - a[key]
                    entry["memory_mb"][f"{a['method']}.{key}"] = {
                        "log_n": b[key] + rise * math.log(n / large["n"]) / math.log(large["n"] / small["n"]),
                        "linear": b[key] + rise * (n - large["n"]) / (large["n"] - small["n"])}
        out.append(entry)
    return out


def prepare_cells(r: dict) -> str:
    """N, source MB, the bare loop, both prepares against it (per wall second and per CPU second of the prepare's
    processes, where measured; each against the loops just before and after it where the row has them) and the
    2-writer peaks, as table cells."""
    bare, bare_cpu = r["bare_loop_images_per_s"], r.get("bare_loop_images_per_cpu_s")
    p1, p2 = r["prepare"]

    def wall(p):
        return f"{p['images_per_s']:,.0f}, {p['images_per_s_per_core'] / p.get('bare_images_per_s', bare):.2f}x"

    def cpu(p):
        if not p.get("images_per_cpu_s"):
            return "-"
        return f"{p['images_per_cpu_s']:,.0f}, {p['images_per_cpu_s'] / p.get('bare_images_per_cpu_s', bare_cpu):.2f}x"

    cpu_cells = f"{bare_cpu:,.0f} | {cpu(p1)} | {cpu(p2)}" if bare_cpu else "- | - | -"
    return (f"| {r['n']:,} | {r['source_bytes'] / 2**20:,.0f} | {bare:,.0f} | {wall(p1)} | {wall(p2)} | {cpu_cells} | "
            f"{p2['writer_peak_rss_mb']:,.0f} / {p2['driver_peak_rss_mb']:,.0f} |")


PREPARE_COLUMNS = ["N", "source MB", "bare loop img/s (1 core)", "prepare 1 writer: img/s, per core vs bare",
                   "prepare 2 writers: img/s, per core vs bare", "bare loop img per CPU-s",
                   "prepare 1 writer: img per CPU-s, vs bare", "prepare 2 writers: img per CPU-s, vs bare",
                   "writer / driver peak RSS MB"]


def header(columns: list[str]) -> list[str]:
    """A markdown table's header row and its rule."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def prepare_markdown(results: dict) -> str:
    lines = ["# Scale: prepare alone on synthetic JPEG sets", "",
             f"Command: `{results['command']}`. Machine: {results['machine']}, {os.cpu_count()} cores. Synthetic "
             f"JPEGs of 200-500 px, {CLASSES} classes (`noisymix synth`), test = N/{TEST_SHARE}; stored_size 256 "
             "(larger images resized and re-encoded, JPEGs that need no resize kept as they are), 16 shards per split. "
             "Bare loop: the median of 3 passes over the first 1,000 training images, after a pass that reads them "
             "(the prepares too read from the page cache); it runs before, between and after the two prepares, the "
             "table shows the median of those three, and each prepare's ratio is against the mean of the loops just "
             "before and after it (this machine's speed drifts by up to 1.4x over minutes).", "",
             *header(PREPARE_COLUMNS)]
    lines += [prepare_cells(r) for r in results["rows"]]
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    rows = results["rows"]
    lines = ["# Scale: prepare, loader and end-to-end memory on synthetic JPEG sets", "",
             f"Command: `{results['command']}`. Machine: {results['machine']}, {os.cpu_count()} cores. Synthetic "
             f"JPEGs of 200-500 px, {CLASSES} classes (`noisymix synth`), test = N/{TEST_SHARE}; stored_size 256, "
             "16 shards per split. Peak RSS is each process's ru_maxrss.", "",
             "## Prepare and loader", "",
             *header(PREPARE_COLUMNS + ["shard bytes / source bytes (stored as is)",
                                        "loader img/s per process (1 / 2 processes) vs bare"])]
    for r in rows:
        bare = r["bare_loop_images_per_s"]
        loader = r["loader_images_per_s"]
        per_process = [loader[1], loader[2] / 2]
        lines.append(
            f"{prepare_cells(r)} {r['prepare_as_is']['shard_bytes'] / r['source_bytes']:.3f} | "
            f"{per_process[0]:,.0f} / {per_process[1]:,.0f}, {per_process[0] / bare:.2f}x / {per_process[1] / bare:.2f}x |")
    lines += ["", "## End to end (2 workers x 1 CPU, 64 px crops, small CNN width 8)", "",
              "| N | method | wall s | driver MB | worker MB | fold task MB | index actor MB |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:,.0f}"
    for r in rows:
        for e in r["end_to_end"]:
            lines.append(f"| {r['n']:,} | {e['method']} | {e['wall_s']:,.0f} | {fmt(e['driver_peak_rss_mb'])} | "
                         f"{fmt(e['worker_peak_rss_mb'])} | {fmt(e['fold_task_peak_rss_mb'])} | "
                         f"{fmt(e['index_actor_peak_rss_mb'])} |")
    keys = list(results["extrapolated"][0]["memory_mb"])
    lines += ["", "## Extrapolated: peak RSS MB through log N - linear in N, from the smallest and largest N", "",
              "Two sizes fit both; rss_breakdown.py's four sizes (5k-320k) found the training workers' growth "
              "slowing towards log N and the fold tasks' staying linear (findings.md, \"Memory and the allocator\"). "
              "Superseded by scale_extrapolation.md: three sizes, after eval_batch_size, the trims and a process per "
              "fold task.",
              "", "| dataset | N | prepare h on 16 cores | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for e in results["extrapolated"]:
        memory = e["memory_mb"]
        lines.append(f"| {e['dataset']} | {e['n']:,} | {e['prepare_hours_16_cores']:.2f} | "
                     + " | ".join(f"{memory[k]['log_n']:,.0f} - {memory[k]['linear']:,.0f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000])
    parser.add_argument("--work", type=Path, default=Path("runs/scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale")
    parser.add_argument("--prepare-only", action="store_true", help="the bare loop and the two prepares only")
    parser.add_argument("--render", action="store_true", help="rewrite OUT.md (and OUT.json's extrapolation) from "
                                                              "OUT.json's measurements; nothing is run")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.out.with_suffix(".json").read_text())
        for row in results["rows"]:   # JSON made the loader's process counts strings
            row["loader_images_per_s"] = {int(k): v for k, v in row["loader_images_per_s"].items()}
        results["extrapolated"] = extrapolate(results["rows"])
        write_report(args.out, results, markdown(results))
        return
    log = lambda line: print(line, flush=True)
    rows = [measure(n, args.work, log, args.prepare_only) for n in args.sizes]
    flag = " --prepare-only" if args.prepare_only else ""
    results = {"command": f"python benchmarks/scale.py{flag} --sizes {' '.join(map(str, args.sizes))}",
               "machine": platform.processor() or platform.machine(), "rows": rows}
    if not args.prepare_only:
        results["extrapolated"] = extrapolate(rows)
    text = prepare_markdown(results) if args.prepare_only else markdown(results)
    write_report(args.out, results, text)
    print(text)


if __name__ == "__main__":
    main()
