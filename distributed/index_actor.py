"""A named Ray actor holding a FAISS index of the training embeddings, for MixNN's global neighbours.

Refreshed from each epoch's exact pass: every rank streams its own embeddings in, in chunks (no rank ever
holds all N x d), rank 0 has the index built, then every rank asks, by id, for the neighbours of its own
samples, once per refresh, so workers never wait on a round trip per sample or per step.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time

import numpy as np

from noisymix.distributed.engine import peak_rss_mb
from noisymix.mixing.method import NeighbourQuery
from noisymix.mixing.mixnn import INDEX_KINDS, INDEX_METRICS


# Queries are copied out of the stored embeddings this many at a time (128 MB at d=512), not all N at once
QUERY_BLOCK = 65536
# k-means trains on at most this many embeddings per list (a random sample drawn with FAISS's fixed seed): 32 per
# list recalled as well as 64 at 1M for less than half the training (benchmarks/results/ivf_choices.md).
TRAIN_PER_LIST = 32


# Before an index goes to the GPU, a child process searches 8 vectors there: a FAISS build without code for this
# GPU aborts its process ("no kernel image is available"; PyPI's faiss-gpu-cu12 wheels hold code for compute
# capability 7.0 and 8.0 only, so an H100/H200 aborts, benchmarks/results/gpu_check.md).
GPU_PROBE = ("import faiss, numpy as np; x = np.eye(8, dtype='float32'); "
             "index = faiss.GpuIndexFlatIP(faiss.StandardGpuResources(), 8); index.add(x); "
             "assert (index.search(x, 1)[1][:, 0] == np.arange(8)).all(), 'wrong neighbours'")
GPU_PROBE_TIMEOUT_S = 300


def gpu_search_failure(code: str, timeout_s: float = GPU_PROBE_TIMEOUT_S) -> str | None:
    """None where the Python `code` (a FAISS GPU search) runs here, else what went wrong, from a child process (so
    that an abort in FAISS ends the child, not the actor)."""
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"a GPU search of 8 vectors took over {timeout_s:g} s"
    if result.returncode == 0:
        return None
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "assert" in line.lower()]
    last = (errors or lines or [f"the probe exited with status {result.returncode}"])[-1]
    return last.split("details: ")[-1]   # a FAISS assertion: what CUDA said, without the C++ signature before it


def ivf_lists(count: int) -> int:
    """IVF lists for `count` embeddings: 4 sqrt(N), FAISS's lower guideline, and never fewer than the 39 embeddings
    per list below which FAISS's k-means warns. A refresh queries all N embeddings, so the list scan
    (N x nprobe x N / lists, 8-bit codes) dominates while assigning (N x lists, a GEMM) is cheap: at 1M, 4096
    lists took 170 s with recall@1 0.973, sqrt(N) = 1000 lists 416 s with 0.962 (ivf_choices.md)."""
    return max(1, min(round(4 * math.sqrt(count)), count // 39))


class NeighbourIndexError(RuntimeError):
    """The neighbour index cannot do what the run asks (too slow for its budget, no GPU support)."""


class NeighbourIndex:
    """Exact (flat) or IVF FAISS index over float32 embeddings, on the CPU or (use_gpu) a GPU.

    IVF: `nlist` k-means lists (0 = ivf_lists(N) = 4 sqrt(N)), trained on a sample of TRAIN_PER_LIST embeddings per
    list of this refresh, `nprobe` searched per query, vectors stored whole ("ivf") or as 8-bit scalars ("ivf_sq8":
    a quarter of the bytes to scan, about half the query time on CPU); kind "auto" is flat below `auto_above`
    embeddings and ivf_sq8 from there (flat costs N^2: 3 h at 1M on 2 cores). The queries of a refresh are its own
    embeddings, so a CPU IVF index assigns each to its nprobe nearest lists once and both adds and searches with
    that assignment. The refresh's embeddings stay (N x d float32, as during the fill) until as many ids as it
    holds have been answered (each rank asks once for its own), so ranks ask for neighbours by id.
    benchmarks/results/index_scale.md has the measured times and recall.
    """

    def __init__(self, dim: int, metric: str = "ip", kind: str = "auto", nlist: int = 0, nprobe: int = 8,
                 threads: int = 1, use_gpu: bool = False, auto_above: int = 100_000):
        try:
            import faiss
        except ImportError as exc:
            raise NeighbourIndexError("MixNN's global neighbours need FAISS: pip install noisymix[cpu] (or "
                                      "noisymix[gpu] on GPU nodes)") from exc
        if dim < 1:
            raise ValueError(f"embedding dimension must be >= 1, got {dim}")
        if metric not in INDEX_METRICS or kind not in INDEX_KINDS:
            raise ValueError(f"metric must be one of {INDEX_METRICS} and kind one of {INDEX_KINDS}, got {metric!r}, "
                             f"{kind!r}")
        self.faiss, self.dim, self.metric, self.kind = faiss, dim, metric, kind
        self.nlist, self.nprobe, self.auto_above = nlist, nprobe, auto_above
        # Ray sets OMP_NUM_THREADS to the actor's CPUs; say it to FAISS explicitly (stack-notes.md).
        faiss.omp_set_num_threads(max(1, threads))
        if use_gpu and not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
            raise NeighbourIndexError("index_gpu=true, but FAISS here has no GPU support or sees no GPU: install "
                              "noisymix[gpu] on the GPU nodes, or set index_gpu=false")
        failure = gpu_search_failure(GPU_PROBE) if use_gpu else None
        if failure:
            raise NeighbourIndexError(f"index_gpu=true, but FAISS's GPU search fails on this GPU: {failure}. A FAISS "
                                      "build needs code for this GPU (faiss-gpu-cu12 wheels: compute capability 7.0 "
                                      "and 8.0 only): install noisymix[gpu] (faiss-gpu >= 1.15: 7.0 to 9.0), or set "
                                      "index_gpu=false")
        self.on_gpu = use_gpu
        self.gpu_resources = faiss.StandardGpuResources() if self.on_gpu else None
        self.index = None
        self.count = 0
        self.stored: np.ndarray | None = None                    # the refresh's embeddings, row i = sample id i
        self.assigned: tuple[np.ndarray, np.ndarray] | None = None   # (scores, lists) of each row's nprobe lists
        self.answered = 0                                        # ids whose neighbours this refresh has given
        self.filling: tuple[int, np.ndarray, np.ndarray] | None = None   # (token, embeddings by id, filled)

    def kind_for(self, count: int) -> str:
        """The index kind used for `count` embeddings."""
        if self.kind != "auto":
            return self.kind
        return "flat" if count < self.auto_above else "ivf_sq8"

    def _new_index(self, embeddings: np.ndarray):
        faiss = self.faiss
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2
        kind = self.kind_for(len(embeddings))
        if kind == "flat":
            index = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        else:
            quantizer = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
            nlist = min(self.nlist or ivf_lists(len(embeddings)), len(embeddings))
            if kind == "ivf":
                index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, metric)
            else:
                index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                      metric)
            index.cp.max_points_per_centroid = TRAIN_PER_LIST
        if self.on_gpu:
            index = faiss.index_cpu_to_gpu(self.gpu_resources, 0, index)
        if kind != "flat":
            index.train(embeddings)
            index.nprobe = min(self.nprobe, index.nlist)
        return index

    def _check(self, array: np.ndarray, what: str) -> np.ndarray:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(f"{what} must be (n, {self.dim}) float32, got shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"{what} holds non-finite values")
        return array

    def refresh(self, embeddings: np.ndarray) -> int:
        """Replace the index content with these embeddings (row i is sample id i)."""
        embeddings = self._check(embeddings, "embeddings")
        self.index = self.stored = self.assigned = None   # the last refresh's memory goes before this one's
        index = self._new_index(embeddings)
        if isinstance(index, self.faiss.IndexIVF):   # a CPU IVF index: each row's lists once, for add and search
            from faiss.contrib.ivf_tools import add_preassigned
            scores, lists = index.quantizer.search(embeddings, index.nprobe)
            add_preassigned(index, embeddings, np.ascontiguousarray(lists[:, 0]))
            index.parallel_mode = 3   # a preassigned search splits its queries over the threads only in mode 3
            self.assigned = (scores, lists)
        else:
            index.add(embeddings)
        self.index, self.count, self.stored, self.answered = index, len(embeddings), embeddings, 0
        return self.count

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k nearest stored embeddings of each query."""
        if self.index is None:
            raise ValueError("the index is empty: refresh it first")
        if not 1 <= k <= self.count:
            raise ValueError(f"k={k} must be in [1, {self.count}] (the number of stored embeddings)")
        return self.index.search(self._check(queries, "queries"), k)

    def neighbour_table(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, dict[str, float]]:
        """N x k ids of each sample's k nearest OTHER samples (refreshing the index with these embeddings), and
        the seconds spent rebuilding the index and querying it."""
        if not 1 <= k < len(embeddings):
            raise ValueError(f"k={k} neighbours need 1 <= k < N={len(embeddings)}")
        started = time.perf_counter()
        self.refresh(embeddings)
        refreshed = time.perf_counter()
        table, _ = self.neighbours(np.arange(self.count), k)
        timings = {"index_refresh_s": refreshed - started, "index_query_s": time.perf_counter() - refreshed,
                   "index_peak_rss_mb": peak_rss_mb(), "index_ivf": float(self.kind_for(len(embeddings)) != "flat")}
        return table, timings

    def add(self, token: int, total: int, ids: np.ndarray, embeddings: np.ndarray) -> int:
        """Put a chunk of the refresh `token`'s embeddings (rows of sample ids `ids`, out of `total`) in place;
        a new token starts a new fill. Returns how many rows are filled."""
        embeddings = self._check(embeddings, "embeddings")
        if self.filling is None or self.filling[0] != token:
            self.filling = (token, np.zeros((total, self.dim), np.float32), np.zeros(total, bool))
        _, buffer, filled = self.filling
        if len(ids) != len(embeddings) or (len(ids) and not 0 <= ids.min() <= ids.max() < total):
            raise ValueError(f"{len(ids)} ids (each in [0, {total})) must come with {len(embeddings)} embeddings")
        if filled[ids].any():
            raise ValueError(f"refresh {token}: sample ids sent twice (first {ids[filled[ids]][:3].tolist()})")
        buffer[ids], filled[ids] = embeddings, True
        return int(filled.sum())

    def build(self, token: int) -> dict[str, float]:
        """Index the refresh `token`'s embeddings once every id has arrived; returns the seconds it took."""
        if self.filling is None or self.filling[0] != token or not self.filling[2].all():
            have = 0 if self.filling is None or self.filling[0] != token else int(self.filling[2].sum())
            raise ValueError(f"refresh {token}: {have} embeddings arrived, the index needs every sample's")
        started = time.perf_counter()
        self.refresh(self.filling[1])
        self.filling = None
        return {"index_refresh_s": time.perf_counter() - started, "index_peak_rss_mb": peak_rss_mb(),
                "index_ivf": float(self.kind_for(self.count) != "flat")}

    def neighbours(self, ids: np.ndarray, k: int) -> tuple[np.ndarray, float]:
        """len(ids) x k ids of the nearest OTHER samples of the samples `ids` (their embeddings of the last
        refresh as queries), and the seconds of the search."""
        if self.stored is None:
            raise ValueError("the index is empty: refresh it first" if self.index is None else
                             "every sample's neighbours of this refresh were given and its embeddings released: "
                             "refresh it again")
        if not 1 <= k < self.count:
            raise ValueError(f"k={k} neighbours need 1 <= k < N={self.count}")
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and not 0 <= ids.min() <= ids.max() < self.count:
            raise ValueError(f"sample ids must be in [0, {self.count}), got {ids.min()}..{ids.max()}")
        started = time.perf_counter()
        found = np.concatenate([self._nearest(ids[start:start + QUERY_BLOCK], k + 1)
                                for start in range(0, len(ids), QUERY_BLOCK)]) if len(ids) else np.empty((0, k + 1))
        self.answered += len(ids)
        if self.answered >= self.count:   # every rank has its rows: the N x d copy waits for no one
            self.stored = self.assigned = None
        return drop_self(found, k, ids), time.perf_counter() - started

    def _nearest(self, ids: np.ndarray, k: int) -> np.ndarray:
        """The ids of the k nearest stored embeddings of the stored embeddings `ids` (themselves included)."""
        if self.assigned is None:
            return self.index.search(self.stored[ids], k)[1]
        from faiss.contrib.ivf_tools import search_preassigned
        scores, lists = self.assigned
        return search_preassigned(self.index, self.stored[ids], k, lists[ids], scores[ids])[1]


def drop_self(ids: np.ndarray, k: int, own_ids: np.ndarray | None = None) -> np.ndarray:
    """Remove each row's own id (row i is sample own_ids[i], default i; normally first, absent when ties or IVF
    probing miss it)."""
    n = ids.shape[0]
    own_ids = np.arange(n) if own_ids is None else np.asarray(own_ids)
    own = ids == own_ids[:, None]
    keep = ~own
    # Where a row lacks its own id, drop its last (farthest) column instead.
    missing = ~own.any(axis=1)
    keep[missing, -1] = False
    return ids[keep].reshape(n, k).astype(np.int64)


def index_actor(name: str, dim: int, query: NeighbourQuery):
    """Get the named index actor, creating it if it does not exist (again, after a crash). It reserves its CPUs
    (and a GPU) in Ray, so Ray places it where they are and no training worker shares them. Ray is imported
    here, not with the module, so the index itself also runs where Ray is not installed (benchmarks/gpu_check.py)."""
    import ray

    actor_class = ray.remote(num_cpus=query.cpus, num_gpus=float(query.gpu))(NeighbourIndex)
    return actor_class.options(name=name, get_if_exists=True, max_concurrency=1).remote(
        dim, query.metric, query.kind, nlist=query.nlist, nprobe=query.nprobe, threads=max(1, int(query.cpus)),
        use_gpu=query.gpu, auto_above=query.auto_above)
