"""`noisymix train`: prepare the data if needed, run the Ray Train job, write the run directory."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from noisymix.distributed import shards
from noisymix.distributed.runner import run_trainer, start_ray
from noisymix.distributed.worker import CHECKPOINT_FILE
from noisymix.launch.config import Config, ConfigError
from noisymix.launch.prepare import prepare
from noisymix.launch.report import Progress, summarize, write_json_atomic


def _claim_run_dir(path: Path) -> Path:
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"run_dir {path} already holds a run; choose another run_dir")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _export_model(checkpoint, target: Path) -> None:
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            shutil.copyfile(Path(directory) / CHECKPOINT_FILE, target)


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

        loop_config = {"config": config.to_dict(), "manifest": manifest, "data_dir": str(Path(data_dir).resolve())}
        result = run_trainer(SimpleNamespace(**config.to_dict()), loop_config, run_dir, on_message)

    if audit:
        np.savez(run_dir / "audit_ids.npz", **{f"epoch{e}_rank{r}": ids for (e, r), ids in sorted(audit.items())})
    best = result.best_checkpoints[0][0] if result.best_checkpoints else None
    _export_model(best, run_dir / "model_best.pt")
    _export_model(result.checkpoint, run_dir / "model_last.pt")
    records = [history[epoch] for epoch in sorted(history)]
    summary = summarize(records, config.to_dict(), manifest, time.perf_counter() - started)
    summary["run_dir"] = str(run_dir)
    write_json_atomic(run_dir / "summary.json", summary)
    return summary
