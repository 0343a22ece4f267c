"""The neighbour index at Clothing1M scale: build + query seconds of the whole N x 1 neighbour table that a
MixNN refresh asks for, exact (flat) against IVF and the automatic choice (index_kind=auto: 8-bit IVF from 100k),
with the approximate indexes' recall@1 against exact search, on 2 FAISS threads.

Embeddings are synthetic but shaped like a trained network's: L2-normalised d=512 vectors around 1000 class
centres (random Gaussian vectors have no neighbourhood structure and would understate any IVF index).
Flat is measured at the smallest N only and extrapolated as N^2 (it compares every pair).

    python benchmarks/index_scale.py [--sizes 100000 400000 1000000] [--kinds ivf auto] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from noisymix.distributed.index_actor import NeighbourIndex

DIM, CENTRES, THREADS, RECALL_QUERIES = 512, 1000, 2, 1000


def embeddings(n: int, seed: int = 0) -> np.ndarray:
    """n unit vectors: a random class centre each, plus noise of the centres' own scale."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, DIM), dtype=np.float32)
    z = centres[rng.integers(0, CENTRES, n)]
    z += rng.standard_normal((n, DIM), dtype=np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return z


def exact_first_neighbours(z: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Each query row's nearest other row by inner product (numpy, in blocks)."""
    out = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), 100):
        rows = queries[start:start + 100]
        scores = z[rows] @ z.T
        scores[np.arange(len(rows)), rows] = -np.inf
        out[start:start + 100] = scores.argmax(axis=1)
    return out


def measure(n: int, kind: str) -> tuple[dict, np.ndarray]:
    z = embeddings(n)
    index = NeighbourIndex(DIM, "ip", kind, threads=THREADS)
    started = time.perf_counter()
    table, timings = index.neighbour_table(z, 1)
    row = {"n": n, "kind": kind, "index": index.kind_for(n), "ivf": bool(timings["index_ivf"]),
           "seconds": time.perf_counter() - started,
           "refresh_s": timings["index_refresh_s"], "query_s": timings["index_query_s"],
           "peak_rss_mb": timings["index_peak_rss_mb"]}
    queries = np.random.default_rng(1).choice(n, RECALL_QUERIES, replace=False)
    row["recall_at_1"] = float(np.mean(table[queries, 0] == exact_first_neighbours(z, queries)))
    return row, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["ivf", "auto"], help="index kinds measured at every size")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/index_scale"))
    args = parser.parse_args()
    results = {"command": f"python benchmarks/index_scale.py --sizes {' '.join(map(str, args.sizes))} "
                          f"--kinds {' '.join(args.kinds)}",
               "machine": platform.machine(), "threads": THREADS, "dim": DIM, "rows": [measure(args.sizes[0], "flat")[0]]}
    for n in args.sizes:   # the report is rewritten after each row, so a stopped run keeps what it measured
        for kind in args.kinds:
            row = measure(n, kind)[0]
            row["flat_extrapolated_s"] = results["rows"][0]["seconds"] * (n / results["rows"][0]["n"]) ** 2
            results["rows"].append(row)
            write(results, args.out)


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = ["# The neighbour index at scale", "",
             f"Command: `{results['command']}`. {THREADS} FAISS threads, d={DIM}, L2-normalised embeddings around "
             f"{CENTRES} centres; the whole N x 1 neighbour table (every embedding queried), as a MixNN refresh asks.",
             "Recall@1: the approximate table's first neighbour equals exact search's, on 1000 random queries.", "",
             "| N | index | build s | query s | total s | flat total s (measured / N^2) | recall@1 | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        flat_s = f"{row['seconds']:.0f} (measured)" if row["kind"] == "flat" else f"{row['flat_extrapolated_s']:.0f}"
        lines.append(f"| {row['n']:,} | {row['kind']} ({row.get('index', 'IVF' if row['ivf'] else 'flat')}) | "
                     f"{row['refresh_s']:.1f} | "
                     f"{row['query_s']:.1f} | {row['seconds']:.1f} | {flat_s} | {row['recall_at_1']:.3f} | "
                     f"{row['peak_rss_mb']:,.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
