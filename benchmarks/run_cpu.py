"""CPU seconds of one short training run, per process: where the fixed cost of a Ray Train run goes.

The slow test tier is ~50 short Ray Train runs on 2 cores, each dominated by starting processes that import
Ray, torch and this package, not by training. This runs `noisymix train` (CE, digits, 2 epochs) against a local
Ray started here, samples every process's CPU time from /proc while it runs, and reports the CPU seconds of
each process of that Ray and of the driver, grouped by title (ray::TrainController, ...); processes of another
Ray on the machine are not counted. CPU seconds, unlike wall time, hardly move when the machine is shared.
`--python` runs other checkouts' interpreters (a venv's noisymix), so commits are measured side by side:

    python benchmarks/run_cpu.py [--python /path/to/venv/bin/python ...] [--repeats 2]

Writes benchmarks/results/run_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def processes() -> dict[int, tuple[float, int, str]]:
    """(user + system CPU seconds, parent pid, title) of every process now."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            title = Path(f"/proc/{name}/cmdline").read_text().replace("\0", " ").strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        found[int(name)] = ((int(fields[11]) + int(fields[12])) / TICKS, int(fields[1]),
                            title or stat.split("(")[1].split(")")[0])
    return found


def ours(pid: int, seen: dict, roots: set[int]) -> bool:
    """Whether `pid` is one of `roots` or descends from one (another Ray on the machine is not counted)."""
    while pid in seen and pid not in roots:
        pid = seen[pid][1]
    return pid in roots


def group(title: str) -> str:
    """A process's role: its Ray actor class, the noisymix driver, or Ray's own daemons."""
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]
    if "noisymix" in title:
        return "noisymix driver"
    return "Ray daemons and other processes"


def measured_run(python: str, data_dir: str, head: subprocess.Popen, address: str,
                 run_dir: str) -> tuple[dict[str, float], float]:
    """CPU seconds per role of one `noisymix train` run, and its wall seconds: the driver, and every process of
    the local Ray that `head` started (its daemons, and the workers and actors its raylet starts)."""
    before, seen = processes(), {}
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
    started = time.perf_counter()
    run = subprocess.Popen([python, "-m", "noisymix.launch.cli", "train", f"data_dir={data_dir}", "num_shards=4",
                            "method=ce", "epochs=2", f"run_dir={run_dir}"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    while run.poll() is None:
        for pid, (cpu, parent, title) in processes().items():
            # A Ray worker starts as a long command line and then titles itself ray::ACTOR; an exiting process's
            # command line reads empty and /proc's short name for it is cut at 15 characters: keep the best title.
            best = max(title, seen.get(pid, (0, 0, ""))[2], key=lambda t: (t.startswith("ray::"), len(t)))
            seen[pid] = (cpu, parent, best)
        time.sleep(0.1)
    wall = time.perf_counter() - started
    if run.returncode:
        raise SystemExit(f"the run failed: {run.stderr.read()[-2000:]}")
    roles: dict[str, float] = defaultdict(float)
    for pid, (cpu, _, title) in seen.items():
        used = cpu - before[pid][0] if pid in before else cpu
        if used > 0 and ours(pid, seen, {run.pid, head.pid}):
            roles[group(title)] += used
    return dict(roles), wall


# A local Ray owned by one process (another Ray on the machine is left alone): its address on stdout, and it
# shuts down when its stdin closes.
HEAD = ("import sys, ray; ray.init(num_cpus=2, include_dashboard=False, logging_level='ERROR'); "
        "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read(); ray.shutdown()")


def measure(python: str, repeats: int) -> dict:
    """Start a local Ray with `python` (its workers run `python`'s noisymix), prepare digits, measure `repeats`
    runs after one left out (the first run on a fresh cluster also starts Ray's one-off actors), stop the Ray."""
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
        subprocess.run([python, "-m", "noisymix.launch.cli", "prepare", f"data_dir={work}/data", "num_shards=4"],
                       env=env, check=True, capture_output=True)
        head = subprocess.Popen([python, "-c", HEAD], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        try:
            address = head.stdout.readline().strip()
            measured_run(python, f"{work}/data", head, address, f"{work}/warm")
            runs = [measured_run(python, f"{work}/data", head, address, f"{work}/run{i}") for i in range(repeats)]
        finally:
            head.stdin.close()
            head.wait(timeout=120)
    roles = sorted({role for cpu, _ in runs for role in cpu})
    return {"python": python, "runs": repeats,
            "cpu_s": {role: statistics.median(cpu.get(role, 0.0) for cpu, _ in runs) for role in roles},
            "total_cpu_s": statistics.median(sum(cpu.values()) for cpu, _ in runs),
            "wall_s": statistics.median(wall for _, wall in runs)}


def markdown(results: list[dict]) -> str:
    roles = sorted({role for r in results for role in r["cpu_s"]}, key=lambda role: -results[-1]["cpu_s"].get(role, 0))
    head = "| process | " + " | ".join(r["python"] for r in results) + " |"
    lines = ["# CPU seconds of one 2-epoch CE run on digits, per process (median of the runs)", "",
             "`python benchmarks/run_cpu.py` on " + platform.node() + f", {os.cpu_count()} cores. Every column ran "
             "against its own local Ray head, one after the other in one invocation.", "", head,
             "|---|" + "---:|" * len(results)]
    for role in roles:
        lines.append(f"| {role} | " + " | ".join(f"{r['cpu_s'].get(role, 0.0):.1f}" for r in results) + " |")
    lines.append("| **total CPU s** | " + " | ".join(f"{r['total_cpu_s']:.1f}" for r in results) + " |")
    lines.append("| wall s | " + " | ".join(f"{r['wall_s']:.1f}" for r in results) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", nargs="+", default=[sys.executable], help="interpreters whose noisymix to run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "run_cpu"))
    args = parser.parse_args()
    results = [measure(python, args.repeats) for python in args.python]
    Path(args.out + ".json").write_text(json.dumps(results, indent=2) + "\n")
    Path(args.out + ".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
