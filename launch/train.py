"""`noisymix train`: prepare the data if needed, run the Ray Train job, write the run directory."""

from __future__ import annotations

import csv
import json
import shutil
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import ray

from noisymix.distributed import shards
from noisymix.distributed.folds import Selection, load_labels, load_split, selection_stage
from noisymix.distributed.runner import run_trainer, start_ray
from noisymix.distributed.worker import CHECKPOINT_FILE, load_state
from noisymix.launch.config import Config, ConfigError
from noisymix.launch.prepare import prepare
from noisymix.launch.report import Progress, summarize, write_json_atomic
from noisymix.selection.crossval import given_label_probability, load_out_of_fold
from noisymix.selection.detection import detection_metrics, selection_report
from noisymix.selection.gmm import given_label_verdict, out_of_fold_clean_probability


def _claim_run_dir(path: Path) -> Path:
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"run_dir {path} already holds a run; choose another run_dir")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _export_model(checkpoint, target: Path) -> None:
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            shutil.copyfile(Path(directory) / CHECKPOINT_FILE, target)


def write_label_issues(path: Path, columns: dict[str, np.ndarray], trust: str) -> None:
    """One row per train id, the least trusted given labels first (ascending `trust` column)."""
    names = ["id", *columns]
    values = [np.arange(len(columns[trust])), *columns.values()]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        for i in np.argsort(columns[trust], kind="stable"):
            writer.writerow([f"{v[i]:.4f}" if np.issubdtype(v.dtype, np.floating) else int(v[i]) for v in values])


class RunRecorder:
    """Takes the workers' records: epoch metrics (metrics.jsonl, progress), per-sample state (scored
    against true labels when the driver has them), and the id/state audits of the tests."""

    def __init__(self, run_dir: Path, config: Config, true_labels: np.ndarray | None, log):
        self.run_dir, self.threshold, self.true = run_dir, config.gmm_threshold, true_labels
        self.progress = Progress(config.epochs, log)
        self.history: dict[int, dict] = {}
        self.state_metrics: dict[int, dict] = {}
        self.last_state: dict | None = None
        self.last_verdict: tuple[np.ndarray, np.ndarray] | None = None  # (flagged, trust) of last_state
        self.audit: dict[tuple[int, int], np.ndarray] = {}
        self.digests: list[dict] = []
        self.metrics_file = open(run_dir / "metrics.jsonl", "a")

    def on_message(self, message: dict) -> None:
        kind = message.pop("kind")
        if kind == "epoch":
            message.update(self.state_metrics.get(message["epoch"], {}))
            self.history[message["epoch"]] = message
            self.metrics_file.write(json.dumps(message) + "\n")
            self.metrics_file.flush()
            self.progress.epoch(message)
        elif kind == "state":
            flagged, trust = given_label_verdict(message["given"], message["corrected"], message["clean"],
                                                 self.threshold)
            self.last_state, self.last_verdict = message, (flagged, trust)
            if self.true is not None:
                clean = message["clean"]
                self.state_metrics[message["epoch"]] = {
                    "corrected_label_acc": float(np.mean(message["corrected"] == self.true)),
                    "detection": detection_metrics(clean < self.threshold, 1.0 - clean, message["given"], self.true),
                    "given_label_detection": detection_metrics(flagged, 1.0 - trust, message["given"], self.true),
                }
        elif kind == "ids":
            self.audit[(message["epoch"], message["rank"])] = message["ids"]
        elif kind == "state_digest":
            self.digests.append(message)

    def records(self) -> list[dict]:
        """One record per epoch; an epoch re-run after a worker failure keeps its last copy."""
        return [self.history[epoch] for epoch in sorted(self.history)]

    def close(self) -> None:
        self.metrics_file.close()
        if self.digests:
            (self.run_dir / "state_digests.json").write_text(json.dumps(self.digests, indent=1))
        if self.audit:
            np.savez(self.run_dir / "audit_ids.npz",
                     **{f"epoch{e}_rank{r}": ids for (e, r), ids in sorted(self.audit.items())})


def _select(config: Config, manifest: dict, data_dir: str, run_dir: Path, true_labels: np.ndarray | None, log,
            epoch: int = 0, previous: Selection | None = None, init_state: dict | None = None) -> tuple[Selection, dict]:
    """One SelectMix selection round: folds, table, oof.npz and label_issues.csv (the latest round's)."""
    reused = previous is None and bool(config.oof_from)
    if reused:
        log(f"selection at epoch {epoch}: out-of-fold probabilities of {config.oof_from} (no fold training)")
    else:
        start = "fresh models" if init_state is None else f"the main model of epoch {epoch}"
        log(f"selection at epoch {epoch}: {config.folds} folds x {config.fold_epochs} epochs from {start}, as Ray "
            f"tasks (predictions of the {config.fold_select} fold epoch)")
    selection = selection_stage(config, manifest, data_dir, previous, init_state)
    table, given = selection.table, selection.given
    np.savez(run_dir / "oof.npz", probs=table.probs, given=given, fold=selection.fold_of,
             predicted=table.predicted, confidence=table.confidence, uncertain=table.uncertain)
    write_label_issues(run_dir / "label_issues.csv", {
        "given_label": given, "suggested_label": table.predicted, "confidence": table.confidence,
        "given_label_prob": given_label_probability(table.probs, given), "flagged": table.uncertain.astype(np.int64),
    }, trust="given_label_prob")
    log(f"selection: {int(table.uncertain.sum())} of {len(table.uncertain)} samples flagged "
        f"({table.uncertain.mean():.1%}) in {selection.seconds:.1f}s; fold epochs kept: "
        f"{[run['kept_epoch'] for run in selection.fold_runs]}"
        + (f"; classes with no trusted sample use every sample predicted as them: {table.fallback_classes}"
           if table.fallback_classes else ""))
    round_info = {"epoch": epoch, "seconds": selection.seconds, "flagged": int(table.uncertain.sum()),
                  "folds": selection.fold_runs}
    if reused:
        round_info["oof_from"] = config.oof_from
    if true_labels is not None:
        round_info["detection"] = selection_report(table.uncertain, table.predicted, table.probs, given, true_labels)
    return selection, round_info


def _preflight(config: Config, log) -> tuple[str, dict]:
    """Prepare (or reuse) the data and refuse what cannot run, before any run directory exists."""
    data_dir = prepare(config, log=log)
    manifest = shards.load_manifest(data_dir)
    shards.check_shards(data_dir, manifest)
    if config.method == "clean" and not manifest["has_true_labels"]:
        raise ConfigError(f"method=clean trains on true labels, and {data_dir} has none (real-noise dataset)")
    for key, methods in (("oof_from", ("selectmix",)), ("clean_from", ("mixnn", "gmm_select"))):
        path = getattr(config, key)
        if config.method in methods and path and not Path(path).is_file():
            raise ConfigError(f"{key}={path} is not a file (an oof.npz of an earlier SelectMix run)")
    for split in ("train", "val", "test"):
        count = len(manifest["splits"][split]["shards"])
        if count < config.num_workers:
            raise ConfigError(f"the {split} split of {data_dir} has {count} shards for num_workers={config.num_workers}; "
                              "prepare with a larger num_shards")
    return str(Path(data_dir).resolve()), manifest


def _clean_from(config: Config, data_dir: str, manifest: dict, log) -> np.ndarray:
    """`clean_from`: w_i from B1's GMM on an earlier run's out-of-fold losses, checked against this data's labels."""
    given = load_labels(data_dir, manifest)
    probs = load_out_of_fold(config.clean_from, given, manifest["num_classes"])[0]
    fit = out_of_fold_clean_probability(probs, given, max_iter=config.gmm_max_iter, tol=config.gmm_tol,
                                        reg_covar=config.gmm_reg_covar, seed=config.seed)
    if fit.degenerate:
        log(f"clean probabilities: the out-of-fold losses of {config.clean_from} do not separate "
            f"({fit.reason}); every sample is trusted")
    log(f"clean probabilities: a GMM on the out-of-fold losses -log P[i, y_i] of {config.clean_from}, in place "
        f"of the training-loss GMM on every epoch ({int(np.sum(fit.w < config.gmm_threshold))} of {len(fit.w)} "
        f"below gmm_threshold={config.gmm_threshold})")
    return fit.w


def _segment_ends(config: Config) -> list[int]:
    """Main training runs in one segment, or in segments of reselect_every epochs with a selection between."""
    if config.method != "selectmix" or config.reselect_every <= 0:
        return [config.epochs]
    return [*range(config.reselect_every, config.epochs, config.reselect_every), config.epochs]


def _model_weights(checkpoint) -> dict:
    with checkpoint.as_directory() as directory:
        return load_state(Path(directory) / CHECKPOINT_FILE)["model"]


def train(config: Config, log=print) -> dict:
    """Run one training job end to end and return its summary (also written to summary.json)."""
    started = time.perf_counter()
    data_dir, manifest = _preflight(config, log)
    fixed_clean = None
    if config.method in ("mixnn", "gmm_select") and config.clean_from:
        fixed_clean = _clean_from(config, data_dir, manifest, log)
    run_dir = _claim_run_dir(Path(config.run_dir))
    config.save(run_dir / "config.yaml")
    log(f"run {run_dir}: method={config.method} dataset={manifest['dataset']} epochs={config.epochs} "
        f"workers={config.num_workers}")
    start_ray(config.ray_address, config.ray_logs)

    true_labels = None
    if manifest["has_true_labels"] and config.method in ("selectmix", "mixnn", "gmm_select"):
        # Read for evaluating the selection only; it stays on the driver and never reaches a worker.
        true_labels = load_labels(data_dir, manifest, label_key=shards.TRUE_LABEL)
    loop_config = {"config": config.to_dict(), "manifest": manifest, "data_dir": data_dir}
    stage_times = {"main_training": 0.0}
    selection, rounds = None, []
    if config.method == "selectmix":
        selection, info = _select(config, manifest, data_dir, run_dir, true_labels, log)
        rounds.append(info)
        loop_config.update(selectmix_table=selection.table_ref, train_images=selection.images_ref)
    if config.method in ("mixnn", "gmm_select"):
        loop_config["index_name"] = f"noisymix-index-{uuid.uuid4().hex[:8]}"
        if fixed_clean is not None:
            loop_config["fixed_clean"] = ray.put(fixed_clean)
        if config.method == "mixnn" and config.neighbour_source == "global":
            loop_config["train_images"] = ray.put(load_split(data_dir, manifest)[1])

    recorder = RunRecorder(run_dir, config, true_labels, log)
    name = f"train-{uuid.uuid4().hex[:8]}"  # unique per run; segments of this run share it and resume
    try:
        for stop in _segment_ends(config):
            loop_config["stop_epoch"] = stop
            segment_started = time.perf_counter()
            result = run_trainer(SimpleNamespace(**config.to_dict()), loop_config, run_dir, recorder.on_message, name)
            stage_times["main_training"] += time.perf_counter() - segment_started
            if stop < config.epochs:
                selection, info = _select(config, manifest, data_dir, run_dir, true_labels, log, stop, selection,
                                          _model_weights(result.checkpoint))
                rounds.append(info)
                loop_config["selectmix_table"] = selection.table_ref
    finally:
        recorder.close()

    best = result.best_checkpoints[0][0] if result.best_checkpoints else None
    _export_model(best, run_dir / "model_best.pt")
    _export_model(result.checkpoint, run_dir / "model_last.pt")
    records = recorder.records()
    summary = summarize(records, config.to_dict(), manifest, time.perf_counter() - started)
    if rounds:
        stage_times["folds"] = sum(r["seconds"] for r in rounds)
        summary["selections"] = rounds
        if "detection" in rounds[-1]:
            summary["detection"] = rounds[-1]["detection"]
    if recorder.last_state is not None:
        last = recorder.last_state
        for key, stage in (("pass_s", "loss_pass"), ("gmm_s", "gmm"), ("index_s", "index")):
            stage_times[stage] = sum(record.get(key, 0.0) for record in records)
        flagged, trust = recorder.last_verdict
        write_label_issues(run_dir / "label_issues.csv", {
            "given_label": last["given"], "corrected_label": last["corrected"], "clean_probability": last["clean"],
            "given_label_trust": trust, "flagged": flagged.astype(np.int64),
        }, trust="given_label_trust")
        summary.update(recorder.state_metrics.get(last["epoch"], {}))
    summary["stage_times_s"] = stage_times
    summary["run_dir"] = str(run_dir)
    write_json_atomic(run_dir / "summary.json", summary)
    return summary
