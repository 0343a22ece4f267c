"""A sweep's outputs, from its trials' own run directories: trials.csv, best.yaml (a config `noisymix train`
takes as it is), sweep.md with the plots, and the cost figures (fold stages shared, trial-epochs ASHA saved).
Test accuracy appears here only: the search never read it."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import yaml
from scipy.stats import spearmanr

from noisymix.distributed import storage
from noisymix.distributed.artifacts import OUT_OF_FOLD, RunDir
from noisymix.launch.config import build_config
from noisymix.launch.sweep import FOLDS, STAGE_FILE, TRIAL_FILE, TRIALS
from noisymix.launch.tracking import plot_curves
from noisymix.launch.tune_spec import SHARED_FOLDS, SweepSpec, with_table_placeholders

TRIALS_CSV, BEST_YAML, SWEEP_MD, SWEEP_JSON = "trials.csv", "best.yaml", "sweep.md", "sweep.json"
SCATTER_PNG, CURVES_PNG = "val_vs_test.png", "best_curves.png"


def trial_row(spec: SweepSpec, trial) -> dict:
    """A trial as its run directory and Ray Tune's status tell it."""
    folder = RunDir(storage.join(spec.location, TRIALS, trial.trial_id))
    recorded = json.loads((folder / TRIAL_FILE).read_text()) if folder.exists(TRIAL_FILE) else {}
    values = recorded.get("values") or {}
    run = RunDir(folder.url("run"))
    records = run.metrics()
    target = build_config(overrides=with_table_placeholders(values)).train.epochs if values else None
    best = max(reversed(records), key=lambda r: r["val_acc"]) if records else None
    error = (run.status() or {}).get("error")
    if trial.status == "ERROR":
        status = "failed"
        why = error or (str(trial.get_error() or "").strip().splitlines() or ["error"])[-1][:300]
    elif run.summary() is not None:
        status, why = "finished", f"ran its {target} epochs"
    elif trial.status == "TERMINATED":
        status, why = "stopped early", f"{spec.scheduler['name']} stopped it after epoch {len(records)} of {target}"
    else:
        status, why = "unfinished", f"the sweep stopped while it was {trial.status.lower()}"
    fold_table = recorded.get("run_values", {}).get("oof_from") or recorded.get("run_values", {}).get("clean_from")
    method = values.get("method", "")
    row = {"trial": trial.trial_id, "method": method,
           **{d.name: _param(trial.config, d) if d.applies_to(method) else None for d in searched(spec)},
           "status": status, "epochs_run": len(records), "epochs": target,
           "best_val_acc": best["val_acc"] if best else None, "best_epoch": best["epoch"] + 1 if best else None,
           "test_acc_at_best_val": best["test_acc"] if best else None,
           "last_test_acc": records[-1]["test_acc"] if records else None,
           "wall_s": round((trial.last_result or {}).get("time_total_s", 0.0), 1), "why_stopped": why,
           "retries": trial.num_failures,   # Tune's restarts of the trial (a lost worker), each resuming its run
           "fold_stage": fold_stage(spec, fold_table) if fold_table else ""}
    return {**row, "_records": records, "_values": values}


def searched(spec: SweepSpec) -> list:
    """The dimensions shown as columns (the method has its own)."""
    return [d for d in spec.dimensions if d.key != "method"]


def fold_stage(spec: SweepSpec, table: str) -> str:
    """The fold stage (its key) whose table an oof_from/clean_from names, or "" for a table not the sweep's."""
    stages = storage.join(spec.location, FOLDS) + "/"
    key, _, name = table[len(stages):].partition("/") if table.startswith(stages) else ("", "", "")
    return key if name == OUT_OF_FOLD else ""


def _param(params: dict, dim):
    return (params.get(dim.method) or {}).get(dim.key) if dim.method else params.get(dim.key)


def fold_stages(spec: SweepSpec, rows: list[dict]) -> dict:
    """How many fold stages ran, how many trials used one, and the fold training time sharing saved."""
    stages = {}
    folds = storage.join(spec.location, FOLDS)
    for name in storage.list_files(folds):
        key, _, file = name.partition("/")
        if file == STAGE_FILE:
            stages[key] = json.loads(storage.read_bytes(storage.join(folds, name)))["seconds"]
    uses = {key: sum(row["fold_stage"] == key for row in rows) for key in stages}
    saved = sum(stages[key] * max(0, uses[key] - 1) for key in stages)
    return {"stages_run": len(stages), "trials_using_one": sum(uses.values()), "stage_seconds": stages,
            "seconds_saved": saved}


def asha_savings(rows: list[dict]) -> dict:
    ended = [row for row in rows if row["status"] in ("finished", "stopped early") and row["epochs"]]
    run, budget = sum(row["epochs_run"] for row in ended), sum(row["epochs"] for row in ended)
    return {"trial_epochs_run": run, "trial_epochs_budget": budget,
            "share_saved": 1 - run / budget if budget else 0.0}


def rank_correlation(rows: list[dict]) -> float | None:
    """Spearman's rho between the noisy validation accuracy that picks and the test accuracy it stands for."""
    pairs = [(r["best_val_acc"], r["test_acc_at_best_val"]) for r in rows if r["best_val_acc"] is not None]
    if len(pairs) < 3:
        return None
    rho = spearmanr(*zip(*pairs)).statistic
    return None if math.isnan(rho) else float(rho)


def invocation_seconds(previous: dict | None, wall_s: float) -> list[float]:
    """The wall seconds of every invocation of the sweep so far, this one last (`previous`: the sweep.json an
    earlier invocation wrote; one from before this list was kept counts as one invocation)."""
    if previous is None:
        return [wall_s]
    return [*previous.get("invocation_s", [previous["wall_s"]]), wall_s]


def choice_resolution(rows: list[dict], val_count: int) -> dict | None:
    """How finely the noisy validation split ranks the trials: the binomial standard error of the best trial's
    noisy accuracy over its `val_count` samples, and the trials within two of them of the best, a tie at that
    resolution (choosing among them is noise), with the test accuracy they span."""
    scored = [r for r in rows if r["best_val_acc"] is not None]
    if not scored or val_count < 1:
        return None
    best = max(r["best_val_acc"] for r in scored)
    error = math.sqrt(best * (1 - best) / val_count)
    tied = [r for r in scored if best - r["best_val_acc"] <= 2 * error]
    return {"val_samples": val_count, "standard_error": error, "tied_trials": len(tied),
            "tied_test_acc": [min(r["test_acc_at_best_val"] for r in tied),
                              max(r["test_acc_at_best_val"] for r in tied)]}


def best_config(spec: SweepSpec, row: dict) -> dict:
    """The chosen trial's values as `noisymix train` takes them: a table the sweep shared becomes a file path
    for clean_from, and is left out for SelectMix (which trains its own folds, as with any other seed)."""
    values = dict(row["_values"])
    if values.get("clean_from") == SHARED_FOLDS:
        values["clean_from"] = storage.join(spec.location, FOLDS, row["fold_stage"], OUT_OF_FOLD)
    return values


def write_plots(rows: list[dict], best: dict | None, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["best_val_acc"] is not None]
    figure, axes = plt.subplots(figsize=(5, 4))
    for method in sorted({r["method"] for r in scored}):
        mine = [r for r in scored if r["method"] == method]
        axes.scatter([r["best_val_acc"] for r in mine], [r["test_acc_at_best_val"] for r in mine], label=method)
    axes.set_xlabel("best noisy validation accuracy (the objective)")
    axes.set_ylabel("test accuracy at that epoch")
    if scored:
        axes.legend()
    figure.tight_layout()
    figure.savefig(folder / SCATTER_PNG, dpi=110)
    plt.close(figure)
    names = [SCATTER_PNG]
    if best is not None:
        plot_curves(best["_records"], folder / CURVES_PNG, f"best trial {best['trial']} ({best['method']})")
        names.append(CURVES_PNG)
    return names


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(spec: SweepSpec, rows: list[dict], best: dict | None, folds: dict, asha: dict, rho: float | None,
             resolution: dict | None, invocations: list[float], plots: list[str]) -> str:
    columns = ["trial", "method", *[d.name for d in searched(spec)], "status", "epochs_run", "best_val_acc",
               "test_acc_at_best_val", "wall_s", "fold_stage"]
    ranked = sorted(rows, key=lambda r: -(r["best_val_acc"] if r["best_val_acc"] is not None else -1))
    lines = [f"# Sweep {spec.name}", "",
             f"`noisymix tune` over {', '.join(spec.methods())}: {len(rows)} trials, {spec.search} search, "
             f"{spec.scheduler['name']} scheduler; chosen on **{spec.metric}, the NOISY validation accuracy**. "
             "Test accuracy is shown for the report only; the search never read it.", "",
             f"- sweep wall time: {sum(invocations):.0f} s over {len(invocations)} invocation(s) of the command "
             f"({invocations[-1]:.0f} s this one)",
             f"- fold stages: {folds['stages_run']} ran, used by {folds['trials_using_one']} trials; sharing saved "
             f"{folds['seconds_saved']:.0f} s of fold training",
             f"- trial-epochs: {asha['trial_epochs_run']} run of {asha['trial_epochs_budget']} budgeted by the ended "
             f"trials ({asha['share_saved']:.0%} saved by early stopping)",
             "- rank correlation (Spearman) of noisy validation vs test accuracy across trials: "
             + ("n/a (fewer than 3 scored trials)" if rho is None else f"{rho:.3f}")]
    if resolution is not None:
        low, high = resolution["tied_test_acc"]
        lines.append(f"- resolution of the choice: {resolution['val_samples']} noisy validation samples, standard "
                     f"error {resolution['standard_error']:.4f} at the best noisy accuracy; "
                     f"{resolution['tied_trials']} trial(s) within 2 standard errors of the best (a tie the split "
                     f"cannot break), whose test accuracy spans {low:.4f}-{high:.4f}")
    lines.append("")
    if best is not None:
        lines += [f"Best trial: `{best['trial']}` ({best['method']}), noisy val {best['best_val_acc']:.4f} at epoch "
                  f"{best['best_epoch']}, test {best['test_acc_at_best_val']:.4f}; its config is {BEST_YAML}.", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in ranked]
    lines += ["", *[f"![{name}]({name})" for name in plots], ""]
    return "\n".join(lines)


def write_sweep_report(spec: SweepSpec, grid, wall_s: float, val_count: int, log) -> dict:
    sweep = RunDir(spec.location)
    folder = sweep.path
    rows = [trial_row(spec, trial) for trial in grid._experiment_analysis.trials]
    scored = [r for r in rows if r["best_val_acc"] is not None]
    best = max(scored, key=lambda r: r["best_val_acc"]) if scored else None
    public = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    if public:
        with open(folder / TRIALS_CSV, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(public[0]))
            writer.writeheader()
            writer.writerows(public)
    if best is not None:
        (folder / BEST_YAML).write_text(yaml.safe_dump(best_config(spec, best), sort_keys=False))
    folds, asha, rho = fold_stages(spec, rows), asha_savings(rows), rank_correlation(rows)
    resolution = choice_resolution(rows, val_count)
    plots = write_plots(rows, best, folder)
    previous = json.loads((folder / SWEEP_JSON).read_text()) if (folder / SWEEP_JSON).is_file() else None
    invocations = invocation_seconds(previous, wall_s)
    (folder / SWEEP_MD).write_text(markdown(spec, rows, best, folds, asha, rho, resolution, invocations, plots))
    report = {"trials": public, "best": None if best is None else best["trial"], "fold_stages": folds,
              "asha": asha, "rank_correlation": rho, "resolution": resolution, "wall_s": wall_s,
              "invocation_s": invocations}
    (folder / SWEEP_JSON).write_text(json.dumps(report, indent=2, default=str))
    for name in (TRIALS_CSV, BEST_YAML, SWEEP_MD, SWEEP_JSON, *plots):
        if (folder / name).is_file():
            sweep.written(name)
    log(f"sweep {spec.name}: best trial {report['best']}; wrote {sweep.url(TRIALS_CSV)}, {sweep.url(BEST_YAML)}, "
        f"{sweep.url(SWEEP_MD)}")
    return report
