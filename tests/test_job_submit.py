"""The cluster workflow: a noisymix run sent with `ray job submit` to a running cluster (a head started here,
on 127.0.0.1, and stopped at the end)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from noisymix.distributed.artifacts import RunDir
from noisymix.distributed.runner import free_port


def head_diagnosis(tmp_path, temp: str, probe) -> str:
    """Why the cluster takes no job: the last submission's answer and the tails of the head's and its
    dashboard's logs."""
    parts = [f"last `ray job submit` (exit {probe.returncode}):\n{probe.stdout[-1500:]}{probe.stderr[-1500:]}",
             f"ray-head.log:\n{(tmp_path / 'ray-head.log').read_text()[-1500:]}"]
    for log in sorted(Path(temp).glob("session_*/logs/dashboard_agent.*")):
        parts.append(f"{log.name}:\n{log.read_text(errors='replace')[-1500:]}")
    return "\n\n".join(parts)


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` in its own process: stopping that process stops this cluster only (`ray stop`
    would stop every Ray on the machine). Every port is a free one: the session's own Ray already holds the
    defaults (its dashboard agent's 52365), and a second agent that cannot bind takes no jobs."""
    port, dashboard = free_port(), free_port()
    agent_ports = {flag: free_port() for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                                   "--metrics-export-port", "--runtime-env-agent-port",
                                                   "--ray-client-server-port")}
    # Its processes ask their own State API, however many Ray instances the machine runs (runner.own_state_api).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    beside = Path(sys.executable).with_name("ray")   # the ray of this interpreter, else the one on PATH
    ray_cli = str(beside) if beside.is_file() else shutil.which("ray")
    assert ray_cli, "the ray command is not installed beside this Python nor on PATH"
    log = open(tmp_path / "ray-head.log", "w")
    temp = tempfile.mkdtemp(prefix="nmx-ray-")   # short: Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
         *[f"{flag}={value}" for flag, value in agent_ports.items()], f"--temp-dir={temp}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 300
        # Ready when a trivial job runs: the job server answers before its agent can take jobs.
        while True:
            probe = subprocess.run([ray_cli, "job", "submit", "--address", address, "--", "true"],
                                   capture_output=True, text=True, env=env, timeout=120)
            if probe.returncode == 0:
                break
            assert head.poll() is None and time.time() < deadline, head_diagnosis(tmp_path, temp, probe)
            time.sleep(2)
        yield ray_cli, address, env
    finally:
        # The head's process group holds every process of this cluster (and of no other): killing it is
        # `ray stop` for this cluster alone, without its 30 s of graceful shutdown.
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=120)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_run_submitted_as_a_ray_job_trains_on_the_cluster(ray_session, ray_head, digits_dir, tmp_path):
    # Two Ray instances on this machine now (the session's and this head): a process of the session's cluster
    # still reaches its own State API, which Ray Train's placement-group cleaner needs.
    def alive_actors() -> int:   # nested: shipped to the worker by value (this test module is not importable there)
        from ray.util.state import list_actors

        return len(list_actors(filters=[("state", "=", "ALIVE")]))

    assert ray_session.get(ray_session.remote(alive_actors).remote()) >= 0, "raises when it cannot tell the cluster"
    ray_cli, address, env = ray_head
    run_dir = tmp_path / "run"
    submitted = subprocess.run(
        [ray_cli, "job", "submit", "--address", address, "--", sys.executable, "-m", "noisymix.launch.cli", "train",
         f"data_dir={digits_dir}", "num_shards=4", "method=ce", "epochs=2", "num_workers=2", f"run_dir={run_dir}"],
        capture_output=True, text=True, env=env, timeout=600)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "succeeded" in submitted.stdout and f"run_dir: {run_dir}" in submitted.stdout
    summary = RunDir(run_dir).summary()
    assert summary["epochs"] == 2 and summary["workers"] == 2
    jobs = subprocess.run([ray_cli, "job", "list", "--address", address], capture_output=True, text=True, env=env)
    assert "SUCCEEDED" in jobs.stdout and "FAILED" not in jobs.stdout
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
