"""Failures a user or the machine causes end in one line that says what and where: the error mapping, the
resource check, the run-directory guard, stale staging; and docs/failures.md names a test for every row."""

import errno
import re
from pathlib import Path

import pytest
import ray

from noisymix.distributed import runner
from noisymix.distributed.artifacts import RunDir
from noisymix.launch.errors import one_line
from noisymix.launch.prepare import remove_stale_staging, staging_dir
from noisymix.launch.train import open_run
from noisymix.mixing.config import ConfigError

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
        runner.check_resources(fits, [("fold task", 4.0, 0.0)], print)
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
