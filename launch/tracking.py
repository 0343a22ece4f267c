"""Experiment tracking of a run: TensorBoard event files and curves.png in its run directory. A sweep's trials
keep theirs in their own run directories, so `tensorboard --logdir SWEEP_DIR` shows them side by side."""

from __future__ import annotations

import json
import numbers
import time
from pathlib import Path

import yaml

from noisymix.distributed.artifacts import RunDir, write_json_atomic

TENSORBOARD, CURVES, MLFLOW_RUN = "tensorboard", "curves.png", "mlflow.json"


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """Every number of a record, nested ones named by path (detection/f1); the epoch itself is the step."""
    found = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(scalars(value, f"{name}/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and key != "epoch":
            found[name] = float(value)
    return found


class TensorBoardLog:
    """Writes each epoch record's numbers as scalars (step = epochs done), and at the end the stage times and
    the config as text. The event files live in the run's local folder (its working copy for a URL run, uploaded
    when the run closes)."""

    def __init__(self, run: RunDir):
        self.run, self.writer = run, None

    def _open(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run.path / TENSORBOARD))
        return self.writer

    def epoch(self, record: dict) -> None:
        writer = self._open()
        for name, value in scalars(record).items():
            writer.add_scalar(name, value, global_step=record["epoch"] + 1)
        writer.flush()

    def close(self, config: dict, stage_times: dict | None = None) -> None:
        writer = self._open()
        writer.add_text("config", "\n".join(f"    {line}" for line in yaml.safe_dump(config).splitlines()))
        for stage, seconds in (stage_times or {}).items():
            writer.add_scalar(f"stage_time_s/{stage}", seconds)
        writer.close()
        self._upload()

    def abandon(self, interrupted: bool) -> None:
        """A run that stops early keeps the epochs it logged."""
        if self.writer is not None:
            self.writer.close()
            self._upload()

    def _upload(self) -> None:
        for path in sorted((self.run.path / TENSORBOARD).glob("*")):
            self.run.written(f"{TENSORBOARD}/{path.name}")


class MLflowLog:
    """`tracking=mlflow`: the run's config as parameters, each epoch's numbers as metrics (step = epochs done), and
    its output files as artefacts, in an MLflow run named after the run directory (experiment `noisymix`).

    Every call names the MLflow run by id (MlflowClient), never MLflow's active run: that is thread-local, and a
    metric logged from another thread would open a second run. A resumed run directory continues its MLflow run
    (mlflow.json holds its id); a run that fails or is interrupted ends its MLflow run FAILED or KILLED."""

    ARTEFACTS = ("config.yaml", "summary.json", "metrics.jsonl", "label_issues.csv", "curves.png")
    EXPERIMENT = "noisymix"

    def __init__(self, run: RunDir, config: dict, uri: str | None):
        from mlflow.tracking import MlflowClient

        self.run = run
        # MLflow 3 refuses its old folder store unless told otherwise: the local default is a SQLite file.
        self.uri = uri or f"sqlite:///{Path('mlflow.db').resolve()}"
        self.client = MlflowClient(self.uri)
        self.run_id = self._resumed() or self._started(config)

    def _resumed(self) -> str | None:
        """The MLflow run this run directory logged to before it was interrupted, in the same store."""
        from mlflow.exceptions import MlflowException

        if not self.run.exists(MLFLOW_RUN):
            return None
        known = json.loads((self.run / MLFLOW_RUN).read_text())
        if known.get("uri") != self.uri:
            return None
        try:
            self.client.update_run(known["run_id"], status="RUNNING")
        except MlflowException:   # deleted from the store since: log to a new run
            return None
        return known["run_id"]

    def _started(self, config: dict) -> str:
        from mlflow.entities import Param

        experiment = self.client.get_experiment_by_name(self.EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.EXPERIMENT)
        run_id = self.client.create_run(experiment_id, run_name=Path(self.run.location).name,
                                        tags={"run_dir": self.run.location}).info.run_id
        # MLflow caps a parameter value at 6000 characters; a config value is far below it.
        self.client.log_batch(run_id, params=[Param(key, str(value)) for key, value in config.items()])
        write_json_atomic(self.run.path / MLFLOW_RUN, {"uri": self.uri, "run_id": run_id})
        self.run.written(MLFLOW_RUN)
        return run_id

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])

    def epoch(self, record: dict) -> None:
        self._metrics(scalars(record), record["epoch"] + 1)

    def close(self, config: dict, stage_times: dict | None = None) -> None:
        self._metrics({f"stage_time_s/{k}": v for k, v in (stage_times or {}).items()}, 0)
        for name in self.ARTEFACTS:
            if (self.run.path / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run.path / name))
        self.client.set_terminated(self.run_id, "FINISHED")

    def abandon(self, interrupted: bool) -> None:
        self.client.set_terminated(self.run_id, "KILLED" if interrupted else "FAILED")


def trackers(run: RunDir, config: dict) -> list:
    """TensorBoard always; MLflow too with tracking=mlflow."""
    found = [TensorBoardLog(run)]
    if config.get("tracking") == "mlflow":
        found.append(MLflowLog(run, config, config.get("tracking_uri")))
    return found


def abandon(tracked: list, exc: BaseException) -> None:
    """End each tracker of a run that stopped early (KILLED for an interruption, FAILED otherwise). Best effort:
    the error that stopped the run is the one to report."""
    for tracker in tracked:
        try:
            tracker.abandon(isinstance(exc, KeyboardInterrupt))
        except Exception:
            pass


def plot_curves(records: list[dict], path: Path, title: str) -> None:
    """Noisy-validation and test accuracy per epoch, with the training loss on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in records]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(epochs, [r["val_acc"] for r in records], label="noisy validation accuracy")
    axes.plot(epochs, [r["test_acc"] for r in records], label="test accuracy")
    axes.set_xlabel("epoch")
    axes.set_ylabel("accuracy")
    loss = axes.twinx()
    loss.plot(epochs, [r["train_loss"] for r in records], color="grey", linestyle=":", label="training loss")
    loss.set_ylabel("training loss")
    axes.set_title(title)
    lines = axes.get_legend_handles_labels()
    extra = loss.get_legend_handles_labels()
    axes.legend(lines[0] + extra[0], lines[1] + extra[1], loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
