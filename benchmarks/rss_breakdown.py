"""What a process's peak RSS is made of: scale.py's end-to-end SelectMix run (or MixNN's) at several N, with every
process of the run's tree sampled from /proc/PID/status every few tenths of a second. ru_maxrss, which the
run's summary reports, counts anonymous memory (the process's own), file pages it maps (libraries) and shared
memory it maps (Ray's object store) alike; this splits the peak into the three, per process role (the title Ray
gives its processes), so that what grows with N can be told apart from pages of the object store.

    python benchmarks/rss_breakdown.py [--sizes 20000 80000] [--work /work/scale] [--method selectmix]
        [--out benchmarks/results/rss_breakdown]

Needs scale.py's prepared folders (WORK/data-N-w2) and synthetic sets (WORK/synth-N). Each run is a fresh
`noisymix train` process with its own Ray, as in scale.py. The runs' processes get glibc's thresholds from
`heap_mmap_threshold_kb` (--heap-kb; 0: glibc's MALLOC_* variables of this environment, which the report's command
line shows, or glibc's defaults). An allocator preloaded in this environment (LD_PRELOAD=.../libjemalloc.so.2)
reaches every process of the run; the report names each process's allocator.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_support.reports import write_report  # noqa: E402
from scale import END_TO_END_KEYS, END_TO_END_METHODS, list_keys  # noqa: E402  (scale.py's end_to_end run)

ROOT = Path(__file__).resolve().parents[1]
ROLES = {"driver": "driver", "ray::RayTrainWorker": "training worker", "ray::_run": "fold task",
         "ray::NeighbourIndex": "index actor", "ray::TrainController": "train controller", "raylet": "raylet",
         "ray::IDLE": "idle Ray worker"}
FIELDS = {"VmRSS": "Rss", "RssAnon": "RssAnon", "RssFile": "RssFile", "RssShmem": "RssShmem", "VmHWM": "Hwm"}


def descendants(root: int) -> list[int]:
    """The pids under root (root included), from /proc's parent links."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier and pid not in tree]
        tree.update(frontier)
    return sorted(tree)


def role(pid: int) -> str:
    """The process's title: Ray renames its workers `ray::Class.method` or `ray::task`; others by program."""
    words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    if "noisymix.launch.cli" in words:
        return "driver"
    return Path(words[1] if words[0].endswith("python") and len(words) > 1 else words[0]).name


def memory(pid: int) -> dict[str, float]:
    """The resident set of /proc/PID/status, split (anonymous, file, shared memory), and its high-water mark
    (what ru_maxrss reports), in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in FIELDS:
            out[FIELDS[key]] = int(rest.split()[0]) / 1024
    return out


def allocator(pid: int) -> str:
    """jemalloc or tcmalloc where the process maps one (LD_PRELOAD), else glibc's malloc."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return next((name for name in ("jemalloc", "tcmalloc") if f"lib{name}" in maps), "glibc")


class Sampler(threading.Thread):
    """Every `period` seconds, each process of root's tree: its largest Rss seen, the split at that moment, and its last high-water mark."""

    def __init__(self, root: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.period, self.peaks, self.done = root, period, {}, threading.Event()
        self.allocators: dict[int, str] = {}   # read once per process: preloaded as it starts

    def run(self) -> None:
        while not self.done.is_set():
            for pid in descendants(self.root):
                try:
                    title, fields = role(pid), memory(pid)
                    if pid not in self.allocators:
                        self.allocators[pid] = allocator(pid)
                    if fields.get("Rss", -1) > self.peaks.get(pid, {}).get("Rss", -1):
                        self.peaks[pid] = {**fields, "title": title, "allocator": self.allocators[pid]}
                except (OSError, ValueError):
                    continue
                if "Rss" not in fields:
                    continue
                self.peaks[pid]["Hwm"] = fields["Hwm"]
            self.done.wait(self.period)


def measure(n: int, work: Path, method: str, heap_kb: int | None = None) -> dict:
    """One end-to-end run at N; per role (ROLES), every process of it with its peak and split."""
    source, run_dir = work / f"synth-{n}", work / f"rss-{n}-{method}"
    command = [sys.executable, "-m", "noisymix.launch.cli", "train", *list_keys(source, work / f"data-{n}-w2"),
               f"run_dir={run_dir}", *END_TO_END_KEYS, *END_TO_END_METHODS[method],
               *([] if heap_kb is None else [f"heap_mmap_threshold_kb={heap_kb}"])]
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    started = time.perf_counter()
    process = subprocess.Popen(command)
    sampler = Sampler(process.pid)
    sampler.start()
    if process.wait():
        raise SystemExit(f"the run at N={n} failed (exit {process.returncode}): {shlex.join(command)}")
    sampler.done.set()
    sampler.join()
    roles: dict[str, list] = {}
    for pid, fields in sampler.peaks.items():
        name = next((label for prefix, label in ROLES.items() if fields["title"].startswith(prefix)), None)
        if name:
            roles.setdefault(name, []).append({**fields, "pid": pid})
    return {"n": n, "method": method, "wall_s": time.perf_counter() - started, "command": shlex.join(command),
            "roles": dict(sorted(roles.items()))}


def markdown(results: dict) -> str:
    lines = ["# What each process's peak RSS is made of", "",
             f"Command: `{results['command']}`. Machine: {results['machine']}. Each row: one process of the run, "
             "named by its role (Ray's title for it at its peak), with its largest sampled RSS (/proc/PID/status "
             "every 0.2 s, so a peak between two samples is missed; the kernel's high-water mark, which "
             "ru_maxrss reports, beside it) and how that RSS split at that moment: anonymous (the process's own memory), "
             "file-backed (libraries and files it maps), shared memory (Ray's object store pages it maps). "
             "ru_maxrss counts all three.", "",
             "| N | method | role | high-water MB | sampled peak RSS MB | anonymous MB | file MB | shared (object "
             "store) MB | allocator |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        for name in ROLES.values():
            for f in sorted(row["roles"].get(name, []), key=lambda f: -f["Hwm"]):
                lines.append(f"| {row['n']:,} | {row['method']} | {name} | {f['Hwm']:.0f} | {f['Rss']:.0f} | "
                             f"{f['RssAnon']:.0f} | {f['RssFile']:.0f} | {f['RssShmem']:.0f} | "
                             f"{f.get('allocator', 'glibc')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000])
    parser.add_argument("--work", type=Path, default=Path("runs/scale"))
    parser.add_argument("--method", choices=sorted(END_TO_END_METHODS), default="selectmix")
    parser.add_argument("--heap-kb", type=int, help="the runs' heap_mmap_threshold_kb (default: the config's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rss_breakdown")
    args = parser.parse_args()
    rows = [measure(n, args.work, args.method, args.heap_kb) for n in args.sizes]
    allocator = "".join(f"{k}={v} " for k, v in sorted(os.environ.items())
                        if k.startswith("MALLOC_") or k == "LD_PRELOAD")
    heap = "" if args.heap_kb is None else f" --heap-kb {args.heap_kb}"
    results = {"command": f"{allocator}python benchmarks/rss_breakdown.py --sizes {' '.join(map(str, args.sizes))} "
                          f"--method {args.method}{heap}", "machine": platform.processor() or platform.machine(),
               "rows": rows}
    text = markdown(results)
    write_report(args.out, results, text)
    print(text)


if __name__ == "__main__":
    main()
