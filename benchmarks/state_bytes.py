"""Per-sample state at scale: bytes per sample per rank held between epochs and the peak of a refresh, for
C = 14, 100, 1000 classes, W = 1 and 2 ranks, soft targets dense float32 or top-16 float16.

Each cell is W fresh processes joined by gloo (no Ray, no data files): each runs MixNN's refresh (pass ->
targets from their homes -> GMM on rank 0 -> EMA stored home -> working rows) over its N/W samples, twice
(the second refresh is the steady state: targets fetched, moved, stored). The pass is a fixed random network
(8 x 8 inputs -> d = 512 embeddings -> C logits): only the state's bytes are measured, not a model.
Held: the tensors of SampleState (home rows + the epoch's working rows), per sample of the rank.
Peak: the rank's resident-memory growth from before its state is allocated to its maximum. Measured at two sizes,
so that what grows with the samples (the slope, bytes per sample of the rank) is told apart from what does
not (the intercept: chunked transients, buffers).
Global neighbours are left out (the index actor holds N x d; benchmarks/index_scale.py measures it).

    python benchmarks/state_bytes.py [--samples 100000 300000] [--out benchmarks/results/state_bytes]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from noisymix.distributed.engine import InputTransform, peak_rss_mb
from noisymix.distributed.sample_state import SampleState, refresh_state
from noisymix.mixing.gmm_select import GMMConfig
from noisymix.mixing.method import EpochPlan
from noisymix.mixing.soft_targets import TargetCodec

DIM, SIDE, BATCH = 512, 8, 512
CODECS = {"dense float32": (0, "float32"), "top-16 float16": (16, "float16")}
DATASETS = {"clothing1m": (1_000_000, 14), "webvision": (2_400_000, 1000)}


class RandomNet(torch.nn.Module):
    """features: a fixed projection of the image to DIM; head: DIM -> C."""

    def __init__(self, classes: int):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.project = torch.nn.Parameter(torch.randn(SIDE * SIDE, DIM, generator=generator), requires_grad=False)
        self.head = torch.nn.Linear(DIM, classes)

    def features(self, x):
        return torch.relu(x.flatten(1) @ self.project)


def batches(ids: np.ndarray, classes: int):
    """This rank's samples: seeded 8 x 8 images and given labels, BATCH at a time."""
    for start in range(0, len(ids), BATCH):
        chunk = ids[start:start + BATCH]
        rng = np.random.default_rng(int(chunk[0]))
        yield chunk, rng.integers(0, 256, (len(chunk), SIDE, SIDE, 1), dtype=np.uint8), chunk % classes


def cell(rank: int, world: int, port: int, total: int, classes: int, codec: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ids = np.arange(rank, total, world)
    model, transform = RandomNet(classes), InputTransform((0.5,), (0.25,))
    before = peak_rss_mb()
    state = SampleState(total, TargetCodec(classes, *codec))
    plan = EpochPlan("neighbours", refresh=True, target_momentum=0.9, embeddings="l2")
    with torch.no_grad():
        for epoch in range(2):
            refresh_state(state, model, batches(ids, classes), len(ids), transform, "cpu", False, plan, GMMConfig(), 0)
    held = state.held_bytes()
    row = {"rank": rank, "samples": len(ids), "home_bytes": held["home"], "working_bytes": held["working"],
           "embedding_bytes": state.embeddings.numel() * state.embeddings.element_size(),
           "peak_growth_mb": peak_rss_mb() - before}
    Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def measure(total: int, classes: int, world: int, codec_name: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.start_processes(cell, args=(world, port, total, classes, CODECS[codec_name], out), nprocs=world,
                           start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    worst = max(ranks, key=lambda r: r["peak_growth_mb"])
    per = worst["samples"]
    held = (worst["home_bytes"] + worst["working_bytes"]) / per
    return {"classes": classes, "workers": world, "codec": codec_name, "samples_per_rank": per,
            "home_b": worst["home_bytes"] / per, "working_b": worst["working_bytes"] / per,
            "embeddings_b": worst["embedding_bytes"] / per, "held_b": held,
            "peak_b": worst["peak_growth_mb"] * 2**20 / per}


def slope(small: dict, large: dict) -> dict:
    """Bytes per sample of the rank that grow with N, and the fixed MB, from the same cell at two sizes."""
    extra = large["samples_per_rank"] - small["samples_per_rank"]
    peak_b = (large["peak_b"] * large["samples_per_rank"] - small["peak_b"] * small["samples_per_rank"]) / extra
    return {**large, "peak_b": peak_b, "peak_fixed_mb": (large["peak_b"] - peak_b) * large["samples_per_rank"] / 2**20}


def extrapolate(rows: list[dict], workers: int = 8) -> list[dict]:
    """Held and peak GB per rank at Clothing1M and WebVision on `workers` ranks, from the bytes per sample."""
    out = []
    for name, (n, classes) in DATASETS.items():
        for row in rows:
            if row["classes"] == classes and row["workers"] == 2:
                per_rank = n / workers
                out.append({"dataset": name, "n": n, "classes": classes, "workers": workers, "codec": row["codec"],
                            "held_gb": per_rank * row["held_b"] / 1e9,
                            "peak_gb": (per_rank * row["peak_b"] + row["peak_fixed_mb"] * 2**20) / 1e9})
    return out


def markdown(result: dict) -> str:
    lines = ["# Per-sample state: bytes per sample per rank", "",
             f"Command: `python benchmarks/state_bytes.py --samples {' '.join(map(str, result['samples']))}`. "
             f"Machine: {result['machine']}. d = {DIM} embeddings (kept as float16 for in-batch neighbours; with "
             "global neighbours they go to the index actor and are dropped), MixNN's refresh with moving targets, "
             "run twice per cell (steady state). Held: home rows + the epoch's working rows, per sample of the rank "
             "(N/W); peak: resident-memory growth over the two refreshes, as bytes per sample of the rank (the slope "
             "between the two sizes) plus a fixed part; the rank with the larger peak.", "",
             "| C | W | soft targets | home B | working B (embeddings) | held B | peak B per sample | peak / held | "
             "peak fixed MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['classes']} | {r['workers']} | {r['codec']} | {r['home_b']:.0f} | {r['working_b']:.0f} "
                     f"({r['embeddings_b']:.0f}) | {r['held_b']:.0f} | {r['peak_b']:.0f} | "
                     f"{r['peak_b'] / r['held_b']:.1f}x | {r['peak_fixed_mb']:.0f} |")
    lines += ["", "## Extrapolated per rank (8 ranks, from the W = 2 rows)", "",
              "| dataset | N | C | soft targets | held GB per rank | refresh peak GB per rank |", "|---|---|---|---|---|---|"]
    for r in result["extrapolated"]:
        lines.append(f"| {r['dataset']} | {r['n']:,} | {r['classes']} | {r['codec']} | {r['held_gb']:.2f} | "
                     f"{r['peak_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs=2, default=[100_000, 300_000])
    parser.add_argument("--classes", type=int, nargs="+", default=[14, 100, 1000])
    parser.add_argument("--out", default="benchmarks/results/state_bytes")
    args = parser.parse_args()
    rows = []
    for classes in args.classes:
        for world in (1, 2):
            for codec in CODECS:
                small, large = (measure(n, classes, world, codec) for n in args.samples)
                rows.append(slope(small, large))
                print(json.dumps(rows[-1]), flush=True)
    result = {"samples": args.samples, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows,
              "extrapolated": extrapolate(rows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
