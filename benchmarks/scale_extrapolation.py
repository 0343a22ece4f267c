"""Every process's peak memory at Clothing1M's and WebVision's sizes, extrapolated from the end-to-end runs that
rss_breakdown.py measured, and a prepare's hours on 16 cores at the per-core rate scale.py measured.

Per run (method, N) and process role, the high-water MB of the role's processes (their mean, and the largest) is
what is fitted. Two models are fitted to all the sizes by least squares: through log N (a fixed growth per
doubling) and linear in N (a fixed growth per sample). With three or more sizes each model's residual says which
the measurements follow; with two both fit exactly and the range between them is all that can be said. Memory
that is per-sample state by design (the out-of-fold table, 4C bytes per sample in a file-backed map) is listed
beside it from its formula, not fitted. Nothing is run: the inputs are committed results.

    python benchmarks/scale_extrapolation.py [--runs RSS_BREAKDOWN.json ...] [--prepare SCALE_PREPARE.json]
        [--out benchmarks/results/scale_extrapolation]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_support.reports import write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"clothing1m": (1_000_000, 14), "webvision": (2_400_000, 1000)}
ROLES = ("driver", "training worker", "fold task", "index actor", "train controller")
CORES = 16
FOLDS = 5   # SelectMix's default K
RESNET50_DIM = 2048   # its embedding's width


def role_peaks(runs: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """{(method, role): {N: {"mean": MB, "max": MB, "count": processes}}} of the runs' high-water marks."""
    peaks: dict[tuple[str, str], dict[int, dict]] = {}
    for run in runs:
        for role, processes in run["roles"].items():
            if role in ROLES:
                hwm = [p["Hwm"] for p in processes]
                peaks.setdefault((run["method"], role), {})[run["n"]] = {
                    "mean": statistics.fmean(hwm), "max": max(hwm), "count": len(hwm)}
    return peaks


def fit(sizes: list[int], values: list[float], model: str) -> tuple[np.ndarray, float]:
    """(slope, intercept) of `model` ("log_n" or "linear") fitted by least squares, and its residual RMS in MB."""
    x = np.log(sizes) if model == "log_n" else np.asarray(sizes, dtype=float)
    coefficients = np.polyfit(x, values, 1)
    residual = float(np.sqrt(np.mean((np.polyval(coefficients, x) - np.asarray(values)) ** 2)))
    return coefficients, residual


def predict(coefficients: np.ndarray, n: int, model: str) -> float:
    return float(np.polyval(coefficients, np.log(n) if model == "log_n" else n))


def extrapolate(peaks: dict[tuple[str, str], dict[int, dict]]) -> list[dict]:
    """One row per (method, role) with at least two sizes: what was measured, each model's residual, and each
    model's MB at every target size (of the mean process, and of the largest)."""
    rows = []
    for (method, role), by_n in sorted(peaks.items()):
        sizes = sorted(by_n)
        if len(sizes) < 2:
            continue
        row = {"method": method, "role": role, "sizes": sizes, "measured": [by_n[n] for n in sizes], "models": {}}
        for model in ("log_n", "linear"):
            mean_fit, residual = fit(sizes, [by_n[n]["mean"] for n in sizes], model)
            max_fit, _ = fit(sizes, [by_n[n]["max"] for n in sizes], model)
            row["models"][model] = {"residual_mb": residual, "per_doubling_or_sample": float(mean_fit[0]),
                                    "targets": {name: {"mean": predict(mean_fit, n, model),
                                                       "max": predict(max_fit, n, model)}
                                                for name, (n, _) in TARGETS.items()}}
        rows.append(row)
    return rows


def prepare_hours(prepare: dict) -> dict:
    """Hours to prepare each target on CORES cores at the median per-core rate of the largest measured prepare."""
    largest = max(prepare["rows"], key=lambda r: r["n"])
    rate = statistics.median(p["images_per_s_per_core"] for p in largest["prepare"])
    return {"images_per_s_per_core": rate, "measured_n": largest["n"],
            "hours": {name: n / (rate * CORES) / 3600 for name, (n, _) in TARGETS.items()}}


def out_of_fold_table_mb() -> dict[str, float]:
    """The out-of-fold table at each target: N x C float32 (a file-backed map on the driver, its pages page cache)."""
    return {name: n * classes * 4 / 2**20 for name, (n, classes) in TARGETS.items()}


def markdown(results: dict) -> str:
    names = list(TARGETS)
    lines = ["# Every process's peak memory at Clothing1M and WebVision, extrapolated", "",
             "From the end-to-end runs rss_breakdown.py measured (one run per N: 2 workers x 1 CPU, 64 px crops, "
             "small CNN width 8; each process's kernel high-water mark), fitted over all measured sizes through "
             "log N and linear in N by least squares. MB of the role's mean process (of its largest in brackets). "
             "The residual is each fit's RMS error over the measured sizes: with two sizes both fit exactly (0) and "
             "only the range is known.", "",
             "| method | process | measured: N -> mean MB (processes) | fit | residual MB | growth | "
             + " | ".join(f"{name} ({TARGETS[name][0]:,}) MB" for name in names) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(names)]
    for row in results["rows"]:
        measured = ", ".join(f"{n // 1000}k -> {m['mean']:,.0f} ({m['count']})"
                             for n, m in zip(row["sizes"], row["measured"]))
        for model, label in (("log_n", "log N"), ("linear", "linear")):
            fitted = row["models"][model]
            growth = (f"{fitted['per_doubling_or_sample'] * np.log(2):+,.0f} MB per doubling" if model == "log_n"
                      else f"{fitted['per_doubling_or_sample'] * 2**20:+,.0f} B per sample")
            cells = " | ".join(f"{fitted['targets'][name]['mean']:,.0f} ({fitted['targets'][name]['max']:,.0f})"
                               for name in names)
            lines.append(f"| {row['method']} | {row['role']} | {measured if model == 'log_n' else ''} | {label} | "
                         f"{fitted['residual_mb']:,.0f} | {growth} | {cells} |")
    prep, table = results["prepare"], results["out_of_fold_table_mb"]
    lines += ["", "Per-sample state by design, from its formula (the runs above had 14 classes, where it is small): "
              "SelectMix's and CrossMix's out-of-fold table, N x C float32, a file-backed map on the driver (page "
              "cache, not its heap; selection_memory.md): " + ", ".join(f"{name} {table[name]:,.0f} MB" for name in names)
              + f"; each of the K = {FOLDS} fold tasks returns its held-out share of it (1/K) through the object store: "
              + ", ".join(f"{name} {table[name] / FOLDS:,.0f} MB" for name in names) + ". MixNN's index actor "
              f"holds the N x d float32 embeddings through a refresh's fill and lookups, then N x d bytes "
              f"(ivf_sq8); at ResNet-50's d = {RESNET50_DIM}: " + ", ".join(
                  f"{name} {TARGETS[name][0] * RESNET50_DIM * 4 / 2**20:,.0f} MB, then "
                  f"{TARGETS[name][0] * RESNET50_DIM / 2**20:,.0f} MB" for name in names) + ".", "",
              f"Prepare on {CORES} cores at {prep['images_per_s_per_core']:,.0f} images/s per core (the median of "
              f"the two prepares at N = {prep['measured_n']:,}, synthetic 200-500 px JPEGs stored at 256 px): "
              + ", ".join(f"{name} {prep['hours'][name]:.2f} h" for name in names)
              + ". Real photographs larger than these decode slower; the rate scales with decoded pixels.", "",
              "Inputs: " + ", ".join(results["inputs"]) + ".", "", "Command:", "", f"    {results['command']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+",
                        default=[RESULTS / "rss_breakdown_fresh_fold.json", RESULTS / "rss_breakdown_fresh_fold_80k.json",
                                 RESULTS / "rss_breakdown_mixnn_trim.json"])
    parser.add_argument("--prepare", type=Path, default=RESULTS / "scale_prepare.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale_extrapolation")
    args = parser.parse_args()
    runs = [row for path in args.runs for row in json.loads(path.read_text())["rows"]]
    results = {"command": shlex.join(["python", "benchmarks/scale_extrapolation.py", *sys.argv[1:]]),
               "inputs": [str(p.resolve().relative_to(ROOT)) if p.resolve().is_relative_to(ROOT) else str(p)
                          for p in [*args.runs, args.prepare]],
               "rows": extrapolate(role_peaks(runs)),
               "prepare": prepare_hours(json.loads(args.prepare.read_text())),
               "out_of_fold_table_mb": out_of_fold_table_mb()}
    write_report(args.out, results, markdown(results))
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
