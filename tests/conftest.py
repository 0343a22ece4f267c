"""Shared fixtures: a tiny prepared dataset and one local Ray for the whole session.

Two tiers: a test that uses the `ray_session` fixture (a local Ray cluster) is marked `slow` here, and the
default `python -m pytest` leaves slow tests out; `python -m pytest -m slow` runs them (CI runs both)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from pathlib import Path

# Before any Ray process starts: no auth token on disk for local tests, and a fast controller
# poll so the tiny epochs of the tests are not paced by Ray Train's 2 s default.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray Train starts a preemption watcher (an actor polling for cloud nodes being drained) with every worker group:
# ~3 CPU-s per group on these 2 cores, ~50 groups per slow tier, and no local test drains a node.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# A shell starts a background job with SIGINT ignored, and a child inherits that through exec: the runs that the tests
# interrupt with SIGINT would not stop (a run interrupted during its folds finished instead). A handler of our own
# is reset to the default at exec, so every child starts with Python's Ctrl-C, however pytest itself was started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402

from noisymix.launch.config import build_config  # noqa: E402
from noisymix.launch.prepare import prepare  # noqa: E402


def make_config(tmp_path, **overrides):
    """A config for the digits source whose data and run directories live under tmp_path."""
    values = {"data_dir": str(tmp_path / "data"), "run_dir": str(tmp_path / "run"), "epochs": 2, "num_shards": 4}
    values.update(overrides)
    return build_config(overrides=values)


def kill_one_worker_after_second_epoch(run_dir, done, pattern="metrics.jsonl"):
    """SIGKILL a training worker once epoch 1 is recorded in run_dir/`pattern` (a glob: a sweep trial's run
    folder is named after its trial id): by then epoch 0's checkpoint is registered (Ray Train's report queue
    holds one result, so epoch 1's report waited for epoch 0's)."""
    import ray
    from ray.util.state import list_actors

    # Name this session's cluster: another Ray on the machine would make the State API ambiguous.
    address = ray.get_runtime_context().gcs_address
    while not done.is_set():
        if any(path.read_text().count("\n") >= 2 for path in Path(run_dir).glob(pattern)):
            actors = list_actors(address=address,
                                 filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if actors:
                os.kill(actors[0]["pid"], signal.SIGKILL)
                return
        time.sleep(0.05)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: a full disk, for the paths that must fail on one in a clear line."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"a full disk is simulated with a small tmpfs, which needs root: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """digits with 40% symmetric noise in 4 shards per split, prepared once per session."""
    base = tmp_path_factory.mktemp("digits")
    config = make_config(base)
    return prepare(config.data, config.run.seed, log=lambda *_: None)


def pytest_collection_modifyitems(items):
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def whole_run(digits_dir, tmp_path_factory, name: str, args: list[str]) -> Path:
    """`noisymix train ARGS` on the session's digits, uninterrupted, in a folder of its own; returns its run dir."""
    from noisymix.launch.cli import main

    run = tmp_path_factory.mktemp(name) / "run"
    assert main(["train", f"data_dir={digits_dir}", *args, f"run_dir={run}"]) == 0
    return run


# The CE run every interrupted CE run is compared with (12 short epochs: an interrupt after epoch 2 lands while
# the run still trains).
CE_RUN = ["num_shards=4", "method=ce", "epochs=12"]


@pytest.fixture(scope="session")
def ce_whole(ray_session, digits_dir, tmp_path_factory):
    """CE_RUN on the session's digits, uninterrupted. A bench cell or an object-store copy of the same data spec
    reads byte-identical shards, so their interrupted-and-resumed runs must match it epoch for epoch."""
    return whole_run(digits_dir, tmp_path_factory, "ce-whole", CE_RUN)


# One run per method that both its end-to-end test and its interrupt test read, trained once per session (each
# run costs ~20-45 s here): the end-to-end test checks its outputs, the interrupted-and-resumed run must match it.
# SelectMix: one fold at a time on 2 CPUs (fold_cpus=2), so that a fold can be interrupted or killed while the
# other waits. MixNN: five epochs (warm-up, Mixup, three of neighbours), so that a signal after the third lands
# while the run still trains.
SELECTMIX_RUN = ["num_shards=4", "method=selectmix", "num_workers=2", "epochs=4", "folds=2", "fold_epochs=2",
                 "fold_cpus=2", "partner_source=global"]
MIXNN_RUN = ["num_shards=4", "method=mixnn", "num_workers=2", "epochs=5", "warmup=1", "es=2", "update_every=1",
             "knn=2", "audit_state=true", "neighbour_source=batch"]


@pytest.fixture(scope="session")
def selectmix_whole(ray_session, digits_dir, tmp_path_factory):
    """SELECTMIX_RUN on the session's digits, uninterrupted."""
    return whole_run(digits_dir, tmp_path_factory, "selectmix-whole", SELECTMIX_RUN)


@pytest.fixture(scope="session")
def mixnn_whole(ray_session, digits_dir, tmp_path_factory):
    """MIXNN_RUN on the session's digits, uninterrupted."""
    return whole_run(digits_dir, tmp_path_factory, "mixnn-whole", MIXNN_RUN)


# The object-store tests' S3 server (tests/test_object_storage.py) takes this loopback port when its module starts.
# Its endpoint and dummy credentials are set before the session's Ray starts: Ray's processes keep the environment
# they start with, as every node of a real cluster holds its store's settings, so the commands those tests start can
# join this Ray instead of starting one of their own (~10 s and ~15 CPU-s each here).
@functools.cache
def s3_port() -> int:
    from noisymix.distributed.runner import free_port   # here: runner imports Ray, which the fast tier never starts

    return free_port()


def s3_env() -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port()}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for every test that needs it (starting one costs ~10 s here), with s3_env() and a local cache
    of remote runs' working copies in its processes' environment."""
    import ray

    from noisymix.distributed.runner import start_ray

    os.environ.update(s3_env(), NOISYMIX_CACHE=str(tmp_path_factory.mktemp("cache")))
    start_ray()
    yield ray
    ray.shutdown()
