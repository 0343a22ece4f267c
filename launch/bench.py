"""`noisymix bench SPEC.yaml`: run every cell of a spec as a normal training run, reuse finished cells
whose config is unchanged, and write the report (tables, plots) from the cells' own files."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import subprocess
import time
import traceback
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve

from noisymix.distributed import shards, storage
from noisymix.distributed.artifacts import CONFIG, RunDir, write_json_atomic
from noisymix.launch.bench_spec import Cell, Spec, same_computation
from noisymix.launch.config import Config
from noisymix.selection.report import NOISE_SCORE

CELL_FILE = "cell.json"
PR_POINTS = 100


def code_digest(root: Path | None = None) -> str:
    """Digest of the noisymix sources that train a cell (the bench's own modules left out); recorded per cell,
    not part of its key, so a table that mixes code versions says so."""
    root = root or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.glob("*/*.py")):
        if path.parent.name in ("selection", "mixing", "distributed", "launch") and not path.name.startswith("bench"):
            digest.update(f"{path.parent.name}/{path.name}".encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def cell_dir(work: Path | str, cell: Cell) -> str:
    """The cell's folder under the work dir (a folder or an object-store URL)."""
    return storage.join(work, "cells", cell.dirname)


def read_cell(work: Path | str, cell: Cell) -> dict | None:
    path = storage.join(cell_dir(work, cell), CELL_FILE)
    return json.loads(storage.read_bytes(path)) if storage.is_file(path) else None


def is_cached(work: Path, cell: Cell) -> bool:
    """A cell is reused when it finished and was run with the config it would run with now."""
    record = read_cell(work, cell)
    return record is not None and record["status"] == "done" and same_computation(record["config"], cell.config(work))


def detector_curve(run: RunDir, config: Config) -> dict | None:
    """Precision-recall of the method's per-sample noise score (label_issues.csv) against "the given label is
    wrong"; None where the method has no score or the data no true labels."""
    if not config.method.reports_labels:
        return None
    manifest = shards.load_manifest(config.data.data_dir)
    if not manifest["has_true_labels"]:
        return None
    true = shards.load_labels(config.data.data_dir, manifest, label_key=shards.TRUE_LABEL)
    issues = run.label_issues()
    noisy, suspicion = issues["given_label"] != true, issues[NOISE_SCORE]
    precision, recall, _ = precision_recall_curve(noisy, suspicion)
    keep = np.unique(np.linspace(0, len(precision) - 1, PR_POINTS).astype(int))
    return {"detector": f"{config.method.name}: {config.method.detector}",
            "average_precision": float(average_precision_score(noisy, suspicion)),
            "precision": precision[keep].round(4).tolist(), "recall": recall[keep].round(4).tolist()}


def run_cell(work: Path, cell: Cell, log) -> dict:
    """Train one cell, then record its summary, epochs and detector curve. A cell whose run was interrupted
    (or finished just before its record was written) with the same config continues; any other leftover of
    the cell is removed first."""
    from noisymix.launch.train import train

    directory = cell_dir(work, cell)
    config = cell.config(work)
    run = RunDir(config.run.run_dir)
    if not resumable(run, config):
        storage.delete_tree(directory)
    record = {"id": cell.id, "code": code_digest(), "config": config.to_dict(),
              "started": time.time()}
    try:
        summary = run.summary() or train(config, log=lambda line: log(f"[{cell.id}] {line}"))
        record.update(status="done", summary=summary, records=run.metrics(), detector_curve=detector_curve(run, config))
    except Exception as exc:  # noqa: BLE001 - a failed cell is reported in the table; the other cells still run
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                      traceback=traceback.format_exc())
        log(f"[{cell.id}] FAILED: {record['error']}")
    storage.write_bytes(storage.join(directory, CELL_FILE), json.dumps(record, indent=2).encode())
    return record


def resumable(run: RunDir, config) -> bool:
    """The cell's run directory holds a run of this very config (unfinished, or finished without its record)."""
    from noisymix.launch.config import changed_settings

    return (run.status() is not None and run.exists(CONFIG)
            and not changed_settings(run.config_values(), config))


def select_cells(spec: Spec, only: list[str] | None) -> list[Cell]:
    return [c for c in spec.cells if not only or any(fnmatch.fnmatch(c.id, pattern) for pattern in only)]


def run_spec(spec: Spec, work: Path, only: list[str] | None = None, log=print) -> dict:
    """Run the cells that are not cached (in spec order); returns counts of what happened. The first cell's
    train() starts or joins Ray (its ray_address) and later cells reuse that session."""
    chosen = select_cells(spec, only)
    todo = [c for c in chosen if not is_cached(work, c)]
    log(f"bench {spec.name}: {len(chosen)} cells chosen, {len(chosen) - len(todo)} cached, {len(todo)} to run")
    failed = 0
    for number, cell in enumerate(todo, 1):
        log(f"bench {spec.name}: cell {number}/{len(todo)} {cell.id}")
        try:
            failed += run_cell(work, cell, log)["status"] == "failed"
        except KeyboardInterrupt as exc:
            raise KeyboardInterrupt(f"interrupted in cell {cell.id}; the same bench command resumes it and runs the "
                                    "cells after it") from exc
    return {"chosen": len(chosen), "ran": len(todo), "failed": failed}


def gather(spec: Spec, work: Path) -> dict:
    """Every cell's record as it stands (a cell whose config changed since it ran counts as not run)."""
    cells = {}
    for cell in spec.cells:
        record = read_cell(work, cell)
        if record is not None and not same_computation(record["config"], cell.config(work)):
            record = None
        cells[cell.id] = {"group": cell.group, "setting": cell.setting, "method": cell.method, "seed": cell.seed,
                          **({"status": "not run"} if record is None else
                             {k: v for k, v in record.items() if k not in ("config", "traceback")})}
    return {"name": spec.name, "settings": spec.settings, "methods": spec.methods, "curves": spec.curves,
            "base": spec.base, "commit": _commit(), "cells": cells}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_report(results: dict, out: Path, command: str) -> list[Path]:
    """<name>.json, <name>.md and the plots next to them."""
    from noisymix.launch.bench_plots import write_plots
    from noisymix.launch.bench_tables import markdown

    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "command": command}
    plots = write_plots(results, out)
    write_json_atomic(out / f"{results['name']}.json", results)
    (out / f"{results['name']}.md").write_text(markdown(results, [p.name for p in plots]))
    return [out / f"{results['name']}.json", out / f"{results['name']}.md", *plots]
