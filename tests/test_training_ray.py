"""End to end through Ray Train, WebDataset and DDP on 2 workers over a tiny prepared dataset."""

import hashlib
import json
import shutil
import signal
import threading

import numpy as np
import pytest
import torch
import webdataset as wds

from conftest import kill_one_worker_after_second_epoch, make_config
from noisymix.distributed import shards
from noisymix.launch.cli import main
from noisymix.launch.train import train

SUMMARY_KEYS = {"method", "dataset", "noise_type", "noise_rate", "seed", "epochs", "test_acc", "test_acc_last",
                "test_acc_best_test", "wall_time_s"}


def poison_true_labels(src, dst, claim_true_labels=True):
    """A copy of a prepared dataset whose train/val `clean.cls` members are not even integers (and without its
    labels files, so that every label read goes through the shards).

    With claim_true_labels=False the manifest says the truth is unknown, so no evaluation reads
    them either: only a training path that reads true labels can trip over the poison.
    """
    shutil.copytree(src, dst)
    manifest = shards.load_manifest(dst)
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            path = dst / shard["name"]
            samples = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
            with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
                for sample in samples:
                    record = {k: v for k, v in sample.items() if k in ("__key__", "input.npy", "cls")}
                    record[shards.TRUE_LABEL] = b"poison: the training path read a true label"
                    sink.write(record)
            shard["bytes"] = path.stat().st_size
            shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    for split in manifest["splits"].values():   # what reads labels scans the poisoned shards, not a labels file
        (dst / split.pop("labels")["name"]).unlink()
    manifest["has_true_labels"] = claim_true_labels
    (dst / shards.MANIFEST).write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def poisoned_dir(digits_dir, tmp_path_factory):
    return poison_true_labels(digits_dir, tmp_path_factory.mktemp("poisoned") / "data")


def test_two_workers_see_every_id_once_per_epoch_without_reading_true_labels(ray_session, poisoned_dir, tmp_path, capsys):
    code = main(["train", f"data_dir={poisoned_dir}", f"run_dir={tmp_path / 'run'}", "num_workers=2", "epochs=2",
                 "num_shards=4", "audit_ids=true", "method=mixup"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.strip().splitlines()[-1] == f"run_dir: {tmp_path / 'run'}"
    run = tmp_path / "run"
    n_train = shards.load_manifest(poisoned_dir)["splits"]["train"]["count"]
    audit = np.load(run / "audit_ids.npz")
    for epoch in range(2):
        rank0, rank1 = audit[f"epoch{epoch}_rank0"], audit[f"epoch{epoch}_rank1"]
        assert len(rank0) and len(rank1), "both ranks trained"
        seen = np.concatenate([rank0, rank1])
        assert len(seen) == n_train and np.array_equal(np.sort(seen), np.arange(n_train)), "each id exactly once"
    assert set(audit["epoch0_rank0"]) != set(audit["epoch1_rank0"]), "shards are re-dealt to ranks each epoch"

    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["epochs"] == 2 and summary["workers"] == 2
    assert summary["method"] == "mixup" and summary["noise_rate"] == 0.4
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert {"train_loss", "val_acc", "test_acc", "lr", "epoch_time_s", "samples_per_s_per_worker"} <= set(records[0])
    chosen = max(reversed(records), key=lambda r: r["val_acc"])
    assert summary["test_acc"] == chosen["test_acc"], "headline is picked on noisy validation, not test"
    state = torch.load(run / "model_last.pt", weights_only=True)
    assert state["epoch"] == 1 and "model" in state and (run / "model_best.pt").is_file()
    assert (run / "config.yaml").is_file() and (run / "curves.png").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*")), "TensorBoard event files in the run directory"


@pytest.mark.parametrize("method", [["method=selectmix", "folds=3", "fold_epochs=1"],
                                    ["method=mixnn", "neighbour_source=global", "warmup=1", "es=1"]])
def test_selectmix_and_mixnn_training_paths_never_read_true_labels(ray_session, digits_dir, tmp_path, capsys, method):
    data = poison_true_labels(digits_dir, tmp_path / "data", claim_true_labels=False)
    code = main(["train", f"data_dir={data}", f"run_dir={tmp_path / 'run'}", "epochs=2", "num_shards=4", *method])
    assert code == 0, capsys.readouterr().err
    assert "detection" not in json.loads((tmp_path / "run" / "summary.json").read_text())


def test_the_poison_is_live_clean_method_reads_true_labels_and_fails(ray_session, poisoned_dir, tmp_path, capsys):
    """The control for the test above: a path that does read true labels trips over the poison."""
    code = main(["train", f"data_dir={poisoned_dir}", f"run_dir={tmp_path / 'run'}", "epochs=1", "num_shards=4",
                 "method=clean", "max_failures=0"])
    err = capsys.readouterr().err
    assert code == 2 and "does not decode" in err
    assert not (tmp_path / "run" / "summary.json").exists(), "a failed run never looks complete"


def test_a_lost_worker_is_replaced_and_training_resumes_from_the_checkpoint(ray_session, digits_dir, tmp_path):
    config = make_config(tmp_path, data_dir=str(digits_dir), epochs=8, num_workers=2, max_failures=2)
    before = signal.getsignal(signal.SIGINT)
    done = threading.Event()
    killer = threading.Thread(target=kill_one_worker_after_second_epoch, args=(tmp_path / "run", done), daemon=True)
    killer.start()
    try:
        summary = train(config, log=lambda *_: None)
    finally:
        done.set()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["epochs"] == 8 and sorted({r["epoch"] for r in records}) == list(range(8))
    assert any(r["resumed_from_epoch"] for r in records), "the worker group restarted from a checkpoint"
    assert signal.getsignal(signal.SIGINT) is before, "Ray Train's Ctrl-C handler left installed after the run"
