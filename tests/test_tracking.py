"""Experiment tracking: TensorBoard scalars per epoch (nested metrics by path), the config as text, curves.png."""

import threading

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from noisymix.distributed.artifacts import RunDir
from noisymix.launch.tracking import TENSORBOARD, TensorBoardLog, plot_curves, scalars

RECORDS = [{"epoch": e, "phase": "mixup", "train_loss": 2.0 - e / 2, "val_acc": 0.3 + e / 10, "test_acc": 0.5 + e / 10,
            "detection": {"f1": 0.6 + e / 100, "auroc": 0.8}, "resumed": False} for e in range(3)]


def test_every_number_of_a_record_is_a_scalar_named_by_its_path():
    assert scalars(RECORDS[1]) == {"train_loss": 1.5, "val_acc": 0.4, "test_acc": 0.6, "detection/f1": 0.61,
                                   "detection/auroc": 0.8}


def test_a_run_writes_event_files_tensorboard_reads_back_and_its_curves(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    log = TensorBoardLog(run)
    for record in RECORDS:
        log.epoch(record)
    log.close({"method": "mixnn", "lr": 0.05}, {"main_training": 12.5})
    events = EventAccumulator(str(tmp_path / "run" / TENSORBOARD))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("val_acc")] == [(1, 0.3), (2, 0.4), (3, 0.5)]
    assert [round(e.value, 4) for e in events.Scalars("detection/f1")] == [0.6, 0.61, 0.62]
    assert events.Scalars("stage_time_s/main_training")[0].value == 12.5
    assert "lr: 0.05" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    plot_curves(RECORDS, tmp_path / "curves.png", "mixnn on digits")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def mlflow_store(tmp_path, monkeypatch):
    """A local SQLite store in tmp_path (its artefacts go to ./mlruns: the working directory is tmp_path too)."""
    monkeypatch.chdir(tmp_path)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(uri)


def logged_runs(client):
    return client.search_runs([client.get_experiment_by_name("noisymix").experiment_id])


def test_mlflow_tracking_logs_params_metrics_and_artefacts_to_a_local_store(tmp_path, monkeypatch):
    from noisymix.launch.tracking import MLflowLog

    uri, client = mlflow_store(tmp_path, monkeypatch)
    run = RunDir(tmp_path / "run")
    run.create()
    (tmp_path / "run" / "summary.json").write_text('{"test_acc": 0.9}')
    log = MLflowLog(run, {"method": "mixnn", "lr": 0.05, "tracking": "mlflow"}, uri)
    # Ray Train hands the driver its workers' records on another thread: still the same MLflow run.
    for record in RECORDS:
        thread = threading.Thread(target=log.epoch, args=(record,))
        thread.start()
        thread.join()
    log.close({}, {"main_training": 12.5})
    [logged] = logged_runs(client)
    assert logged.info.run_name == "run" and logged.info.status == "FINISHED"
    assert logged.data.params["lr"] == "0.05" and logged.data.tags["run_dir"] == str(tmp_path / "run")
    history = client.get_metric_history(logged.info.run_id, "val_acc")
    assert [(m.step, round(m.value, 4)) for m in history] == [(1, 0.3), (2, 0.4), (3, 0.5)]
    assert logged.data.metrics["detection/f1"] == 0.62 and logged.data.metrics["stage_time_s/main_training"] == 12.5
    assert sorted(a.path for a in client.list_artifacts(logged.info.run_id)) == ["summary.json"]


def test_an_interrupted_run_ends_its_mlflow_run_killed_and_its_resume_continues_it(tmp_path, monkeypatch):
    from noisymix.launch.tracking import MLflowLog, abandon

    uri, client = mlflow_store(tmp_path, monkeypatch)
    run = RunDir(tmp_path / "run")
    run.create()
    first = MLflowLog(run, {"method": "ce", "num_workers": 2}, uri)
    first.epoch(RECORDS[0])
    abandon([first], KeyboardInterrupt())
    [logged] = logged_runs(client)
    assert logged.info.status == "KILLED"
    # The resume may run on other resources (num_workers differs): the run's parameters stay as first logged.
    resumed = MLflowLog(run, {"method": "ce", "num_workers": 1}, uri)
    assert resumed.run_id == first.run_id and client.get_run(first.run_id).info.status == "RUNNING"
    resumed.epoch(RECORDS[1])
    abandon([resumed], RuntimeError("a worker died"))
    [logged] = logged_runs(client)
    assert logged.info.status == "FAILED" and logged.data.params["num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(first.run_id, "val_acc")] == [1, 2]


def test_tracking_takes_known_trackers_only():
    import pytest

    from noisymix.launch.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="tracking='wandb' is not one of tensorboard, mlflow"):
        build_config(overrides={"tracking": "wandb"})
