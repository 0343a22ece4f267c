"""Ctrl-C (or SIGTERM) stops a run within seconds with one line and a resumable directory; resuming it ends
with the numbers of an uninterrupted run, bit for bit on CPU."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import yaml

from noisymix.distributed.artifacts import RunDir

from conftest import CE_RUN, MIXNN_RUN, SELECTMIX_RUN


def noisymix(*args, cwd):
    """`noisymix ARGS` in its own process; it joins the session's Ray when there is one (RAY_ADDRESS), as a command
    run on a cluster's head node would, instead of starting a Ray of its own."""
    import ray

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    if ray.is_initialized():
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return subprocess.Popen([sys.executable, "-m", "noisymix.launch.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def interrupt_when(process, pattern: str, sig=signal.SIGINT, timeout: float = 240.0) -> tuple[int, str]:
    """Send `sig` once a line holding `pattern` is printed; returns (exit code, output)."""
    lines, deadline = [], time.time() + timeout
    for line in process.stdout:
        lines.append(line)
        if pattern in line:
            process.send_signal(sig)
            break
        assert time.time() < deadline, "".join(lines)
    sent = time.time()
    out, _ = process.communicate(timeout=120)
    lines.append(out)
    assert time.time() - sent < 60, "the run stopped within a minute of the signal"
    return process.returncode, "".join(lines)


def finish(args, cwd) -> str:
    process = noisymix(*args, cwd=cwd)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out
    return out


def epochs(run_dir):
    return [(r["epoch"], r["train_loss"], r["val_acc"], r["test_acc"]) for r in RunDir(run_dir).metrics()]


def test_an_interrupted_mixnn_run_resumes_to_the_numbers_of_an_uninterrupted_one(mixnn_whole, digits_dir, tmp_path):
    common = [f"data_dir={digits_dir}", *MIXNN_RUN]
    # The interrupted run is tracked in MLflow too: two workers, one MLflow run, KILLED, then FINISHED on resume.
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)

    def mlflow_runs():
        return client.search_runs([client.get_experiment_by_name("noisymix").experiment_id])

    def stopped(cut):
        [logged] = mlflow_runs()
        assert logged.info.status == "KILLED" and logged.data.params["num_workers"] == "2"

    interrupted_then_resumed([*common, "tracking=mlflow", f"tracking_uri={uri}"], mixnn_whole, tmp_path,
                             "epoch   3/5", signal.SIGTERM, stopped)
    [logged] = mlflow_runs()
    assert logged.info.status == "FINISHED" and logged.info.run_name == "cut"
    history = {m.step: m.value for m in client.get_metric_history(logged.info.run_id, "val_acc")}
    assert history == {r["epoch"] + 1: r["val_acc"] for r in RunDir(tmp_path / "cut").metrics()}
    assert "summary.json" in [a.path for a in client.list_artifacts(logged.info.run_id)]


def test_selectmix_interrupted_in_training_resumes_its_selection_and_its_numbers(selectmix_whole, digits_dir,
                                                                                tmp_path):
    interrupted_then_resumed([f"data_dir={digits_dir}", *SELECTMIX_RUN], selectmix_whole, tmp_path,
                             "epoch   1/4", signal.SIGINT)


def interrupted_then_resumed(common: list[str], whole, tmp_path, pattern: str, sig, stopped=None) -> None:
    """Stop a run with `sig` once `pattern` is printed (then call `stopped(cut)`), resume it, and compare it with
    the uninterrupted `whole`."""
    cut = tmp_path / "cut"
    code, out = interrupt_when(noisymix("train", *common, f"run_dir={cut}", cwd=tmp_path), pattern, sig)
    assert code == 130 and f"resume with: noisymix train resume={cut}" in out.strip().splitlines()[-1], out
    status = RunDir(cut).status()
    assert status["state"] == "interrupted" and not (cut / "summary.json").exists()
    if stopped is not None:
        stopped(cut)
    resumed = finish(["train", f"resume={cut}"], tmp_path)
    assert "resuming the interrupted run" in resumed
    assert epochs(cut) == epochs(whole), "every epoch as in the uninterrupted run"
    done, again = RunDir(whole).summary(), RunDir(cut).summary()
    for key in ("test_acc", "test_acc_last", "selected_epoch", "detection", "corrected_label_acc"):
        assert done.get(key) == again.get(key), key
    issues = whole / "label_issues.csv"
    if issues.exists():
        assert (cut / "label_issues.csv").read_text() == issues.read_text()
    assert RunDir(cut).status()["state"] == "finished"


def fold_task_pids() -> list[int]:
    """Ray worker processes running a fold task (Ray titles them after the task: ray::_run)."""
    found = subprocess.run(["pgrep", "-f", "ray::_run"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_selectmix_folds_survive_a_killed_task_and_an_interrupt_and_end_as_the_whole_run(selectmix_whole, digits_dir,
                                                                                        tmp_path):
    """Two faults in one run's fold stage (one run instead of two: each costs ~40 s here): the first fold's task is
    SIGKILLed (Ray retries it), then Ctrl-C once that fold is written. The finished fold is kept, the resumed run
    trains only the other, and the table, the label issues and every epoch equal the uninterrupted run's."""
    cut = tmp_path / "cut"
    process = noisymix("train", f"data_dir={digits_dir}", *SELECTMIX_RUN, f"run_dir={cut}", cwd=tmp_path)
    deadline, pids = time.time() + 300, []
    while not pids:
        assert time.time() < deadline and process.poll() is None, "no fold task started"
        pids = fold_task_pids()
        time.sleep(0.2)
    os.kill(pids[0], signal.SIGKILL)
    while not list((cut / "folds" / "epoch0").glob("fold*.npz")):
        assert time.time() < deadline and process.poll() is None, "the killed fold was not retried"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130, out
    kept = sorted(p.name for p in (cut / "folds" / "epoch0").glob("fold*.npz"))
    assert RunDir(cut).status()["stage"] == "selection at epoch 0" and len(kept) == 1
    finish(["train", f"resume={cut}"], tmp_path)
    assert epochs(cut) == epochs(selectmix_whole)
    resumed, whole = RunDir(cut), RunDir(selectmix_whole)
    assert np.array_equal(resumed.out_of_fold()["probs"], whole.out_of_fold()["probs"]), "the retried fold is the same"
    assert (cut / "label_issues.csv").read_text() == (selectmix_whole / "label_issues.csv").read_text()
    assert resumed.summary()["detection"] == whole.summary()["detection"]
    assert not (cut / "folds" / "epoch0").exists(), "the fold cache goes once oof.npz holds the round"


def test_an_interrupted_bench_resumes_its_cell_to_the_numbers_of_an_uninterrupted_run(ce_whole, tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({
        # 12 short epochs: the signal after epoch 2 must land while the cell still trains, however late the
        # progress line reaches this test on a loaded machine.
        "name": "tiny", "base": {"source": "digits", "epochs": 12, "num_shards": 4},
        "settings": {"sym40": {"noise_type": "symmetric", "noise_rate": 0.4}},
        "methods": {"ce": {"method": "ce"}}, "curves": {"setting": "sym40", "seed": 0}}))
    bench = ["bench", str(spec), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--only", "sym40/*"]
    code, out = interrupt_when(noisymix(*bench, cwd=tmp_path), "epoch   2/12")
    assert code == 130 and "interrupted in cell sym40/ce/seed0; the same bench command resumes it" in out, out
    cell_run = next((tmp_path / "work" / "cells").glob("sym40-ce-*")) / "run"
    assert RunDir(cell_run).status()["state"] == "interrupted"
    resumed = finish(bench, tmp_path)
    assert "resuming the interrupted run" in resumed
    assert epochs(cell_run) == epochs(ce_whole), "the resumed cell equals an uninterrupted run"


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_once_there_is_room(ce_whole, digits_dir, tmp_path,
                                                                                small_disk):
    """The 1 MiB disk fills up while Ray Train copies a checkpoint into the run directory (a write of the run's
    own files that fails is named by write_atomic: tests/test_failures.py)."""
    cut = small_disk / "run"
    process = noisymix("train", f"data_dir={digits_dir}", *CE_RUN, f"run_dir={cut}", cwd=tmp_path)
    out, _ = process.communicate(timeout=600)
    last = out.strip().splitlines()[-1]
    assert process.returncode == 2 and last.startswith("noisymix: error: ") and "No space left on device" in last, out
    assert str(small_disk) in last, "the line names the file, or the run directory, that could not be written"
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)   # room again
    resumed = finish(["train", f"resume={cut}"], tmp_path)
    assert "resuming the" in resumed
    assert epochs(cut) == epochs(ce_whole), "nothing lost: the epochs of an uninterrupted run"
    assert RunDir(cut).status()["state"] == "finished"
