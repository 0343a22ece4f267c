"""The driver's memory over SelectMix's selection stage at many classes: K fold tasks (Ray tasks through
distributed.folds.ray_map) return their held-out probabilities, the driver assembles the N x C out-of-fold table
and builds the mixing table with a flag rule; each part is written to a fold cache (in a temporary directory) as
it arrives, as a run's are. The table is the fold cache's file-backed map, as a run's is (--tables file), or an
array on the heap (--tables memory, the driver before the map): both in one run, side by side. The folds are not trained: each returns a softmax of random logits for its held-out
ids, so only what the driver holds is measured, at sizes (WebVision's 1000 classes) that a trained fold stage
cannot reach on this machine.

Each (N, C, rule) runs in a fresh driver process with a local Ray of its own; a thread samples the driver's
/proc/self/status every 5 ms. Reported, above the driver's resident memory just before the folds start: the peak
of its anonymous memory (its own heap: the table and every copy of it), of anonymous plus shared memory (parts
of the object store it maps while reading a fold's result), and of file-backed memory (the mapped table's pages:
page cache, which the kernel writes back and drops under pressure), in each phase, and as multiples of the
table's bytes (4 N C). The package's commit is recorded, so runs before and after a change can sit in one report (--append).

    python benchmarks/selection_memory.py [--samples 240000] [--classes 1000] [--rules mismatch confident]
        [--tables file memory] [--append] [--out benchmarks/results/selection_memory]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_support.reports import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FOLDS = 5
FIELDS = ("RssAnon", "RssShmem", "RssFile")


def resident_mb() -> dict[str, float]:
    """RssAnon, RssShmem and RssFile of this process, in MB."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in FIELDS:
                out[key] = int(rest.split()[0]) / 1024
    return out


class PeakSampler(threading.Thread):
    """This process's peak anonymous, anonymous + shared, and file-backed memory since the last `phase()` call."""

    def __init__(self, every_s: float = 0.005):
        super().__init__(daemon=True)
        self.every_s, self.stopped = every_s, threading.Event()
        self.peak_anon = self.peak_total = self.peak_file = 0.0

    def run(self) -> None:
        while not self.stopped.is_set():
            self.record()
            time.sleep(self.every_s)

    def record(self) -> None:
        now = resident_mb()
        self.peak_anon = max(self.peak_anon, now["RssAnon"])
        self.peak_total = max(self.peak_total, now["RssAnon"] + now["RssShmem"])
        self.peak_file = max(self.peak_file, now["RssFile"])

    def phase(self) -> tuple[float, float, float]:
        """(peak anonymous, anonymous + shared, file-backed MB) since the previous call; the peaks restart from now."""
        self.record()
        peaks = self.peak_anon, self.peak_total, self.peak_file
        now = resident_mb()
        self.peak_anon, self.peak_total, self.peak_file = (now["RssAnon"], now["RssAnon"] + now["RssShmem"],
                                                           now["RssFile"])
        return peaks


class RandomFold:
    """A fold's fit_predict without training: a softmax of random logits (seeded by the fold) for its held-out ids."""

    def __init__(self, num_classes: int, seed: int = 0):
        self.num_classes, self.seed = num_classes, seed

    def __call__(self, fold):
        from noisymix.selection.crossval import FoldOutput

        rng = np.random.default_rng([self.seed, fold.index])
        logits = rng.standard_normal((len(fold.held), self.num_classes), dtype=np.float32) * 3
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        return FoldOutput(fold.held, probs, {"fold": fold.index})


def measure(samples: int, classes: int, rule: str, table: str, seed: int = 0) -> dict:
    """The driver's peaks (MB above its start) over the fold stage, the table build, and a read-back of the oof.npz
    the run writes (as a resumed run's or `oof_from`'s, checked and built again), in this process (Ray must already
    be running). With table="memory" the read-back is np.load's, onto the heap, as the driver's was before it mapped
    the file."""
    from noisymix.distributed.artifacts import read_out_of_fold, write_out_of_fold
    from noisymix.distributed.folds import FoldCache, ray_map
    from noisymix.selection.crossval import check_out_of_fold, out_of_fold_probabilities
    from noisymix.selection.mismatch import build_mixing_table

    given = np.random.default_rng(seed).integers(0, classes, samples)
    sampler = PeakSampler()
    start = resident_mb()
    base_anon, base_total, base_file = start["RssAnon"], start["RssAnon"] + start["RssShmem"], start["RssFile"]
    sampler.start()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:   # as a run's fold stage: each part written as it arrives
        cache = FoldCache(Path(directory) / "folds")
        probs, _, _ = out_of_fold_probabilities(given, FOLDS, seed, RandomFold(classes, seed),
                                                map=functools.partial(ray_map, cache=cache),
                                                allocate=cache.table if table == "file" else None)
        folds_anon, folds_total, folds_file = sampler.phase()
        folds_s = time.perf_counter() - started
        started = time.perf_counter()
        mixing = build_mixing_table(probs, given, flag_rule=rule, seed=seed)
        del probs
        build_anon, build_total, build_file = sampler.phase()
        build_s = time.perf_counter() - started
        path = Path(directory) / "oof.npz"
        write_out_of_fold(path, mixing.probs, given)
        flagged = int(mixing.uncertain.sum())
        del mixing
        cache.clear()
        sampler.phase()
        started = time.perf_counter()
        arrays = read_out_of_fold(path) if table == "file" else dict(np.load(path, allow_pickle=False))
        probs, _ = check_out_of_fold(arrays, given, classes, str(path))
        again = build_mixing_table(probs, given, flag_rule=rule, seed=seed)
        del arrays, probs
        read_anon, read_total, read_file = sampler.phase()
        read_s = time.perf_counter() - started
    sampler.stopped.set()
    table_mb = samples * classes * 4 / 2**20
    return {"samples": samples, "classes": classes, "rule": rule, "table": table, "table_mb": table_mb,
            "flagged": flagged, "flagged_again": int(again.uncertain.sum()), "folds_s": folds_s, "build_s": build_s,
            "read_s": read_s, "read_anon_mb": read_anon - base_anon, "read_file_mb": read_file - base_file,
            "folds_anon_mb": folds_anon - base_anon, "folds_total_mb": folds_total - base_total,
            "folds_file_mb": folds_file - base_file,
            "build_anon_mb": build_anon - base_anon, "build_total_mb": build_total - base_total,
            "build_file_mb": build_file - base_file}


def child(samples: int, classes: int, rule: str, table: str) -> dict:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        return measure(samples, classes, rule, table)
    finally:
        ray.shutdown()


def package_commit() -> str:
    """The commit of the package this run imported (with `+` where its tree had uncommitted changes)."""
    import noisymix.selection

    tree = Path(noisymix.selection.__path__[0]).resolve().parent
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", "selection", "distributed"],
                           capture_output=True, text=True).stdout.strip()
    return commit + ("+" if dirty else "")


def markdown(results: dict) -> str:
    lines = ["# The driver's memory over the selection stage", "",
             f"Machine: {results['machine']}. {FOLDS} fold tasks returning random softmax rows (no training); MB "
             "above the driver's resident memory before the folds; x = multiples of the N x C float32 table.", "",
             "| package commit | N | C | rule | table | table MB | folds: anon MB (x) | folds: anon + shared MB | "
             "folds: file-backed MB | table build: anon MB (x) | build: anon + shared MB | build: file-backed MB | "
             "folds s | build s | read back: anon MB (x) | read back: file-backed MB | read back s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        file_mb = ((f"{r['folds_file_mb']:,.0f}", f"{r['build_file_mb']:,.0f}") if "folds_file_mb" in r
                   else ("not measured", "not measured"))
        lines.append(f"| {r['commit']} | {r['samples']:,} | {r['classes']:,} | {r['rule']} | "
                     f"{r.get('table', 'memory')} | {r['table_mb']:,.0f} | "
                     f"{r['folds_anon_mb']:,.0f} ({r['folds_anon_mb'] / r['table_mb']:.2f}x) | "
                     f"{r['folds_total_mb']:,.0f} | {file_mb[0]} | {r['build_anon_mb']:,.0f} "
                     f"({r['build_anon_mb'] / r['table_mb']:.2f}x) | {r['build_total_mb']:,.0f} | {file_mb[1]} | "
                     f"{r['folds_s']:.1f} | {r['build_s']:.1f} | {read_back(r)} |")
    lines += ["", "Commands:", ""] + [f"    {command}" for command in results["commands"]]
    return "\n".join(lines) + "\n"


def read_back(r: dict) -> str:
    """The read-back phase's cells: anonymous MB (x the table), file-backed MB, seconds; rows before it: not run."""
    if "read_anon_mb" not in r:
        return "not run | not run | not run"
    return (f"{r['read_anon_mb']:,.0f} ({r['read_anon_mb'] / r['table_mb']:.2f}x) | {r['read_file_mb']:,.0f} | "
            f"{r['read_s']:.1f}")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        samples, classes, rule, table = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
        print(json.dumps({**child(samples, classes, rule, table), "commit": package_commit()}))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=240_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rules", nargs="+", default=["mismatch", "confident"])
    parser.add_argument("--tables", nargs="+", choices=["file", "memory"], default=["file", "memory"],
                        help="where the driver's table lives: the fold cache's file-backed map (a run's) or the heap")
    parser.add_argument("--append", action="store_true", help="add the rows to the report's JSON if it exists")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "selection_memory")
    args = parser.parse_args()
    path = args.out.with_suffix(".json")
    results = json.loads(path.read_text()) if args.append and path.exists() else {"rows": [], "commands": []}
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    results["commands"].append(shlex.join(["python", "benchmarks/selection_memory.py", *sys.argv[1:]]))
    for rule in args.rules:
        for table in args.tables:
            out = subprocess.run([sys.executable, __file__, "--child", str(args.samples), str(args.classes), rule,
                                  table], check=True, capture_output=True, text=True).stdout
            results["rows"].append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results["rows"][-1]), flush=True)
    write_report(args.out, results, markdown(results))
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
