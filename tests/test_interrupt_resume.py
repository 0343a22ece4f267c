"""Ctrl-C (or SIGTERM) stops a run within seconds with one line and a resumable directory; resuming it ends
with the numbers of an uninterrupted run, bit for bit on CPU."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from noisymix.distributed.artifacts import RunDir


def noisymix(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "noisymix.launch.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})


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


@pytest.mark.parametrize("method, pattern, sig", [
    (["method=ce", "epochs=5"], "epoch   2/5", signal.SIGINT),
    (["method=mixnn", "epochs=5", "warmup=1", "es=2", "num_workers=2"], "epoch   3/5", signal.SIGTERM),
    (["method=selectmix", "epochs=3", "folds=3", "fold_epochs=2", "partner_source=global"], "epoch   1/3",
     signal.SIGINT),
])
def test_an_interrupted_run_resumes_to_the_numbers_of_an_uninterrupted_one(ray_session, digits_dir, tmp_path,
                                                                          method, pattern, sig):
    common = [f"data_dir={digits_dir}", "num_shards=4", *method]
    finish(["train", *common, f"run_dir={tmp_path / 'whole'}"], tmp_path)
    cut = tmp_path / "cut"
    code, out = interrupt_when(noisymix("train", *common, f"run_dir={cut}", cwd=tmp_path), pattern, sig)
    assert code == 130 and f"resume with: noisymix train resume={cut}" in out.strip().splitlines()[-1], out
    status = RunDir(cut).status()
    assert status["state"] == "interrupted" and not (cut / "summary.json").exists()
    resumed = finish(["train", f"resume={cut}"], tmp_path)
    assert "resuming the interrupted run" in resumed
    assert epochs(cut) == epochs(tmp_path / "whole"), "every epoch as in the uninterrupted run"
    whole, again = RunDir(tmp_path / "whole").summary(), RunDir(cut).summary()
    for key in ("test_acc", "test_acc_last", "selected_epoch", "detection", "corrected_label_acc"):
        assert whole.get(key) == again.get(key), key
    issues = tmp_path / "whole" / "label_issues.csv"
    if issues.exists():
        assert (cut / "label_issues.csv").read_text() == issues.read_text()
    assert RunDir(cut).status()["state"] == "finished"


def test_selectmix_interrupted_during_its_folds_keeps_the_finished_ones(ray_session, digits_dir, tmp_path):
    common = [f"data_dir={digits_dir}", "num_shards=4", "method=selectmix", "epochs=1", "folds=3", "fold_epochs=3",
              "fold_cpus=2"]   # one fold at a time on 2 CPUs
    finish(["train", *common, f"run_dir={tmp_path / 'whole'}"], tmp_path)
    cut = tmp_path / "cut"
    process = noisymix("train", *common, f"run_dir={cut}", cwd=tmp_path)
    deadline = time.time() + 300
    while not list((cut / "folds" / "epoch0").glob("fold*.npz")):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130, out
    kept = sorted(p.name for p in (cut / "folds" / "epoch0").glob("fold*.npz"))
    assert RunDir(cut).status()["stage"] == "selection at epoch 0" and 1 <= len(kept) < 3
    finish(["train", f"resume={cut}"], tmp_path)
    assert epochs(cut) == epochs(tmp_path / "whole")
    assert json.loads((cut / "summary.json").read_text())["detection"] == \
        json.loads((tmp_path / "whole" / "summary.json").read_text())["detection"]
    assert not (cut / "folds" / "epoch0").exists(), "the fold cache goes once oof.npz holds the round"
