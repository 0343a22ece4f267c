"""Datasets and runs in an object store: a real S3 API server (moto's) on 127.0.0.1, reached through
pyarrow (our reads and writes, Ray Train's checkpoints) and WebDataset (the shard streams)."""

import signal
import time

import numpy as np
import pytest

from noisymix.distributed import shards, storage
from noisymix.distributed.artifacts import RunDir
from noisymix.launch.prepare import prepare
from noisymix.selection.crossval import SelectionError
from test_interrupt_resume import epochs, finish, interrupt_when, noisymix

from conftest import make_config, s3_env, s3_port


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on conftest.s3_port(), with its endpoint and dummy credentials in the
    environment (inherited by the noisymix processes the tests start; the session's Ray has them from its start)."""
    boto3 = pytest.importorskip("boto3", reason="the test extra installs boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port(), verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_env().items():
            env.setenv(key, value)
        client = boto3.client("s3")
        for bucket in ("nmx-data", "nmx-runs"):
            client.create_bucket(Bucket=bucket)
        yield client
    server.stop()


@pytest.fixture(scope="module")
def s3_digits(s3_endpoint, tmp_path_factory):
    """The session's digits dataset prepared straight into the store (and locally, to compare)."""
    base = tmp_path_factory.mktemp("s3digits")
    config = make_config(base, data_dir="s3://nmx-data/digits")
    started = time.perf_counter()
    url = prepare(config.data, config.run.seed, log=lambda *_: None)
    print(f"prepare to s3: {time.perf_counter() - started:.2f}s")
    local = prepare(make_config(base).data, config.run.seed, log=lambda *_: None)
    return url, local


def test_a_dataset_prepared_to_s3_reads_like_the_local_one(s3_digits, tmp_path):
    url, local = s3_digits
    assert url == "s3://nmx-data/digits"
    manifest = shards.load_manifest(url)
    assert manifest["splits"] == shards.load_manifest(local)["splits"], "the same shards, byte for byte"
    assert shards.check_shards(url, manifest, full=True) == sum(len(s["shards"]) for s in manifest["splits"].values())
    for split in ("train", "val", "test"):
        assert np.array_equal(shards.load_labels(url, manifest, split), shards.load_labels(local, manifest, split))
    remote, here = shards.SampleReader(url, manifest), shards.SampleReader(local, manifest)
    assert all(remote.read(i) == here.read(i) for i in (0, 7, manifest["splits"]["train"]["count"] - 1))
    logs = []
    prepare(make_config(tmp_path, data_dir=url).data, 0, log=logs.append)
    assert logs == [f"data ready: {url} (already prepared with this spec)"]


def test_a_changed_object_fails_its_checksum(s3_digits, s3_endpoint, tmp_path):
    url, local = s3_digits
    manifest = shards.load_manifest(url)
    copy = "s3://nmx-data/changed"
    for name in storage.list_files(url):
        storage.write_bytes(storage.join(copy, name), storage.read_bytes(storage.join(url, name)))
    shard = manifest["splits"]["val"]["shards"][1]["name"]
    data = bytearray(storage.read_bytes(storage.join(copy, shard)))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(storage.join(copy, shard), bytes(data))
    with pytest.raises(shards.ShardError, match=f"{copy}/{shard} fails its sha256 check"):
        shards.check_shards(copy, manifest, full=True)


def test_a_prefix_holding_other_objects_is_not_overwritten(s3_endpoint, tmp_path):
    storage.write_bytes("s3://nmx-data/theirs/notes.txt", b"not ours")
    with pytest.raises(Exception, match="not a prepared dataset"):
        prepare(make_config(tmp_path, data_dir="s3://nmx-data/theirs").data, 0, log=lambda *_: None)
    assert storage.read_bytes("s3://nmx-data/theirs/notes.txt") == b"not ours"


def test_a_remote_run_directory_writes_whole_objects_and_reads_them_back(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("NOISYMIX_CACHE", str(tmp_path / "cache"))
    run = RunDir("s3://nmx-runs/unit")
    run.create()
    run.write_config({"method": "ce"})
    for epoch in range(3):
        run.append_metrics({"epoch": epoch, "val_acc": epoch / 10})
    run.write_status("interrupted", "training", epoch=2)
    again = RunDir("s3://nmx-runs/unit")
    assert again.config_values() == {"method": "ce"} and [r["epoch"] for r in again.metrics()] == [0, 1, 2]
    assert again.status()["state"] == "interrupted" and again.summary() is None
    assert sorted(storage.list_files("s3://nmx-runs/unit")) == ["config.yaml", "metrics.jsonl", "status.json"]
    assert again.ray_storage == "s3://nmx-runs/unit/ray" and again.latest_checkpoint_epoch() is None


def test_a_url_without_a_dataset_is_refused_by_name(s3_endpoint):
    for url in ("s3://no-such-bucket/data", "s3://nmx-data/absent"):
        with pytest.raises(shards.ShardError, match=f"no manifest.json in {url}: run `noisymix prepare` first"):
            shards.load_manifest(url)


# Four epochs, cut once the second is printed: by then the first epoch's checkpoint is registered in the store
# (Ray Train's report queue holds one result, so the second report returned only once the first was taken; the
# second's own registration may still be under way when its line is printed), and two epochs of seconds of
# checkpoint uploads are left for the interrupt to land in.
S3_RUN = ["num_shards=4", "method=ce", "epochs=4"]


def test_train_from_s3_into_s3_stop_and_resume_there(ray_session, s3_digits, tmp_path, monkeypatch):
    from noisymix.launch.cli import main

    url, local = s3_digits
    monkeypatch.setenv("NOISYMIX_CACHE", str(tmp_path / "cache"))   # the runs' working copies
    ce_whole = tmp_path / "whole"
    assert main(["train", f"data_dir={local}", *S3_RUN, f"run_dir={ce_whole}"]) == 0
    cut = "s3://nmx-runs/cut"
    code, out = interrupt_when(noisymix("train", f"data_dir={url}", *S3_RUN, f"run_dir={cut}", cwd=tmp_path),
                             "epoch   2/4", signal.SIGINT)
    assert code == 130 and f"resume with: noisymix train resume={cut}" in out, out
    assert RunDir(cut).status()["state"] == "interrupted"
    assert RunDir(cut).latest_checkpoint_epoch() is not None, "Ray Train's checkpoints are in the store"
    resumed = finish(["train", f"resume={cut}"], tmp_path)
    assert "resuming the interrupted run" in resumed
    assert epochs(cut) == epochs(ce_whole), "every epoch as in an uninterrupted run (on the same data, kept locally)"
    names = storage.list_files(cut)
    assert {"summary.json", "model_best.pt", "model_last.pt", "metrics.jsonl", "status.json"} <= set(names)
    assert any(name.startswith("ray/train/checkpoint_") for name in names)
    assert RunDir(cut).summary()["test_acc"] == RunDir(ce_whole).summary()["test_acc"]


def test_a_bench_keeps_its_cells_in_the_store_and_reuses_them(s3_endpoint, tmp_path, monkeypatch):
    import noisymix.launch.train
    from noisymix.launch import bench
    from noisymix.launch.bench_spec import parse_spec

    monkeypatch.setenv("NOISYMIX_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_train(config, log=print):   # stands in for training: a run directory with its files, in the store
        calls.append(config.run.run_dir)
        run = RunDir(config.run.run_dir)
        run.create()
        run.write_config(config.to_dict())
        run.append_metrics({"epoch": 0, "val_acc": 0.5, "test_acc": 0.5})
        summary = {"test_acc": 0.5, "run_dir": run.location}
        run.write_summary(summary)
        return summary

    monkeypatch.setattr(noisymix.launch.train, "train", fake_train)
    monkeypatch.setattr(bench, "detector_curve", lambda run, config: None)
    spec = parse_spec({"name": "s3bench", "base": {"source": "digits", "epochs": 1},
                       "settings": {"sym40": {"noise_type": "symmetric", "noise_rate": 0.4}},
                       "methods": {"ce": {"method": "ce"}}, "curves": {"setting": "sym40", "seed": 0}})
    work = "s3://nmx-runs/bench"
    assert bench.run_spec(spec, work, log=lambda *_: None) == {"chosen": 2, "ran": 2, "failed": 0}
    assert sorted(calls) == [f"{work}/cells/clean-clean-seed0/run", f"{work}/cells/sym40-ce-seed0/run"]
    assert build_data_dirs(spec, work) == {f"{work}/data/clean-seed0", f"{work}/data/sym40-seed0"}
    assert storage.is_file(f"{work}/cells/sym40-ce-seed0/cell.json")
    assert bench.run_spec(spec, work, log=lambda *_: None)["ran"] == 0, "finished cells in the store are reused"
    assert {cell["status"] for cell in bench.gather(spec, work)["cells"].values()} == {"done"}


def build_data_dirs(spec, work):
    return {cell.config(work).data.data_dir for cell in spec.cells}


def test_a_sweep_lives_in_the_store_folds_shared_and_outputs_there(ray_session, s3_digits, tmp_path, monkeypatch):
    """sweep_dir as a URL (the nodes of a cluster share no folder): the trials' run directories, the shared fold
    stage, Ray Tune's own state and the report are objects under it; nothing is left in the working directory."""
    import csv
    import io

    import yaml

    from noisymix.launch.sweep import open_sweep
    from noisymix.launch.tune_spec import SweepSpecError, parse_sweep

    url, _ = s3_digits
    monkeypatch.setenv("NOISYMIX_CACHE", str(tmp_path / "cache"))
    sweep = "s3://nmx-runs/sweeps/alpha"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "alpha", "sweep_dir": sweep, "scheduler": "fifo", "max_concurrent": 1,
        "base": {"data_dir": url, "method": "selectmix", "epochs": 1, "num_shards": 4, "folds": 2, "fold_epochs": 1},
        "space": {"alpha": {"grid": [0.5, 2.0]}}}))
    work = tmp_path / "work"
    work.mkdir()
    out = finish(["tune", str(spec)], work)
    assert f"wrote {sweep}/trials.csv" in out, out
    table = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{sweep}/trials.csv").decode())))
    assert [row["status"] for row in table] == ["finished"] * 2, table
    assert len({row["fold_stage"] for row in table}) == 1 and table[0]["fold_stage"], "one fold stage, shared"
    files = storage.list_files(sweep)
    assert {"spec.yaml", "best.yaml", "sweep.md", "val_vs_test.png"} <= set(files)
    assert sum(name.endswith("/run/summary.json") for name in files) == 2
    assert f"folds/{table[0]['fold_stage']}/oof.npz" in files and any(name.startswith("tune/") for name in files)
    assert yaml.safe_load(storage.read_bytes(f"{sweep}/best.yaml"))["alpha"] in (0.5, 2.0)
    assert list(work.iterdir()) == [], "no local sweep folder"
    other = yaml.safe_load(spec.read_text().replace("2.0", "3.0"))
    with pytest.raises(SweepSpecError, match=f"sweep_dir {sweep} holds a sweep of another spec"):
        open_sweep(parse_sweep(other), print)


def test_an_oof_file_in_the_store_is_mapped_from_one_local_copy_per_version(s3_endpoint, tmp_path, monkeypatch):
    """oof_from / clean_from as a URL: the N x C table is downloaded once to the local cache and mapped from there
    (read whole it would sit on the heap twice, as bytes and as the array); a new version replaces the copy."""
    from test_out_of_fold_file import probabilities

    from noisymix.distributed.artifacts import read_out_of_fold, write_out_of_fold

    monkeypatch.setenv("NOISYMIX_CACHE", str(tmp_path / "cache"))
    url = "s3://nmx-runs/tables/oof.npz"
    probs, given = probabilities(300, 6), np.arange(300) % 6
    write_out_of_fold(tmp_path / "oof.npz", probs, given)
    storage.upload(tmp_path / "oof.npz", url)
    arrays = read_out_of_fold(url)
    copies = list((tmp_path / "cache" / "tables").iterdir())
    assert len(copies) == 1 and str(arrays["probs"].base.filename) == str(copies[0].resolve())
    assert np.array_equal(arrays["probs"], probs) and np.array_equal(arrays["given"], given)
    stamp = copies[0].stat().st_mtime_ns
    assert np.array_equal(read_out_of_fold(url)["probs"], probs)
    assert list((tmp_path / "cache" / "tables").iterdir()) == copies and copies[0].stat().st_mtime_ns == stamp

    other = tmp_path / "cache" / "tables" / (copies[0].name.split(".npz.")[0] + ".npz.old.1-2")
    other.write_bytes(b"another URL's copy")   # s3://nmx-runs/tables/oof.npz.old's, at some version
    newer, newer_given = probabilities(400, 6, seed=1), np.arange(400) % 6
    write_out_of_fold(tmp_path / "oof.npz", newer, newer_given)
    storage.upload(tmp_path / "oof.npz", url)
    assert np.array_equal(read_out_of_fold(url)["probs"], newer)
    assert len(list((tmp_path / "cache" / "tables").iterdir())) == 2 and not copies[0].exists() and other.exists()
    with pytest.raises(SelectionError, match="cannot read out-of-fold predictions from s3://nmx-runs/tables/absent"):
        read_out_of_fold("s3://nmx-runs/tables/absent.npz")
