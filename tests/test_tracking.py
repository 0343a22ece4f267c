"""Experiment tracking: TensorBoard scalars per epoch (nested metrics by path), the config as text, curves.png."""

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
