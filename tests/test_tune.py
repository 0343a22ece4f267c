"""`noisymix tune` end to end through Ray Tune on digits: ASHA stops trials, SelectMix trials that differ only in
mixing knobs share one fold stage, the outputs a user reads, resume after the driver is killed, and a search
whose choices do not move when the test labels are poisoned."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from ray.util.state import list_placement_groups

from conftest import kill_one_worker_after_second_epoch
from noisymix.distributed import shards
from noisymix.distributed.shards import GIVEN_LABEL, TRUE_LABEL
from noisymix.launch.config import build_config
from noisymix.launch.sweep import run_sweep
from noisymix.launch.tune_spec import parse_sweep


def rows(sweep_dir) -> list[dict]:
    with open(Path(sweep_dir) / "trials.csv") as fh:
        return list(csv.DictReader(fh))


def test_a_sweep_stops_bad_trials_early_and_shares_fold_stages(ray_session, digits_dir, tmp_path):
    spec = parse_sweep({
        # Two at a time: the two trials of one learning rate start together, one trains the folds, the other waits.
        "name": "share", "sweep_dir": str(tmp_path / "sweep"), "max_concurrent": 2,
        "base": {"data_dir": str(digits_dir), "method": "selectmix", "epochs": 3, "num_shards": 4, "folds": 2,
                 "fold_epochs": 1},
        "space": {"lr": {"grid": [0.05, 0.00001]}, "alpha": {"grid": [0.5, 2.0]}},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}, "num_samples": 1})
    lines = []
    report = run_sweep(spec, log=lines.append)
    table = rows(spec.sweep_dir)
    assert len(table) == 4 and all(row["status"] in ("finished", "stopped early") for row in table), table
    # ASHA stops the trials that do not learn; of the two that do, at least the better one runs to the end.
    assert all(row["status"] == "stopped early" for row in table if float(row["lr"]) == 0.00001), table
    assert any(row["status"] == "finished" for row in table if float(row["lr"]) == 0.05), table
    # One fold stage per learning rate (the folds read it), each used by both alpha trials.
    stages = {lr: {row["fold_stage"] for row in table if float(row["lr"]) == lr} for lr in (0.05, 0.00001)}
    assert all(len(keys) == 1 and "" not in keys for keys in stages.values()) and stages[0.05] != stages[0.00001]
    assert report["fold_stages"]["stages_run"] == 2 and report["fold_stages"]["trials_using_one"] == 4
    assert report["fold_stages"]["seconds_saved"] > 0
    for row in table:
        log = (Path(spec.sweep_dir) / "trials" / row["trial"] / "log.txt").read_text()
        assert "(no fold training)" in log   # the trial read the shared table
    assert sum("fold stage:" in (Path(spec.sweep_dir) / "trials" / r["trial"] / "log.txt").read_text()
               for r in table) == 2
    # The outputs: a config `noisymix train` takes as it is, the report and its plots; a line per ended trial.
    best = yaml.safe_load((Path(spec.sweep_dir) / "best.yaml").read_text())
    assert best["lr"] == 0.05 and "oof_from" not in best and "run_dir" not in best
    build_config(overrides=best)
    text = (Path(spec.sweep_dir) / "sweep.md").read_text()
    assert "NOISY validation" in text and "fold stages: 2 ran, used by 4 trials" in text
    assert all((Path(spec.sweep_dir) / name).is_file() for name in ("val_vs_test.png", "best_curves.png"))
    assert sum(line.startswith("trial ") for line in lines) == 4


def test_a_trial_that_loses_a_worker_is_retried_by_tune_and_leaves_no_placement_group(ray_session, digits_dir,
                                                                                         tmp_path):
    """A trial's Ray Train run has no retries of its own (a Tune-stopped trial would otherwise start a recovery
    group nobody removes): Tune retries the trial, which resumes its run from the checkpoint."""
    spec = parse_sweep({
        "name": "retry", "sweep_dir": str(tmp_path / "sweep"), "max_concurrent": 1, "scheduler": "fifo",
        "base": {"data_dir": str(digits_dir), "method": "ce", "epochs": 5, "num_shards": 4, "num_workers": 2,
                 "cpus_per_worker": 1, "max_failures": 1},
        "space": {"lr": {"grid": [0.05]}}})
    done = threading.Event()
    killer = threading.Thread(target=kill_one_worker_after_second_epoch, daemon=True,
                              args=(spec.sweep_dir, done, "trials/*/run/metrics.jsonl"))
    killer.start()
    try:
        run_sweep(spec, log=lambda line: None)
    finally:
        done.set()
    [row] = rows(spec.sweep_dir)
    assert row["status"] == "finished" and row["retries"] == "1", row
    run = Path(spec.sweep_dir) / "trials" / row["trial"] / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["max_failures"] == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["epoch"] for r in records}) == list(range(5))
    assert any(r["resumed_from_epoch"] for r in records), "the retried trial resumed its run from a checkpoint"
    address = ray_session.get_runtime_context().gcs_address
    assert list_placement_groups(address=address, filters=[("state", "=", "CREATED")]) == []


def poison_test_labels(data_dir: Path, into: Path, classes: int = 10) -> Path:
    """A copy of a prepared dataset whose test split says (label + 1) mod C for every sample, manifest
    checksums updated: what the test accuracy reads becomes wrong, nothing else changes."""
    shutil.copytree(data_dir, into)
    manifest = json.loads((into / shards.MANIFEST).read_text())
    for entry in manifest["splits"]["test"]["shards"]:
        path = into / entry["name"]
        with tarfile.open(path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        samples: dict[str, dict] = {}
        for name, data in members:
            key, _, member = name.partition(".")
            if member in (GIVEN_LABEL, TRUE_LABEL):
                data = b"%d" % ((int(data) + 1) % classes)
            samples.setdefault(key, {"__key__": key})[member] = data
        member = shards.image_member(manifest)
        info, _ = shards.write_shard(path, samples.values(), member)
        entry.update(bytes=info["bytes"], sha256=info["sha256"])
    for split in manifest["splits"].values():   # what reads labels scans the poisoned shards, not a labels file
        (into / split.pop("labels")["name"]).unlink()
    (into / shards.MANIFEST).write_text(json.dumps(manifest))
    (into / shards.VERIFIED).unlink(missing_ok=True)
    return into


def test_the_search_never_reads_test_labels(ray_session, digits_dir, tmp_path):
    """Through Optuna's sampler (seeded): poisoned test labels change neither the trials it proposes, nor ASHA's
    stops, nor the choice."""
    poisoned = poison_test_labels(Path(digits_dir), tmp_path / "poisoned-data")
    chosen = {}
    for name, data in (("clean", digits_dir), ("poisoned", poisoned)):
        spec = parse_sweep({
            "name": name, "sweep_dir": str(tmp_path / name), "max_concurrent": 1, "num_samples": 2,
            "search": "optuna", "seed": 0,
            # One CPU per worker: the trials never wait on a CPU another test's Ray Train run still holds.
            "base": {"data_dir": str(data), "method": "ce", "epochs": 2, "num_shards": 4, "cpus_per_worker": 1},
            "space": {"lr": {"loguniform": [0.00001, 0.1]}},
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}})
        report = run_sweep(spec, log=lambda line: None)
        table = rows(spec.sweep_dir)
        best = next(r for r in table if r["trial"] == report["best"])
        chosen[name] = ([(r["lr"], r["status"], r["epochs_run"], r["best_val_acc"]) for r in table],
                        (best["lr"], best["best_val_acc"]), [float(r["test_acc_at_best_val"]) for r in table])
    assert len(chosen["clean"][0]) == 2 and len({row[0] for row in chosen["clean"][0]}) == 2, chosen
    assert chosen["clean"][0] == chosen["poisoned"][0], "same trials, same stops, same objective values"
    assert chosen["clean"][1] == chosen["poisoned"][1], "same choice"
    assert chosen["clean"][2] != chosen["poisoned"][2], "the poison reached the test accuracy the report shows"


@pytest.mark.slow
def test_a_sweep_whose_driver_is_killed_resumes_without_repeating_finished_trials(digits_dir, tmp_path):
    spec_path = tmp_path / "sweep.yaml"
    sweep_dir = tmp_path / "sweep"
    spec_path.write_text(yaml.safe_dump({
        "name": "resume", "sweep_dir": str(sweep_dir), "max_concurrent": 1, "scheduler": "fifo",
        "base": {"data_dir": str(digits_dir), "method": "ce", "epochs": 2, "num_shards": 4},
        # The second trial raises (no such weights file): listed as failed, with why.
        "space": {"pretrained": {"grid": [None, "missing.pt"]}}}))
    command = [sys.executable, "-m", "noisymix.launch.cli", "tune", str(spec_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              cwd=tmp_path, start_new_session=True)
    deadline, seen = time.time() + 300, []
    for line in driver.stdout:
        seen.append(line)
        if line.startswith("trial 1/2"):
            break
        assert time.time() < deadline, "".join(seen)
    os.killpg(driver.pid, signal.SIGKILL)   # the driver and the Ray it started, without a goodbye
    driver.wait(timeout=60)
    first = list((sweep_dir / "trials").glob("*/run/summary.json"))
    assert len(first) >= 1, "".join(seen)
    stamps = {p: p.stat().st_mtime_ns for p in first}
    again = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming the sweep" in again.stdout
    [trained, failed] = sorted(rows(sweep_dir), key=lambda row: row["pretrained"])
    assert trained["pretrained"] == "" and trained["status"] == "finished", trained
    assert failed["status"] == "failed" and "cannot read pretrained weights" in failed["why_stopped"], failed
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items()), "a finished trial was not retrained"
