"""Which errors end a command with one line (bad input, a file system, a diverging run, a lost worker), and
that line; anything else is a bug, whose traceback is wanted."""

from __future__ import annotations


def known_errors() -> tuple[type[BaseException], ...]:
    """The library's own input errors (imported here, when an error is being reported)."""
    from noisymix.distributed.index_actor import NeighbourIndexError
    from noisymix.distributed.models import PretrainedError
    from noisymix.distributed.runner import ResourceError
    from noisymix.distributed.shards import SharedMemoryError, ShardError
    from noisymix.launch.bench_spec import SpecError
    from noisymix.launch.noise import NoiseError
    from noisymix.launch.sources import SourceError
    from noisymix.launch.tune_spec import SweepSpecError
    from noisymix.mixing.config import ConfigError
    from noisymix.selection.crossval import SelectionError

    return (ConfigError, NoiseError, SourceError, ShardError, SelectionError, SpecError, PretrainedError, ResourceError,
            NeighbourIndexError, SweepSpecError, SharedMemoryError)


def root_cause(exc: BaseException) -> BaseException:
    """Ray wraps a worker's exception (TrainingFailedError -> WorkerGroupError -> the worker's own)."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        return root_cause(next(iter(failures.values())))
    cause = exc.__cause__
    return root_cause(cause) if cause is not None and cause is not exc else exc


def one_line(exc: BaseException) -> str | None:
    """The one-line message of an error a user or the machine causes (bad input, a file system, a diverging
    run, a lost worker); None for anything else (a bug: its traceback is wanted)."""
    cause = root_cause(exc)
    for error in (exc, cause):
        if isinstance(error, known_errors()):
            return str(error)
        if isinstance(error, OSError) and error.strerror:
            where = f": {error.filename}" if error.filename else ""
            return f"{error.strerror}{where}"
        if isinstance(error, FloatingPointError):
            return f"the run diverged: {error}"
    if _is_lost_worker(cause):
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        return (f"a Ray worker or task died and its retries (max_failures, fold_retries) are used up: "
                f"{type(cause).__name__}: {first[:300]}")
    return None


def unnamed_file_error(exc: BaseException) -> OSError | None:
    """The file-system error behind `exc` when it names no file (pyarrow's, in Ray Train's checkpoint copy)."""
    cause = root_cause(exc)
    return cause if isinstance(cause, OSError) and cause.filename is None and not isinstance(
        cause, (ConnectionError, TimeoutError)) else None


def _is_lost_worker(error: BaseException) -> bool:
    """A worker process that died (killed, out of memory, its node lost), as Ray reports it."""
    import ray.exceptions

    return isinstance(error, (ray.exceptions.ActorDiedError, ray.exceptions.WorkerCrashedError,
                              ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError))


