"""Experiment tracking of a run: TensorBoard event files and curves.png in its run directory. A sweep's trials
keep theirs in their own run directories, so `tensorboard --logdir SWEEP_DIR` shows them side by side."""

from __future__ import annotations

import numbers
from pathlib import Path

import yaml

from noisymix.distributed.artifacts import RunDir

TENSORBOARD, CURVES = "tensorboard", "curves.png"


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
        for path in sorted((self.run.path / TENSORBOARD).glob("*")):
            self.run.written(f"{TENSORBOARD}/{path.name}")


class MLflowLog:
    """`tracking=mlflow`: the run's config as parameters, each epoch's numbers as metrics (step = epochs done), and
    its output files as artefacts, in an MLflow run named after the run directory (experiment `noisymix`)."""

    ARTEFACTS = ("config.yaml", "summary.json", "metrics.jsonl", "label_issues.csv", "curves.png")

    def __init__(self, run: RunDir, config: dict, uri: str | None):
        import mlflow

        self.mlflow, self.run = mlflow, run
        # MLflow 3 refuses its old folder store unless told otherwise: the local default is a SQLite file.
        mlflow.set_tracking_uri(uri or f"sqlite:///{Path('mlflow.db').resolve()}")
        mlflow.set_experiment("noisymix")
        self.active = mlflow.start_run(run_name=Path(run.location).name, tags={"run_dir": run.location})
        # MLflow caps a parameter value at 6000 characters; a config value is far below it.
        mlflow.log_params({key: str(value) for key, value in config.items()})

    def epoch(self, record: dict) -> None:
        self.mlflow.log_metrics(scalars(record), step=record["epoch"] + 1)

    def close(self, config: dict, stage_times: dict | None = None) -> None:
        self.mlflow.log_metrics({f"stage_time_s/{k}": v for k, v in (stage_times or {}).items()})
        for name in self.ARTEFACTS:
            if (self.run.path / name).is_file():
                self.mlflow.log_artifact(str(self.run.path / name))
        self.mlflow.end_run()


def trackers(run: RunDir, config: dict) -> list:
    """TensorBoard always; MLflow too with tracking=mlflow."""
    found = [TensorBoardLog(run)]
    if config.get("tracking") == "mlflow":
        found.append(MLflowLog(run, config, config.get("tracking_uri")))
    return found


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
