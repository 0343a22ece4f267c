"""The config sections of how a run executes (resources) and what it checks on itself (audits).

Read by the Ray driver and workers; kept free of Ray so that composing a config (launch.config) stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from noisymix.mixing.config import Section, check_range

GPU_LOADER_WORKERS = 4


@dataclass
class ResourcesSection(Section):
    """Where and on what the run executes: Ray's address, the workers and what each reserves."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.0   # 0: share the cluster's CPUs evenly
    loader_workers: int = -1       # decoding processes per worker; -1: 4 with a GPU, none on CPU
    max_failures: int = 1
    ray_address: Optional[str] = None
    ray_logs: bool = False

    def validate(self) -> None:
        super().validate()
        check_range("num_workers", self.num_workers, 1)
        for key in ("cpus_per_worker", "max_failures"):
            check_range(key, getattr(self, key), 0)
        check_range("loader_workers", self.loader_workers, -1)

    def resolve(self) -> None:
        if self.loader_workers == -1:
            self.loader_workers = GPU_LOADER_WORKERS if self.use_gpu else 0


@dataclass
class AuditSection(Section):
    """Checks a run can carry out on itself: send each rank's trained ids per epoch (audit_ids.npz, the
    exactly-once guarantee) and a digest of each rank's per-sample state after every refresh."""

    audit_ids: bool = False
    audit_state: bool = False
