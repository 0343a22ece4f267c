"""Driver side of a training run: start Ray, fit a TorchTrainer, stream its epoch records back live."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable

import ray
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from noisymix.distributed.settings import ResourcesSection
from noisymix.mixing.config import ConfigError
from noisymix.distributed.worker import JOB_KEY, WorkerJob, train_loop
from noisymix.mixing.method import TaskAsk


def start_ray(address: str | None = None, show_logs: bool = False, env_vars: dict[str, str] | None = None) -> None:
    """Join `address` (e.g. "auto" on a cluster; without one, Ray's RAY_ADDRESS if set), else start a local Ray of
    this run's own, also where `ray start` left a cluster running on this machine (ray.init would join that one,
    while the State API address below would name this run's); any dashboard binds to localhost. `env_vars` reach
    every worker process of this driver's job, from its start (ResourcesSection.heap_env: glibc reads its MALLOC_
    variables once, as a process starts).

    Workers' and actors' own output reaches the console only with show_logs: Ray Train logs every
    report there, which buries the progress lines. Failures still surface as exceptions from fit().
    """
    if ray.is_initialized():
        joined = ray.get_runtime_context().runtime_env.get("env_vars") or {}
        differing = sorted(k for k, v in (env_vars or {}).items() if joined.get(k) != v)
        if differing:
            raise ConfigError(f"{', '.join(differing)} cannot change for a Ray this process already joined (its "
                              "processes read them as they start): run with these settings in a process of its own")
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    # Ray Train's controller polls its workers every 2 s by default, and each step of a run (the group started, a
    # report taken, the group finished) waits for a poll: that paces every epoch shorter than 2 s and adds seconds
    # to every run's start and end (a 2-epoch digits run on a running cluster: 31 s at 2 s, 22 s at 0.5 s). Ray Train
    # passes the variable from the driver to its controller, on a cluster it joins too.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    dashboard = {}
    if address == "local":
        dashboard["dashboard_port"] = own_state_api()
    ray.init(address=address, dashboard_host="127.0.0.1", logging_level="WARNING", log_to_driver=show_logs,
             runtime_env={"env_vars": env_vars} if env_vars else None, **dashboard)
    forward_sigterm_as_sigint()   # after ray.init, whose own SIGTERM handler aborts the process


def own_state_api() -> int:
    """A free port for a local cluster's dashboard, named in RAY_API_SERVER_ADDRESS for every process the
    cluster starts (they inherit this environment). Ray Train's placement-group cleaner asks the State API
    whether a controller is alive; with a second Ray instance on the machine it cannot tell which cluster to
    ask, its monitor dies, and a trial that Tune stops keeps its workers' CPUs reserved (the sweep waits forever)."""
    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return port


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no process holds now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool,
                     reserved: float = 0.0) -> tuple[float, int]:
    """(CPUs reserved per worker, torch threads per worker); cpus_per_worker=0 shares the cluster's CPUs, less
    what runs alongside the workers (`reserved`: the index actor's)."""
    if cpus_per_worker <= 0:
        total = ray.cluster_resources().get("CPU", 1.0) - reserved
        cpus_per_worker = 1.0 if use_gpu else max(1.0, float(int(total // num_workers)))
    return cpus_per_worker, max(1, int(cpus_per_worker))


def alongside_cpus(tasks: list[TaskAsk]) -> float:
    return sum(task.cpus for task in tasks if task.alongside)


class ResourceError(RuntimeError):
    """A request the cluster cannot place: asked against available, named."""


def check_resources(resources: ResourcesSection, tasks: list[TaskAsk], log, poll_s: float = 10.0) -> None:
    """Refuse within seconds what the cluster cannot place, instead of waiting on it silently: the worker group
    (num_workers x its CPUs and GPUs) together with what runs alongside it (the index actor), and each task
    that runs between training segments (a fold task). With wait_for_resources the driver waits, saying what
    it waits for, until the cluster grows."""
    while True:
        total = ray.cluster_resources()
        cpus, _ = worker_resources(resources.num_workers, resources.cpus_per_worker, resources.use_gpu,
                                   alongside_cpus(tasks))
        least = resources.min_workers if resources.elastic else resources.num_workers
        group = [TaskAsk(f"{'min_workers' if resources.elastic else 'num_workers'}={least} x {cpus:g} "
                         f"CPU{'s' * (cpus != 1)}", least * cpus, least * float(resources.use_gpu))]
        group += [task for task in tasks if task.alongside]
        asks = [TaskAsk(" with ".join(task.what for task in group), sum(task.cpus for task in group),
                        sum(task.gpus for task in group))] + [task for task in tasks if not task.alongside]
        short = [task for task in asks
                 if task.cpus > total.get("CPU", 0.0) + 1e-9 or task.gpus > total.get("GPU", 0.0) + 1e-9]
        if not short:
            return
        task = short[0]
        message = (f"{task.what} needs {task.cpus:g} CPUs and {task.gpus:g} GPUs; the cluster has "
                   f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs")
        if not resources.wait_for_resources:
            raise ResourceError(f"{message}: ask for less, or set wait_for_resources=true on an autoscaling cluster")
        log(f"waiting for resources: {message} (wait_for_resources=true; Ctrl-C stops)")
        time.sleep(poll_s)


def run_trainer(job: WorkerJob, resources: ResourcesSection, storage_path: str,
                on_message: Callable[[object], None], name: str) -> ray.train.Result:
    """Fit the training loop on resources.num_workers workers (min_workers..num_workers when elastic: Ray Train
    restarts a group that lost a worker with those left, and grows it when the cluster does); each message a
    worker sends goes to on_message.

    A second call with the same storage_path (a folder or a URL) and `name` resumes the first from its latest checkpoint
    (Ray Train's run snapshot): that is how a run continues after a selection between segments, and after
    an interruption.

    A thread drains the message queue while fit() runs, so the driver prints progress and writes metrics as
    epochs finish. A worker group restarted after a failure resumes from the latest checkpoint
    (FailureConfig), and may send an epoch twice: consumers keep the last copy.
    """
    cpus, threads = worker_resources(resources.num_workers, resources.cpus_per_worker, resources.use_gpu,
                                     alongside_cpus(job.method.task_resources()))
    # On the driver's node, like Ray Train's controller: losing another node must not lose the records.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    channel = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    # The job reaches the workers through the object store: Ray Train's controller unpickles the loop's config,
    # and a WorkerJob there would make it import the whole training stack (seconds of CPU per run) to pass it on.
    job_ref = ray.put(dataclasses.replace(job, channel=channel, threads=threads,
                                          loader_workers=resources.loader_workers))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={JOB_KEY: job_ref},
        scaling_config=ScalingConfig(
            num_workers=(resources.min_workers, resources.num_workers) if resources.elastic else resources.num_workers,
            use_gpu=resources.use_gpu, resources_per_worker={"CPU": cpus},
            elastic_resize_monitor_interval_s=resources.resize_check_s),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=resources.max_failures),
            # The latest checkpoint is always kept too, so this holds the val-selected one and the resume point.
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_acc",
                                               checkpoint_score_order="max"),
            logging_config=LoggingConfig(log_level="INFO" if resources.ray_logs else "WARNING"),
        ),
    )
    done = threading.Event()

    def drain():
        while not (done.is_set() and channel.empty()):
            try:
                on_message(channel.get(timeout=0.5))
            except (Empty, queue.Empty):
                continue

    drainer = threading.Thread(target=drain, name="noisymix-records", daemon=True)
    drainer.start()
    try:
        # In the main thread, Ray Train installs its Ctrl-C handler: the first SIGINT aborts the worker
        # group gracefully (fit() then raises SystemExit); the latest checkpoint stays for a resume.
        with callers_interrupt_handler():
            return trainer.fit()
    except SystemExit as exc:
        raise TrainingInterrupted("training was interrupted (Ctrl-C or SIGTERM)") from exc
    finally:
        done.set()
        drainer.join()
        channel.shutdown()


@contextlib.contextmanager
def callers_interrupt_handler():
    """The SIGINT handler as it was before the block, whatever the block installs. Ray Train's fit() leaves its
    Ctrl-C handler installed after the run, aimed at that run's finished controller: the process's next Ctrl-C
    or SIGTERM (a bench between cells, a sweep's driver) would go there and be swallowed."""
    saved = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if saved is not None:
            signal.signal(signal.SIGINT, saved)


class TrainingInterrupted(KeyboardInterrupt):
    """The user stopped the run (SIGINT, or SIGTERM forwarded as SIGINT); checkpoints are kept."""


def forward_sigterm_as_sigint() -> None:
    """A scheduler's SIGTERM stops a run the way Ctrl-C does (Ray Train's graceful abort)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm_as_interrupt)


def sigterm_as_interrupt(signum, frame) -> None:
    """Run the SIGINT handler in place; where SIGINT has none (a shell starts background jobs with SIGINT ignored,
    so `nohup noisymix ... &` then `kill` would otherwise do nothing), raise KeyboardInterrupt as Ctrl-C would."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)
