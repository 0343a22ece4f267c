"""Where data-parallel throughput goes on this machine, without Ray or the loader in the way.

Measures training steps of the benchmark model (small CNN, batch 128, 28x28, one thread per process):
  1. one process alone;
  2. two independent processes at once (what the cores can give);
  3. two processes in plain DDP over gloo;
  4. the same with torch's Join context (what noisymix's worker uses for uneven shards).
Prints and writes benchmarks/results/ddp_overhead.json.

    python benchmarks/ddp_overhead.py [--steps 60] [--width 16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from noisymix.distributed.models import create_model
from noisymix.mixing.losses import soft_target_cross_entropy

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 10


def steps_per_second(model, optimizer, steps: int, join: bool = False) -> float:
    """Samples/s of `steps` SGD steps on a fixed random batch, after a warm-up."""
    x = torch.randn(128, 1, 28, 28)
    t = F.one_hot(torch.randint(0, 10, (128,)), 10).float()
    context = Join([model]) if join else contextlib.nullcontext()
    with context:
        for step in range(steps + WARMUP_STEPS):
            if step == WARMUP_STEPS:
                started = time.perf_counter()
            loss = soft_target_cross_entropy(model(x), t)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return steps * 128 / (time.perf_counter() - started)


def _worker(rank: int, world: int, mode: str, steps: int, width: int, port: int, results) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("small_cnn", 1, 10, 28, width)
    if mode != "independent":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    results[rank] = steps_per_second(model, optimizer, steps, join=mode == "ddp_join")
    if mode != "independent":
        dist.destroy_process_group()


def run(mode: str, world: int, steps: int, width: int, port: int) -> list[float]:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, mode, steps, width, port, results), nprocs=world)
        return [results[r] for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args()
    alone = run("independent", 1, args.steps, args.width, 0)[0]
    rows = {"one process": [alone]}
    for mode, port in (("independent", 0), ("ddp", 29531), ("ddp_join", 29532)):
        rows[f"two processes: {mode}"] = run(mode, 2, args.steps, args.width, port)
    report = {name: {"samples_per_s_per_process": rates, "total_over_one": sum(rates) / alone}
              for name, rates in rows.items()}
    for name, row in report.items():
        print(f"{name:32s} {' '.join(f'{r:7.0f}' for r in row['samples_per_s_per_process'])} samples/s/process   "
              f"{row['total_over_one']:.2f}x one process")
    out = ROOT / "benchmarks" / "results" / "ddp_overhead.json"
    out.write_text(json.dumps({"command": f"python benchmarks/ddp_overhead.py --steps {args.steps} --width {args.width}",
                               **report}, indent=2))


if __name__ == "__main__":
    main()
