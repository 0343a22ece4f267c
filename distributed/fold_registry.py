"""Fold stages shared by the trials of a sweep: the first trial that needs a fold key's out-of-fold table
trains its K folds; trials that need the same key meanwhile wait for it, and later ones read its file."""

from __future__ import annotations

import time
from collections.abc import Callable

import ray

WAIT_POLL_S = 2.0


@ray.remote(num_cpus=0)
class FoldStageRegistry:
    """Which fold keys some trial is training now. What is finished is the table file itself (it outlives the
    actor: a resumed sweep finds it)."""

    def __init__(self):
        self.running: set[str] = set()

    def claim(self, key: str, finished: bool) -> str:
        """"use" the finished table, "run" the stage (this caller now owns it), or "wait" for its owner."""
        if finished:
            return "use"
        if key in self.running:
            return "wait"
        self.running.add(key)
        return "run"

    def release(self, key: str) -> None:
        """The owner finished the stage, or failed: in that case the next claim runs it again."""
        self.running.discard(key)


def shared_stage(registry, key: str, finished: Callable[[], bool], run_stage: Callable[[], None], log) -> bool:
    """Make sure the fold stage `key` has run once; returns whether this caller ran it."""
    waited = False
    while True:
        verdict = ray.get(registry.claim.remote(key, finished()))
        if verdict == "use":
            return False
        if verdict == "run":
            try:
                if finished():   # its owner wrote the table between this caller's look and its claim
                    return False
                run_stage()
            finally:
                ray.get(registry.release.remote(key))
            return True
        if not waited:
            log(f"fold stage {key}: another trial is training it; waiting for its out-of-fold table")
            waited = True
        time.sleep(WAIT_POLL_S)
