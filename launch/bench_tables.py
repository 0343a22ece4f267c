"""The benchmark report's numbers and markdown: mean +- std over seeds, recovery ratio, detection, cost."""

from __future__ import annotations

import statistics
from collections import Counter


def _done(cells: dict, **match) -> list[dict]:
    return [c for c in cells.values() if c["status"] == "done" and all(c[k] == v for k, v in match.items())]


def mean_std(values: list[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for one seed); None for no values."""
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def recovery(acc: float, ce: float, clean: float) -> float | None:
    """R = (acc - acc_CE) / (acc_clean - acc_CE): the share of the noise damage a method undoes."""
    return (acc - ce) / (clean - ce) if clean > ce else None


def main_phase(records: list[dict]) -> list[dict]:
    """The epochs of the method's own phase (MixNN after warm-up and Mixup; all epochs for one-phase methods)."""
    return [r for r in records if r.get("phase") == records[-1].get("phase")]


def step_rate(cell: dict) -> float:
    """Median training samples/s per worker over the main phase (no evaluation, no per-epoch pass)."""
    return statistics.median(r["samples_per_s_per_worker"] for r in main_phase(cell["records"]))


def stage_share(cell: dict, keys: tuple[str, ...]) -> float:
    """Share of the summed epoch wall time spent in the given per-epoch stages."""
    records = cell["records"]
    return sum(r.get(k, 0.0) for r in records for k in keys) / sum(r["epoch_time_s"] for r in records)


def summary_rows(results: dict) -> list[dict]:
    """One row per (setting, method): accuracies over seeds, R against the same seeds' CE and clean bound."""
    cells = results["cells"]
    clean = {c["seed"]: c["summary"]["test_acc"] for c in _done(cells, group="clean")}
    rows = []
    for setting in results["settings"]:
        ce = {c["seed"]: c for c in _done(cells, group="matrix", setting=setting, method="ce")}
        for method in results["methods"]:
            group = [c for c in cells.values() if c["group"] == "matrix" and c["setting"] == setting
                     and c["method"] == method]
            if not group:
                continue
            done = [c for c in group if c["status"] == "done"]
            row = {"setting": setting, "method": method, "seeds": sorted(c["seed"] for c in done),
                   "failed": [(c["seed"], c["error"]) for c in group if c["status"] == "failed"],
                   "not_run": sum(c["status"] == "not run" for c in group)}
            if done:
                s = [c["summary"] for c in done]
                row["headline"] = mean_std([x["test_acc"] for x in s])
                row["last"] = mean_std([x["test_acc_last"] for x in s])
                row["best_test"] = mean_std([x["test_acc_best_test"] for x in s])
                row["f1"] = mean_std([x["detection"]["f1"] for x in s if "detection" in x])
                row["given_f1"] = mean_std([x["given_label_detection"]["f1"] for x in s if "given_label_detection" in x])
                row["corrected"] = mean_std([x["corrected_label_acc"] for x in s if "corrected_label_acc" in x])
                row["wall_vs_ce"] = mean_std([c["summary"]["wall_time_s"] / ce[c["seed"]]["summary"]["wall_time_s"]
                                              for c in done if c["seed"] in ce])
                paired = [c for c in done if c["seed"] in ce and c["seed"] in clean]
                row["recovery"] = recovery(
                    statistics.fmean(c["summary"]["test_acc"] for c in paired),
                    statistics.fmean(ce[c["seed"]]["summary"]["test_acc"] for c in paired),
                    statistics.fmean(clean[c["seed"]] for c in paired)) if paired else None
            rows.append(row)
    return rows


def cost_rows(results: dict, cells: list[dict]) -> list[dict]:
    """Per cell: training-step speed against the CE cell of the same setting and seed, and stage shares."""
    ce_rate = {(c["group"], c["setting"], c["seed"], c["summary"]["workers"]): step_rate(c)
               for c in _done(results["cells"]) if c["summary"]["method"] == "ce"}
    rows = []
    for c in cells:
        if c["status"] != "done":
            continue
        rate, stages = step_rate(c), c["summary"].get("stage_times_s", {})
        base = ce_rate.get((c["group"], c["setting"], c["seed"], c["summary"]["workers"]))
        rows.append({"cell": c["id"], "method": c["summary"]["method"],
                     "workers": c["summary"]["workers"], "rate": rate, "step_vs_ce": base / rate if base else None,
                     "epoch_s": statistics.median(r["epoch_time_s"] for r in c["records"]),
                     "pass_share": stage_share(c, ("pass_s", "gmm_s")), "index_share": stage_share(c, ("index_s",)),
                     "index_split": _index_split(c["records"]),
                     "folds_s": stages.get("folds"), "wall_s": c["summary"]["wall_time_s"]})
    return rows


def _index_split(records: list[dict]) -> tuple[float, float] | None:
    """Seconds the index actor spent rebuilding and querying; None where no epoch recorded them (no index, or
    a cell trained before the actor reported them)."""
    if not any("index_refresh_s" in r for r in records):
        return None
    return sum(r.get("index_refresh_s", 0.0) for r in records), sum(r.get("index_query_s", 0.0) for r in records)


def _code_versions(cells: list[dict]) -> str:
    counts = Counter(cell.get("code", "unrecorded") for cell in cells)
    return ", ".join(f"{code}: {n}" for code, n in sorted(counts.items())) or "none"


def _ms(value: tuple[float, float] | None, digits: int = 4, seeds: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}" if seeds > 1 else f"{value[0]:.{digits}f}"


def _opt(value: float | tuple[float, ...] | None, fmt: str) -> str:
    """The value (a tuple as `a / b`) in `fmt`, or - where it is missing."""
    if value is None:
        return "-"
    return " / ".join(format(v, fmt) for v in value) if isinstance(value, tuple) else format(value, fmt)


def markdown(results: dict, plots: list[str]) -> str:
    cells, base = results["cells"], results["base"]
    done = _done(cells)
    total = len(cells)
    compute_h = sum(c["summary"]["wall_time_s"] for c in done) / 3600
    out = [f"# Benchmark: {results['name']}", "",
           f"Regenerate with `{results['command']}` from the repository root (finished cells are reused; "
           "a cell whose config changed reruns). "
           f"Code at commit {results.get('commit') or 'unknown'}.", "",
           f"Budget, the same for every cell: model {base.get('model')} width {base.get('width')}, "
           f"{base.get('epochs')} epochs, batch {base.get('batch_size')}, lr {base.get('lr')} {base.get('schedule', '')}, "
           f"{base.get('num_workers', 1)} worker(s) x {base.get('cpus_per_worker')} CPUs. "
           f"Cells finished: {len(done)} of {total}; their training runs took {compute_h:.2f} h of wall time in all. "
           f"Code that trained them (digest of the training sources: cells): {_code_versions(done)}.", "",
           "Headline = test accuracy at the epoch with the best accuracy on the NOISY validation split (never on "
           "test). Best test is the best epoch on test, shown only to expose how much test-selection would inflate "
           "the table. R = (acc - acc_CE) / (acc_clean - acc_CE) on the means over the same seeds. F1: the method's "
           "noisy-label flag (SelectMix: out-of-fold disagreement; GMM methods: clean probability < 0.5) against "
           "the true noisy set; given-label F1 (GMM methods, cells trained since it was recorded): the flag of "
           "label_issues.csv, a given label whose target moved away or whose clean probability is < 0.5. Wall vs CE: "
           "end-to-end wall time of the run over CE's with the same data and seed (SelectMix includes its folds).", ""]
    clean = mean_std([c["summary"]["test_acc"] for c in _done(cells, group="clean")])
    seeds = len(_done(cells, group="clean"))
    out += [f"Clean bound (CE on the true labels): {_ms(clean, seeds=seeds)} over {seeds} seed(s).", "",
            "| setting | method | seeds | headline | last epoch | best test (not a selection rule) | R | "
            "flag F1 | given-label F1 | corrected-label acc | wall vs CE |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    failures = []
    for row in summary_rows(results):
        n = len(row["seeds"])
        failures += [f"- {row['setting']}/{row['method']}/seed{seed}: {error}" for seed, error in row["failed"]]
        if not n:
            status = "failed" if row["failed"] else "not run"
            out.append(f"| {row['setting']} | {row['method']} | 0 | {status} | | | | | | | |")
            continue
        out.append(f"| {row['setting']} | {row['method']} | {n} | {_ms(row['headline'], seeds=n)} | "
                   f"{_ms(row['last'], seeds=n)} | {_ms(row['best_test'], seeds=n)} | {_opt(row['recovery'], '.2f')} | "
                   f"{_ms(row['f1'], 3, n)} | {_ms(row['given_f1'], 3, n)} | {_ms(row['corrected'], 3, n)} | {_ms(row['wall_vs_ce'], 2, n)}{'x' if row['wall_vs_ce'] else ''} |")
    out.append("")
    if failures:
        out += ["## Failed cells", "", *failures, ""]
    curve = results["curves"]
    chosen = [dict(c, id=c["method"]) for c in cells.values() if c["group"] == "matrix"
              and c["setting"] == curve["setting"] and c["seed"] == curve["seed"]]
    out += _cost_table(f"## Cost at {curve['setting']}, seed {curve['seed']}", cost_rows(results, chosen))
    throughput = [dict(c, id=key.split("/")[1]) for key, c in cells.items() if c["group"] == "throughput"]
    if throughput:
        out += _cost_table("## Throughput (2-epoch cells; step rate over each method's main phase)",
                           cost_rows(results, throughput))
    if plots:
        out += ["## Plots", "", *[f"![{name}]({name})" for name in plots], ""]
    return "\n".join(out)


def _cost_table(title: str, rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [title, "", "Step rate: median training samples/s per worker over the method's main phase (no "
             "evaluation, no per-epoch pass). Step vs CE: CE's rate over this one, same data and worker count. "
             "Pass share: exact loss/embedding pass + GMM, index share: FAISS refresh + neighbour queries, both as "
             "a share of the summed epoch wall time; inside the actor, the seconds spent rebuilding the index and "
             "querying it (the rest of the index share is moving embeddings and the table between processes; - where "
             "the cell has no index or did not record them).", "",
             "| cell | workers | samples/s per worker | step vs CE | median epoch s | pass share | index share | "
             "index refresh / query s | folds s | run wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['workers']} | {r['rate']:,.0f} | {_opt(r['step_vs_ce'], '.2f')}"
                     f"{'x' if r['step_vs_ce'] else ''} | "
                     f"{r['epoch_s']:.1f} | {r['pass_share']:.1%} | {r['index_share']:.1%} | "
                     f"{_opt(r['index_split'], '.2f')} | {_opt(r['folds_s'], '.0f')} | "
                     f"{r['wall_s']:.0f} |")
    return lines + [""]
