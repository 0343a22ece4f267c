"""What a training worker sends the driver through the run's queue: plain dataclasses of numbers and numpy arrays.

They import nothing heavier than numpy on purpose: the queue actor unpickles every message, and a message type
that lived beside the training loop made that actor import torch and the whole training stack (seconds of CPU
and hundreds of MB on the head node, per run)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class EpochRecord:
    """One epoch's line of metrics.jsonl (rank 0)."""

    metrics: dict


@dataclass
class StateSnapshot:
    """Per-sample beliefs after a refresh, one rank's home range from id `start`: given label, argmax of the
    soft target, clean probability (the driver joins the ranks' parts)."""

    epoch: int
    given: np.ndarray
    corrected: np.ndarray
    clean: np.ndarray
    start: int = 0
    world: int = 1

    @classmethod
    def join(cls, parts: list["StateSnapshot"]) -> "StateSnapshot":
        """The ranks' parts of one refresh as one snapshot in id order."""
        parts = sorted(parts, key=lambda part: part.start)
        return cls(parts[0].epoch, *(np.concatenate([getattr(p, key) for p in parts])
                                     for key in ("given", "corrected", "clean")))


@dataclass
class TrainedIds:
    """audit_ids: the ids one rank trained on in one epoch."""

    epoch: int
    rank: int
    ids: np.ndarray


@dataclass
class StateDigest:
    """audit_state: a digest of one rank's home rows [start, stop) of the per-sample state after a refresh."""

    epoch: int
    rank: int
    start: int
    stop: int
    digest: str
