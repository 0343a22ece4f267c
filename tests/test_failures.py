"""Failures a user or the machine causes end in one line that says what and where: the error mapping, the
resource check, the run-directory guard, stale staging; and docs/failures.md names a test for every row."""

import errno
import os
import re
import signal
import time
from pathlib import Path

import pytest
import ray

from noisymix.distributed import runner
from noisymix.distributed.artifacts import RunDir
from noisymix.launch.errors import one_line
from noisymix.launch.prepare import remove_stale_staging, staging_dir
from noisymix.launch.train import open_run
from noisymix.mixing.config import ConfigError
from noisymix.mixing.method import TaskAsk

from conftest import make_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("error, line", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/a/model_last.pt"),
     "No space left on device: /runs/a/model_last.pt"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"), "Read-only file system: /mnt/ro/run"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/x"), "Permission denied: /data/x"),
    (FloatingPointError("epoch 3: non-finite loss at steps 10-19"),
     "the run diverged: epoch 3: non-finite loss at steps 10-19"),
    (ConfigError("lr must be a finite number, got nan"), "lr must be a finite number, got nan"),
])
def test_errors_a_user_or_the_machine_causes_are_one_line(error, line):
    assert one_line(error) == line


def test_a_workers_error_is_found_inside_rays_wrappers():
    class WorkerGroupError(RuntimeError):
        def __init__(self, failures):
            super().__init__("worker group failed")
            self.worker_failures = failures

    wrapped = RuntimeError("TrainingFailedError")
    wrapped.__cause__ = WorkerGroupError({0: OSError(errno.ENOSPC, "No space left on device", "/tmp/ckpt")})
    assert one_line(wrapped) == "No space left on device: /tmp/ckpt"
    died = ray.exceptions.ActorDiedError()
    assert one_line(died).startswith("a Ray worker or task died and its retries (max_failures, fold_retries) are "
                                     "used up: ActorDiedError")


def test_a_bug_keeps_its_traceback():
    assert one_line(KeyError("x")) is None and one_line(TypeError("bad call")) is None


def test_a_request_the_cluster_cannot_place_is_refused_with_asked_and_available(monkeypatch):
    monkeypatch.setattr(runner.ray, "cluster_resources", lambda: {"CPU": 2.0})
    resources = make_config(Path("/tmp"), num_workers=3, cpus_per_worker=1).resources
    with pytest.raises(runner.ResourceError, match=r"num_workers=3 x 1 CPU needs 3 CPUs and 0 GPUs; the cluster has "
                                                   r"2 CPUs and 0 GPUs: ask for less, or set wait_for_resources=true"):
        runner.check_resources(resources, [], print)
    gpu = make_config(Path("/tmp"), num_workers=1, use_gpu=True).resources
    with pytest.raises(runner.ResourceError, match="needs 1 CPUs and 1 GPUs; the cluster has 2 CPUs and 0 GPUs"):
        runner.check_resources(gpu, [], print)
    fits = make_config(Path("/tmp"), num_workers=2, cpus_per_worker=1).resources
    with pytest.raises(runner.ResourceError, match=r"fold task needs 4 CPUs"):
        runner.check_resources(fits, [TaskAsk("fold task", 4.0)], print)
    runner.check_resources(fits, [TaskAsk("fold task", 2.0)], print)   # between segments: the workers' CPUs
    mixnn = make_config(Path("/tmp"), method="mixnn", index_gpu=True)
    with pytest.raises(runner.ResourceError, match=r"num_workers=1 x 2 CPUs with the index actor \(index_cpus=0, "
                                                   r"index_gpu=true\) needs 2 CPUs and 1 GPUs; the cluster has 2 CPUs"):
        runner.check_resources(mixnn.resources, mixnn.method.task_resources(), print)
    shared = make_config(Path("/tmp"), method="mixnn", num_workers=1, index_cpus=1)
    runner.check_resources(shared.resources, shared.method.task_resources(), print)   # the worker shares the rest
    assert runner.worker_resources(1, 0, False, reserved=1.0) == (1.0, 1)
    alongside = make_config(Path("/tmp"), method="mixnn", num_workers=2, cpus_per_worker=1, index_cpus=1)
    with pytest.raises(runner.ResourceError, match=r"num_workers=2 x 1 CPU with the index actor \(index_cpus=1, "
                                                   r"index_gpu=false\) needs 3 CPUs"):
        runner.check_resources(alongside.resources, alongside.method.task_resources(), print)
    elastic = make_config(Path("/tmp"), num_workers="2-4", num_shards=4, cpus_per_worker=1).resources
    runner.check_resources(elastic, [], print)   # the minimum fits: an elastic group starts with what there is


def test_waiting_for_resources_says_what_it_waits_for_until_the_cluster_grows(monkeypatch):
    sizes = iter([{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 4.0}])
    monkeypatch.setattr(runner.ray, "cluster_resources", lambda: next(sizes))
    resources = make_config(Path("/tmp"), num_workers=2, cpus_per_worker=1, wait_for_resources=True).resources
    lines = []
    runner.check_resources(resources, [], lines.append, poll_s=0)
    assert len(lines) == 2 and lines[0].startswith("waiting for resources: num_workers=2 x 1 CPU needs 2 CPUs")


def test_a_run_directory_is_resumed_only_with_its_own_settings(tmp_path):
    config = make_config(tmp_path, epochs=3)
    run, status = open_run(config, lambda *_: None)
    assert status is None and run.status()["state"] == "running"
    run.write_status("interrupted", "training", epoch=1)
    logs = []
    _, status = open_run(make_config(tmp_path, epochs=3, num_workers=2), logs.append)
    assert status["state"] == "interrupted" and logs == [
        f"resuming the interrupted run in {tmp_path / 'run'} (it stopped at: training)"], "resources may change"
    with pytest.raises(ConfigError, match=r"holds an unfinished run with other settings \(epochs differ\): resume it "
                                          rf"with `noisymix train resume={tmp_path / 'run'}`"):
        open_run(make_config(tmp_path, epochs=4), print)
    RunDir(tmp_path / "run").write_summary({"test_acc": 0.5})
    with pytest.raises(ConfigError, match="holds a finished run"):
        open_run(config, print)


def test_a_folder_that_is_not_a_run_is_never_written_into(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files that are not an unfinished noisymix run"):
        open_run(make_config(tmp_path), print)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]


def test_a_stale_staging_folder_of_other_settings_is_removed_and_the_current_one_kept(tmp_path):
    target = str(tmp_path / "data")
    current, stale = staging_dir(target, {"noise_rate": 0.4}), staging_dir(target, {"noise_rate": 0.2})
    for folder in (current, stale):
        folder.mkdir()
        (folder / "train-000000.tar").write_bytes(b"x")
    logs = []
    remove_stale_staging(target, current, logs.append)
    assert current.is_dir() and not stale.exists() and logs == [
        f"prepare: removed {stale}, left by an interrupted prepare with other settings"]


def test_every_row_of_docs_failures_names_a_test_that_exists():
    rows = [line for line in (ROOT / "docs" / "failures.md").read_text().splitlines()
            if line.startswith("|") and not line.startswith("|--") and not line.startswith("| Failure")]
    assert len(rows) >= 40
    for row in rows:
        cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)", row)
        assert cited, f"no test named in: {row}"
        for path, name in cited:
            assert re.search(rf"^\s*def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name} does not exist"


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_changed_byte_in_any_splits_shard_stops_train_before_anything_runs(split, digits_dir, tmp_path, capsys):
    import json
    import shutil

    from noisymix.launch.cli import main

    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    shard = json.loads((data / "manifest.json").read_text())["splits"][split]["shards"][1]["name"]
    raw = bytearray((data / shard).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (data / shard).write_bytes(bytes(raw))
    code = main(["train", f"data_dir={data}", "num_shards=4", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and err == (f"noisymix: error: shard {data / shard} fails its sha256 check: its bytes changed "
                                 "since prepare (corrupt or replaced); prepare the dataset again\n")
    assert not (tmp_path / "run").exists(), "refused before any run directory exists"


def test_summary_records_the_workers_of_every_epoch_and_each_worker_groups_start():
    from noisymix.launch.report import Progress, summarize

    def record(epoch, workers, resumed):
        return {"epoch": epoch, "workers": workers, "resumed_from_epoch": resumed, "val_acc": 0.5, "test_acc": 0.5,
                "train_loss": 1.0, "lr": 0.1, "epoch_time_s": 1.0, "train_time_s": 1.0,
                "samples_per_s_per_worker": 10.0, "peak_rss_mb_per_worker": 100.0}

    history = [record(0, 2, None), record(1, 2, None), record(2, 1, 2), record(3, 1, 2), record(4, 2, 4)]
    manifest = {"dataset": "digits", "noise": {"type": "symmetric", "rate": 0.4, "realised_rate": 0.4}}
    summary = summarize(history, {"method": "ce", "seed": 0}, manifest, 10.0)
    assert summary["workers_per_epoch"] == [2, 2, 1, 1, 2]
    assert summary["worker_groups"] == [{"epoch": 0, "workers": 2}, {"epoch": 2, "workers": 1},
                                        {"epoch": 4, "workers": 2}]
    lines = []
    progress = Progress(5, lines.append)
    for entry in history:
        progress.epoch(entry)
    assert [line for line in lines if line.startswith("worker group")] == [
        "worker group started from the epoch 2 checkpoint with 1 worker",
        "worker group started from the epoch 4 checkpoint with 2 workers"]


@pytest.mark.parametrize("split, read", [("train", (99, 10, 20)), ("val", (100, 9, 20)), ("test", (100, 10, 19))])
def test_a_pass_that_reads_fewer_samples_than_the_manifest_stops_the_run(split, read):
    from types import SimpleNamespace

    import torch

    from noisymix.distributed import shards
    from noisymix.distributed.worker import epoch_metrics
    from noisymix.mixing.method import EpochPlan

    job = SimpleNamespace(manifest={"splits": {"train": {"count": 100}, "val": {"count": 10}, "test": {"count": 20}}})
    train, val, test = read
    stats = SimpleNamespace(loss_sum=float(train), samples=train, seconds=1.0)
    with pytest.raises(shards.ShardError, match=rf"epoch 3: the ranks read {dict(zip(('train', 'val', 'test'), read))[split]} "
                                                rf"{split} samples, the manifest lists"):
        epoch_metrics(job, 3, EpochPlan("train"), stats, {}, {}, [5, val, 10, test], 0.1, 0.0, 1, None, torch.device("cpu"))


def test_a_failed_write_of_a_run_file_names_it_and_leaves_no_partial_file(tmp_path):
    from noisymix.distributed.artifacts import write_atomic

    def full_disk(partial):
        partial.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as raised:
        write_atomic(tmp_path / "model_last.pt", full_disk)
    assert one_line(raised.value) == f"No space left on device: {tmp_path / 'model_last.pt'}"
    assert list(tmp_path.iterdir()) == [], "no partial file, no target"


@pytest.mark.parametrize("configured, env, joined", [(None, "10.0.0.1:6379", "10.0.0.1:6379"), ("auto", "x:1", "auto"),
                                                     (None, None, "local"), ("local", None, "local")])
def test_ray_address_unset_joins_rays_own_ray_address_else_starts_a_local_ray(monkeypatch, configured, env, joined):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(runner, "forward_sigterm_as_sigint", lambda: None)
    monkeypatch.setattr(runner, "own_state_api", lambda: 8265)
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    runner.start_ray(configured)
    [kwargs] = calls
    assert kwargs["address"] == joined and kwargs["dashboard_host"] == "127.0.0.1"
    # "local": a new Ray even where `ray start` left one running on this machine (ray.init(address=None) joins it)
    assert ("dashboard_port" in kwargs) == (joined == "local"), "only a Ray of its own gets a dashboard port"
    assert kwargs["runtime_env"] is None


def test_start_ray_gives_its_env_vars_to_every_process_of_the_job(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(runner, "forward_sigterm_as_sigint", lambda: None)
    monkeypatch.setattr(runner, "own_state_api", lambda: 8265)
    runner.start_ray(None, False, {"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert calls[0]["runtime_env"] == {"env_vars": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def test_a_ray_already_joined_with_other_env_vars_is_refused_by_name(monkeypatch):
    """A bench or sweep joins Ray once per process; a later run asking for other allocator settings would silently
    run without them."""
    class Joined:
        runtime_env = {"env_vars": {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}}

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Joined())
    runner.start_ray(None, False, Joined.runtime_env["env_vars"])
    runner.start_ray(None, False, None)
    with pytest.raises(ConfigError, match="MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ cannot change for a Ray"):
        runner.start_ray(None, False, {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"})


@pytest.mark.parametrize("sigint", ["ignored", "handled"])
def test_sigterm_stops_a_run_like_ctrl_c_even_where_sigint_is_ignored(sigint):
    """A shell starts background jobs (`nohup noisymix ... &`) with SIGINT ignored: SIGTERM must still interrupt."""
    seen = []

    def handled(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else handled)
        runner.forward_sigterm_as_sigint()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
    assert seen == ([] if sigint == "ignored" else [signal.SIGINT]), "Ctrl-C's own handler runs where there is one"


def test_a_handler_installed_inside_a_run_is_removed_when_it_ends():
    """Ray Train's fit() leaves a Ctrl-C handler aimed at its finished controller: after the run the caller's
    handler is back, so the next Ctrl-C or SIGTERM (a bench between cells) is not swallowed."""
    def callers(signum, frame):
        raise KeyboardInterrupt

    saved = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, callers)
        with pytest.raises(RuntimeError):
            with runner.callers_interrupt_handler():
                signal.signal(signal.SIGINT, lambda signum, frame: None)   # what fit() installs
                raise RuntimeError("the run failed")
        assert signal.getsignal(signal.SIGINT) is callers
    finally:
        signal.signal(signal.SIGINT, saved)
