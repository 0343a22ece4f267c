"""Every finished cell of several bench reports of the memorising regime in one table, each row's R against the
CE and clean bound of the SAME seeds, wherever in those reports they were run (issue 21's table of every method,
issue 20's check of the sweeps' choices).

The specs share fashion_mnist_memorise.yaml's base (data subset, model, budget), so a CE or clean cell of one
spec is the reference of another's rows; a setting's CE is looked up in the listed reports in order.

    python benchmarks/memorise_table.py --out benchmarks/results/issue21_table \\
        --title "Issue 21: every method and variant of the memorising regime, one table" \\
        benchmarks/results/fashion_mnist_memorise.json benchmarks/results/flag_rules.json \\
        benchmarks/results/crossmix.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

SETTINGS = ("symmetric40", "symmetric_incl80", "instance40", "pairflip40", "asymmetric40")


def finished_cells(reports: list[dict]) -> list[dict]:
    """(spec, setting, method, seed, summary) of every finished cell, in report order."""
    cells = []
    for report in reports:
        for cell in report["cells"].values():
            if cell.get("status") == "done":
                cells.append({"spec": report["name"], "setting": cell["setting"], "method": cell["method"],
                              "seed": cell["seed"], "summary": cell["summary"]})
    return cells


def references(cells: list[dict]) -> tuple[dict, dict]:
    """CE headline per (setting, seed) and clean-bound headline per seed: the first report that has one."""
    ce, clean = {}, {}
    for cell in cells:
        if cell["method"] == "ce" and cell["setting"] != "clean":
            ce.setdefault((cell["setting"], cell["seed"]), cell["summary"]["test_acc"])
        if cell["setting"] == "clean":
            clean.setdefault(cell["seed"], cell["summary"]["test_acc"])
    return ce, clean


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def rows(cells: list[dict]) -> list[dict]:
    """One row per (setting, spec, method) over its seeds; R on the means over the seeds that have CE and clean."""
    ce, clean = references(cells)
    grouped: dict[tuple, list[dict]] = {}
    for cell in cells:
        if cell["setting"] in SETTINGS:
            grouped.setdefault((cell["setting"], cell["spec"], cell["method"]), []).append(cell)
    out = []
    for (setting, spec, method), group in grouped.items():
        seeds = sorted(c["seed"] for c in group)
        head = mean_std([c["summary"]["test_acc"] for c in group])
        last = mean_std([c["summary"]["test_acc_last"] for c in group])
        scored = [c for c in group if (setting, c["seed"]) in ce and c["seed"] in clean]
        r = None
        if scored:
            acc = statistics.mean(c["summary"]["test_acc"] for c in scored)
            base = statistics.mean(ce[setting, c["seed"]] for c in scored)
            top = statistics.mean(clean[c["seed"]] for c in scored)
            r = (acc - base) / (top - base)
        f1 = [c["summary"].get("detection", {}).get("f1") for c in group]
        out.append({"setting": setting, "spec": spec, "method": method, "seeds": seeds, "headline": head,
                    "last": last, "R": r, "R_seeds": sorted(c["seed"] for c in scored),
                    "flag_f1": statistics.mean(f1) if None not in f1 else None,
                    "wall_s": statistics.median(c["summary"]["wall_time_s"] for c in group)})
    out.sort(key=lambda row: (SETTINGS.index(row["setting"]), -row["headline"][0]))
    return out


def markdown(table: list[dict], command: str, title: str) -> str:
    def acc(pair):
        return f"{pair[0]:.4f}" + (f" ± {pair[1]:.4f}" if pair[1] else "")

    lines = [f"# {title}", "",
             "Headline = test accuracy at the best NOISY-validation epoch; R = (acc - CE) / (clean - CE) on the means "
             "over the seeds that have a CE and a clean-bound cell (R seeds); a row's seeds are its cells'. "
             "Rows are sorted by headline within a setting. Oracle rows read a perfect detector's table (a ceiling, "
             "not a method). Wall: median end-to-end seconds of the cell (rows reading an earlier table through "
             "`oof_from` leave out its fold stage).", "", f"    {command}", "",
             "| setting | spec / row | seeds | headline | last epoch | R (seeds) | flag F1 | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table:
        r = "-" if row["R"] is None else f"{row['R']:.2f} ({','.join(map(str, row['R_seeds']))})"
        f1 = "-" if row["flag_f1"] is None else f"{row['flag_f1']:.3f}"
        lines.append(f"| {row['setting']} | {row['spec']} / {row['method']} | {','.join(map(str, row['seeds']))} | "
                     f"{acc(row['headline'])} | {acc(row['last'])} | {r} | {f1} | {row['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="bench result JSONs (benchmarks/results/NAME.json)")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    parser.add_argument("--title", default="The memorising regime, one table", help="the report's heading")
    args = parser.parse_args()
    reports = [json.loads(path.read_text()) for path in args.reports]
    table = rows(finished_cells(reports))
    command = (f"python benchmarks/memorise_table.py --out {args.out} --title {shlex.quote(args.title)} "
               + " ".join(map(str, args.reports)))
    args.out.with_suffix(".md").write_text(markdown(table, command, args.title))
    args.out.with_suffix(".json").write_text(json.dumps(table, indent=2))
    print(f"wrote {args.out}.md and .json ({len(table)} rows)", file=sys.stderr)


if __name__ == "__main__":
    main()
