"""Driver side of a training run: start Ray, fit a TorchTrainer, stream its epoch records back live."""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue

from noisymix.distributed.settings import ResourcesSection
from noisymix.distributed.worker import WorkerJob, train_loop


def start_ray(address: str | None = None, show_logs: bool = False) -> None:
    """Join `address` (e.g. "auto" on a cluster) or start a local Ray; any dashboard binds to localhost.

    Workers' and actors' own output reaches the console only with show_logs: Ray Train logs every
    report there, which buries the progress lines. Failures still surface as exceptions from fit().
    """
    if ray.is_initialized():
        return
    if address is None:
        # Ray Train's controller polls workers every 2 s by default, and a report waits for the
        # previous one to be taken: that paces every epoch shorter than 2 s (the digits job).
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ray.init(address=address, dashboard_host="127.0.0.1", logging_level="WARNING", log_to_driver=show_logs)


def worker_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> tuple[float, int]:
    """(CPUs reserved per worker, torch threads per worker); cpus_per_worker=0 shares the cluster's CPUs."""
    if cpus_per_worker <= 0:
        total = ray.cluster_resources().get("CPU", 1.0)
        cpus_per_worker = 1.0 if use_gpu else max(1.0, float(int(total // num_workers)))
    return cpus_per_worker, max(1, int(cpus_per_worker))


def run_trainer(job: WorkerJob, resources: ResourcesSection, run_dir: Path, on_message: Callable[[object], None],
                name: str) -> ray.train.Result:
    """Fit the training loop on resources.num_workers workers; each message a worker sends goes to on_message.

    A second call with the same run_dir and `name` resumes the first from its latest checkpoint
    (Ray Train's run snapshot): that is how a run continues after a selection between segments.

    fit() runs in a thread while this thread drains the message queue, so the driver prints progress
    and writes metrics as epochs finish. A worker group restarted after a failure resumes from the
    latest checkpoint (FailureConfig), and may send an epoch twice: consumers keep the last copy.
    """
    cpus, threads = worker_resources(resources.num_workers, resources.cpus_per_worker, resources.use_gpu)
    channel = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=dataclasses.replace(job, channel=channel, threads=threads,
                                              loader_workers=resources.loader_workers),
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(run_dir).resolve() / "ray"),
            failure_config=FailureConfig(max_failures=resources.max_failures),
            # The latest checkpoint is always kept too, so this holds the val-selected one and the resume point.
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_acc",
                                               checkpoint_score_order="max"),
            logging_config=LoggingConfig(log_level="INFO" if resources.ray_logs else "WARNING"),
        ),
    )
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread, re-raised there
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="noisymix-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not channel.empty():
            try:
                on_message(channel.get(timeout=0.5))
            except (Empty, queue.Empty):
                continue
    finally:
        thread.join()
        channel.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]

