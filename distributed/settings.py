"""The config sections of how a run executes (resources) and what it checks on itself (audits).

Read by the Ray driver and workers; kept free of Ray so that composing a config (launch.config) stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from noisymix.mixing.config import ConfigError, Section, check_range

GPU_LOADER_WORKERS = 4
# glibc ignores an mmap threshold above 32 MB on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
MAX_HEAP_THRESHOLD_KB = 32 * 1024


@dataclass
class ResourcesSection(Section):
    """Where and on what the run executes: Ray's address, the workers and what each reserves."""

    num_workers: int = 1           # or MIN-MAX / [MIN, MAX]: an elastic worker group (sets min_workers)
    min_workers: int = 0           # elastic: 0 means fixed at num_workers; else run on MIN..num_workers workers
    resize_check_s: float = 60.0   # elastic: how often a healthy group looks for more resources to grow into
    use_gpu: bool = False
    cpus_per_worker: float = 0.0   # 0: share the cluster's CPUs evenly
    loader_workers: int = -1       # decoding processes per worker; -1: on a GPU the worker's CPUs less one (at least 4)
    max_failures: int = 1
    ray_address: Optional[str] = None
    ray_logs: bool = False
    wait_for_resources: bool = False   # an autoscaling cluster: wait (visibly) for what it lacks, instead of stopping
    heap_mmap_threshold_kb: int = 0    # glibc malloc in the run's Ray processes; 0: as the environment leaves it

    @classmethod
    def from_values(cls, values: Mapping[str, object]):
        """num_workers=MIN-MAX (or a two-item list) is the elastic form of min_workers=MIN num_workers=MAX."""
        values = dict(values)
        if isinstance(values.get("num_workers"), (str, list, tuple)):
            values["min_workers"], values["num_workers"] = worker_range(values["num_workers"])
        return super().from_values(values)

    @property
    def elastic(self) -> bool:
        return 0 < self.min_workers < self.num_workers

    def validate(self) -> None:
        super().validate()
        check_range("num_workers", self.num_workers, 1)
        check_range("min_workers", self.min_workers, 0, self.num_workers)
        check_range("resize_check_s", self.resize_check_s, 0)
        for key in ("cpus_per_worker", "max_failures"):
            check_range(key, getattr(self, key), 0)
        check_range("loader_workers", self.loader_workers, -1)
        check_range("heap_mmap_threshold_kb", self.heap_mmap_threshold_kb, 0, MAX_HEAP_THRESHOLD_KB)

    def heap_env(self) -> dict[str, str]:
        """glibc's mmap and trim thresholds, fixed at heap_mmap_threshold_kb for every process of the run (Ray's
        job environment, read as each process starts; a Ray this process already joined keeps its own). By default
        glibc raises the mmap threshold towards 32 MB each time a large block is freed, and then keeps the freed heap
        under it: a SelectMix worker's and fold task's peak grew by 70-120 MB from 20k to 80k samples; fixed at 128
        KB they stay flat, but every large block is then mapped afresh, and CPU training steps ran at 0.75x
        (benchmarks/results/rss_breakdown*.md, heap_threshold.md). So it stays off unless memory is what binds."""
        if not self.heap_mmap_threshold_kb:
            return {}
        value = str(self.heap_mmap_threshold_kb * 1024)
        return {"MALLOC_MMAP_THRESHOLD_": value, "MALLOC_TRIM_THRESHOLD_": value}

    def resolve(self, num_shards: int) -> None:
        """loader_workers=-1: none on CPU (the worker's threads decode); on a GPU the CPUs the worker reserves less
        the training process's one, at least GPU_LOADER_WORKERS, and no more than each worker's share of the
        shards (a loader process reads whole shards). One H200 took 4,700 ResNet-50 images/s at 224 px, and each
        loader process fed about 400-550 (benchmarks/results/gpu_check.md)."""
        if self.loader_workers == -1:
            wanted = max(GPU_LOADER_WORKERS, int(self.cpus_per_worker) - 1)
            self.loader_workers = min(wanted, max(1, num_shards // self.num_workers)) if self.use_gpu else 0


def worker_range(value) -> tuple[int, int]:
    """(MIN, MAX) from "MIN-MAX" or [MIN, MAX]."""
    parts = value.split("-") if isinstance(value, str) else list(value)
    try:
        low, high = (int(str(part).strip()) for part in parts)
    except ValueError:
        low = high = None
    if low is None or not 1 <= low <= high:
        raise ConfigError(f"num_workers must be a number, MIN-MAX or [MIN, MAX] with 1 <= MIN <= MAX, got {value!r}")
    return low, high


@dataclass
class AuditSection(Section):
    """Checks a run can carry out on itself: send each rank's trained ids per epoch (audit_ids.npz, the
    exactly-once guarantee) and a digest of each rank's per-sample state after every refresh."""

    audit_ids: bool = False
    audit_state: bool = False
