"""Where a 1M-embedding IVF refresh spends its time, and what moves it: the number of lists, k-means training
on a sample of the embeddings, and assigning each embedding to its lists once for both the add and the search
(a MixNN refresh queries the embeddings it indexes). Raw FAISS, 2 threads, 8-bit IVF (index_kind=auto's), on
index_scale.py's synthetic embeddings; recall@1 against exact search on 1000 random queries. Each config is one
JSON line on stdout; --report turns the lines into a table.

    python benchmarks/ivf_choices.py N CONFIGS_JSON > LOG      # CONFIGS_JSON: [{"nlist", "nprobe", "per_list", "pre"}]
    python benchmarks/ivf_choices.py --report LOG --out benchmarks/results/ivf_choices
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ivf_tools import add_preassigned, search_preassigned

sys.path.insert(0, str(Path(__file__).parent))
from index_scale import DIM, THREADS, embeddings, exact_first_neighbours  # noqa: E402


def measure(z: np.ndarray, queries: np.ndarray, exact: np.ndarray, nlist: int, nprobe: int, per_list: int,
            pre: bool) -> dict:
    """Seconds of k-means, assignment, add and the whole table's search, and recall@1, for one configuration."""
    n = len(z)
    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(DIM)
    index = faiss.IndexIVFScalarQuantizer(quantizer, DIM, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.max_points_per_centroid = per_list
    index.train(z)
    t1 = time.perf_counter()
    index.nprobe = nprobe
    if pre:
        scores, lists = quantizer.search(z, nprobe)
        t2 = time.perf_counter()
        add_preassigned(index, z, np.ascontiguousarray(lists[:, 0]))
        t3 = time.perf_counter()
        index.parallel_mode = 3   # search_preassigned splits over queries only in mode 3
        _, ids = search_preassigned(index, z, 2, lists, scores)
    else:
        t2 = t1
        index.add(z)
        t3 = time.perf_counter()
        _, ids = index.search(z, 2)
    t4 = time.perf_counter()
    first = np.where(ids[:, 0] == np.arange(n), ids[:, 1], ids[:, 0])
    return {"nlist": nlist, "nprobe": nprobe, "per_list": per_list, "pre": pre, "n": n,
            "train_s": round(t1 - t0, 1), "assign_s": round(t2 - t1, 1), "add_s": round(t3 - t2, 1),
            "search_s": round(t4 - t3, 1), "total_s": round(t4 - t0, 1),
            "recall": float(np.mean(first[queries] == exact))}


def configs(rows: list[dict]) -> str:
    """The CONFIGS_JSON argument that measured these rows."""
    keys = ("nlist", "nprobe", "per_list", "pre")
    return json.dumps([{key: row[key] for key in keys} for row in rows], separators=(",", ":"))


def report(log: Path, out: Path) -> None:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    lines = ["# IVF choices for a 1M-embedding refresh", "",
             f"Command: `python benchmarks/ivf_choices.py {rows[0]['n']} '{configs(rows)}' > LOG` "
             "(one run, side by side), "
             f"{THREADS} FAISS threads, d={DIM}, 8-bit IVF, inner product; the whole N x 1 neighbour table. per list: "
             "k-means trains on at most this many embeddings per list (FAISS's default 256); assigned once: each "
             "embedding's nprobe lists are computed once and used by both the add and the search.", "",
             "| N | lists | nprobe | per list | assigned once | k-means s | assign s | add s | search s | total s | "
             "recall@1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['nlist']} | {r['nprobe']} | {r['per_list']} | {'yes' if r['pre'] else 'no'} | "
                     f"{r['train_s']} | {r['assign_s']} | {r['add_s']} | {r['search_s']} | {r['total_s']} | "
                     f"{r['recall']:.3f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    if sys.argv[1] == "--report":
        report(Path(sys.argv[2]), Path(sys.argv[sys.argv.index("--out") + 1]))
        return
    faiss.omp_set_num_threads(THREADS)
    n, configs = int(sys.argv[1]), json.loads(sys.argv[2])
    z = embeddings(n)
    queries = np.random.default_rng(1).choice(n, 1000, replace=False)
    exact = exact_first_neighbours(z, queries)
    for config in configs:
        print(json.dumps(measure(z, queries, exact, **config)), flush=True)


if __name__ == "__main__":
    main()
