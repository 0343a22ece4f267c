"""Elastic workers: num_workers=MIN-MAX runs on what the cluster has, shrinks when a node is lost and grows
back when it returns; every training id is still seen exactly once per epoch."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from noisymix.distributed.artifacts import RunDir


@pytest.fixture
def two_node_cluster():
    """A head and a second node of one CPU each, on 127.0.0.1 (two raylets on this machine)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "dashboard_host": "127.0.0.1", "include_dashboard": False})
    yield cluster
    cluster.shutdown()


def wait_for(process, lines: list[str], pattern: str, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    for line in process.stdout:
        lines.append(line)
        if pattern in line:
            return
        assert time.time() < deadline, "".join(lines)
    raise AssertionError(f"the run ended before {pattern!r}:\n{''.join(lines)}")


# Ray Train's elastic policy sees the cluster through Ray's autoscaling coordinator, whose view of the nodes is
# refreshed every 20 s (ray.data's _AutoscalingCoordinatorActor.TICK_INTERVAL_S, not configurable) or at once when
# asked (refresh_cluster_view). A real cluster waits for the tick; the test asks, after the node is lost and after it
# returns. A group started on a stale view (two workers on a lost node) waits for its placement group up to
# RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default, 10 here) before Ray Train tries again. The run must still
# be training when the grown group starts: here (2 cores) the group shrank 21 s after the loss and grew back 18.5 s
# after the return, with 28 of 30 epochs still to run (before the two refreshes: 71 s and 21-29 s, with 60 epochs).
EPOCHS = 30


def refresh_cluster_view(address: str, alive: int) -> None:
    """Once Ray counts `alive` nodes, make its autoscaling coordinator look at them now (a full tick, as a caller
    asking for fresh reservations gets) instead of at its next 20 s tick. A process of its own: this one may hold
    the session's Ray."""
    code = f"""
import time, ray
ray.init(address={address!r}, logging_level="ERROR")
deadline = time.time() + 60
while sum(node["Alive"] for node in ray.nodes()) != {alive}:
    assert time.time() < deadline, "the cluster never showed {alive} live node(s)"
    time.sleep(0.2)
coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
ray.get(coordinator.get_reserved_resources.remote("noisymix-test", recompute=True))
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   env={**os.environ, "RAY_AUTH_MODE": "disabled"})


@pytest.mark.slow
@pytest.mark.parametrize("method", [["method=mixnn", "warmup=1", "es=2", "audit_state=true"]])
def test_a_lost_node_shrinks_the_group_and_its_return_grows_it_back(two_node_cluster, digits_dir, tmp_path, method):
    second = two_node_cluster.add_node(num_cpus=1)
    two_node_cluster.wait_for_nodes()
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "noisymix.launch.cli", "train", f"data_dir={digits_dir}", "num_shards=4", *method,
         f"epochs={EPOCHS}", "num_workers=1-2", "cpus_per_worker=1", "max_failures=3", "resize_check_s=1",
         "audit_ids=true", f"ray_address={two_node_cluster.address}", f"run_dir={run_dir}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"})
    lines: list[str] = []
    try:
        wait_for(process, lines, f"epoch   2/{EPOCHS}")
        two_node_cluster.remove_node(second)           # the node and its worker are lost
        refresh_cluster_view(two_node_cluster.address, alive=1)
        wait_for(process, lines, "with 1 worker")
        wait_for(process, lines, "epoch")
        two_node_cluster.add_node(num_cpus=1)          # capacity returns: the group grows back
        returned = time.time()
        refresh_cluster_view(two_node_cluster.address, alive=2)
        wait_for(process, lines, "with 2 workers")
        print(f"the group grew back {time.time() - returned:.1f}s after the node returned")
        out, _ = process.communicate(timeout=600)
    finally:
        process.kill()
    lines.append(out)
    assert process.returncode == 0, "".join(lines)
    summary = RunDir(run_dir).summary()
    sizes = summary["workers_per_epoch"]
    print("workers per epoch:", sizes)
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2, sizes
    first_small, last_small = sizes.index(1), len(sizes) - 1 - sizes[::-1].index(1)
    assert all(size == 2 for size in sizes[:first_small]) and all(size == 2 for size in sizes[last_small + 1:])
    assert [group["workers"] for group in summary["worker_groups"]][:1] == [2]
    assert any(group["workers"] == 1 for group in summary["worker_groups"])
    records = RunDir(run_dir).metrics()
    assert [record["epoch"] for record in records] == list(range(EPOCHS)), "every epoch once in metrics.jsonl"
    ids = np.load(run_dir / "audit_ids.npz")
    train_count = json.loads((digits_dir / "manifest.json").read_text())["splits"]["train"]["count"]
    for epoch, workers in enumerate(sizes):
        seen = np.concatenate([ids[f"epoch{epoch}_rank{rank}"] for rank in range(workers)])
        assert np.array_equal(np.sort(seen), np.arange(train_count)), f"epoch {epoch}: each id exactly once"
    if "method=mixnn" in method:   # the per-sample state came through every resize, re-dealt to the ranks, and used
        digests = json.loads((run_dir / "state_digests.json").read_text())
        for epoch in {d["epoch"] for d in digests}:
            ranges = {(d["start"], d["stop"]) for d in digests if d["epoch"] == epoch}
            one, halves = {(0, train_count)}, {(0, train_count // 2), (train_count // 2, train_count)}
            assert ranges <= one | halves and (one <= ranges or halves <= ranges), f"epoch {epoch}: {ranges}"
        assert summary["corrected_label_acc"] > 0.5 and (run_dir / "label_issues.csv").is_file()
