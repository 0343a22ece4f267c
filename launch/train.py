"""`noisymix train`: prepare the data if needed, run the Ray Train job, write the run directory."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from noisymix.distributed import shards
from noisymix.distributed.folds import Selection, load_split, selection_stage
from noisymix.distributed.runner import run_trainer, start_ray
from noisymix.distributed.worker import CHECKPOINT_FILE
from noisymix.launch.config import Config, ConfigError
from noisymix.launch.prepare import prepare
from noisymix.launch.report import Progress, summarize, write_json_atomic
from noisymix.selection.detection import selection_report
from noisymix.selection.mismatch import MixingTable


def _claim_run_dir(path: Path) -> Path:
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"run_dir {path} already holds a run; choose another run_dir")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _export_model(checkpoint, target: Path) -> None:
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            shutil.copyfile(Path(directory) / CHECKPOINT_FILE, target)


def write_label_issues(path: Path, given: np.ndarray, table: MixingTable) -> None:
    """id, given label, suggested label, confidences, flagged: the least trusted given labels first."""
    ids = np.arange(len(given))
    given_prob = table.probs[ids, given]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "given_label", "suggested_label", "confidence", "given_label_prob", "flagged"])
        for i in np.argsort(given_prob, kind="stable"):
            writer.writerow([int(i), int(given[i]), int(table.predicted[i]), f"{table.confidence[i]:.4f}",
                             f"{given_prob[i]:.4f}", int(table.uncertain[i])])


def _run_selection(config: Config, manifest: dict, data_dir: str, run_dir: Path, log) -> Selection:
    """SelectMix's fold stage; writes oof.npz and label_issues.csv before the main training starts."""
    log(f"selection: {config.folds} folds x {config.fold_epochs} epochs as Ray tasks")
    selection = selection_stage(config, manifest, data_dir)
    table = selection.table
    np.savez(run_dir / "oof.npz", probs=table.probs, given=selection.given, fold=selection.fold_of,
             predicted=table.predicted, confidence=table.confidence, uncertain=table.uncertain)
    write_label_issues(run_dir / "label_issues.csv", selection.given, table)
    log(f"selection: {int(table.uncertain.sum())} of {len(table.uncertain)} samples flagged "
        f"({table.uncertain.mean():.1%}) in {selection.seconds:.1f}s"
        + (f"; classes with no trusted sample use every sample predicted as them: {table.fallback_classes}"
           if table.fallback_classes else ""))
    return selection


def train(config: Config, log=print) -> dict:
    """Run one training job end to end and return its summary (also written to summary.json)."""
    started = time.perf_counter()
    data_dir = prepare(config, log=log)
    manifest = shards.load_manifest(data_dir)
    shards.check_shards(data_dir, manifest)
    if config.method == "clean" and not manifest["has_true_labels"]:
        raise ConfigError(f"method=clean trains on true labels, and {data_dir} has none (real-noise dataset)")
    for split in ("train", "val", "test"):
        count = len(manifest["splits"][split]["shards"])
        if count < config.num_workers:
            raise ConfigError(f"the {split} split of {data_dir} has {count} shards for num_workers={config.num_workers}; "
                              "prepare with a larger num_shards")

    run_dir = _claim_run_dir(Path(config.run_dir))
    config.save(run_dir / "config.yaml")
    log(f"run {run_dir}: method={config.method} dataset={manifest['dataset']} epochs={config.epochs} "
        f"workers={config.num_workers}")

    start_ray(config.ray_address, config.ray_logs)
    loop_config = {"config": config.to_dict(), "manifest": manifest, "data_dir": str(Path(data_dir).resolve())}
    stage_times: dict[str, float] = {}
    selection = None
    if config.method == "selectmix":
        selection = _run_selection(config, manifest, loop_config["data_dir"], run_dir, log)
        stage_times["folds"] = selection.seconds
        loop_config["selectmix"] = {"table": selection.table_ref, "images": selection.images_ref}
    progress = Progress(config.epochs, log)
    history: dict[int, dict] = {}
    audit: dict[tuple[int, int], np.ndarray] = {}
    with open(run_dir / "metrics.jsonl", "a") as metrics_file:
        def on_message(message: dict) -> None:
            kind = message.pop("kind")
            if kind == "epoch":
                history[message["epoch"]] = message
                metrics_file.write(json.dumps(message) + "\n")
                metrics_file.flush()
                progress.epoch(message)
            elif kind == "ids":
                audit[(message["epoch"], message["rank"])] = message["ids"]

        training_started = time.perf_counter()
        result = run_trainer(SimpleNamespace(**config.to_dict()), loop_config, run_dir, on_message)

    if audit:
        np.savez(run_dir / "audit_ids.npz", **{f"epoch{e}_rank{r}": ids for (e, r), ids in sorted(audit.items())})
    best = result.best_checkpoints[0][0] if result.best_checkpoints else None
    _export_model(best, run_dir / "model_best.pt")
    _export_model(result.checkpoint, run_dir / "model_last.pt")
    records = [history[epoch] for epoch in sorted(history)]
    summary = summarize(records, config.to_dict(), manifest, time.perf_counter() - started)
    stage_times["main_training"] = time.perf_counter() - training_started
    summary["stage_times_s"] = stage_times
    if selection is not None and manifest["has_true_labels"]:
        # True labels are read here, after training, for evaluation only.
        _, _, true = load_split(loop_config["data_dir"], manifest, label_key=shards.TRUE_LABEL)
        table = selection.table
        summary["detection"] = selection_report(table.uncertain, table.predicted, table.probs, selection.given, true)
    summary["run_dir"] = str(run_dir)
    write_json_atomic(run_dir / "summary.json", summary)
    return summary
