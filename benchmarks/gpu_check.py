"""GPU check, for a session that is lent a GPU: the training step of ResNet-50 at 224 px with bf16 autocast
on synthetic JPEG shards read through the real loader (images/s; the loader's hand-over before and after batches
became pinned shared-memory tensors, and the loader alone at several worker counts), beside the same step on one
batch already on the device (bf16 and fp32: the model's own ceiling, so the loader's share shows), and the FAISS index of the
neighbour actor on 1M x 2048 random vectors (build and query seconds, the flat index checked against exact
search on the CPU, recall@1 of the IVF index against the flat one). Runs in-process (no Ray: its wheel does
not travel to the GPU machine), in under 8 minutes on an H100/H200. Each part that fails is reported as its
error and the others still run; the report is written to $OUT after each part. `--dry-run`: tiny sizes on
the CPU, as the test suite runs it.

    GPU_CHECK_WHEELS=.whl bash benchmarks/gpu_check.sh     # on the GPU machine (gpu_check.sh says why wheels)
    python benchmarks/gpu_check.py --dry-run
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from noisymix.distributed import shards
from noisymix.distributed.engine import (DataInfo, InputTransform, build_optimizer, image_stages, peak_rss_mb,
                                         train_step)
from noisymix.distributed.models import create_model
from noisymix.launch.config import build_config
from noisymix.launch.prepare import prepare
from noisymix.launch.synth import SynthSection, synthesize

sys.path.insert(0, str(Path(__file__).parent))
from index_scale import exact_first_neighbours  # noqa: E402

FULL = {"images": 4096, "crop": 224, "batch": 256, "steps": 60, "model_steps": 20, "loader_workers": 12,
        "worker_counts": [4, 8, 15], "vectors": 1_000_000, "dim": 2048, "queries": 2000, "exact_queries": 200}
DRY = {"images": 48, "crop": 32, "batch": 8, "steps": 3, "model_steps": 3, "loader_workers": 2, "worker_counts": [1],
       "vectors": 3000,
       "dim": 16, "queries": 200, "exact_queries": 50}
# The first steps pay cuDNN's algorithm choice and the loaders' start; they are not timed.
UNTIMED_STEPS = 2
# The training shards are listed this many times for one loader pass (4096 images x 8 > 62 steps of 256).
LOADER_REPEATS = 8
# Query rows per block of the torch exact search (block x N scores on the device: 16 GB at 1M in float32).
EXACT_BLOCK = 4096


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(batches, steps: int, step, device: torch.device) -> tuple[float, int]:
    """(seconds, images) of `steps` calls of step(batch) after UNTIMED_STEPS untimed ones."""
    done, seen, started = 0, 0, None
    for batch in batches:
        size = step(batch)
        done += 1
        if done == UNTIMED_STEPS:
            synchronize(device)
            started = time.perf_counter()
        elif done > UNTIMED_STEPS:
            seen += size
        if done >= steps + UNTIMED_STEPS:
            break
    synchronize(device)
    return time.perf_counter() - started, seen


def _pickled(batch):
    """The loader's hand-over before shared-memory tensors: numpy arrays, pickled through a pipe."""
    return batch


def synthetic_shards(size: dict, work: Path):
    """(config, data dir, manifest, DataInfo) of synthetic JPEG shards in `work`, made once and reused."""
    source = work / "synth"
    if not (source / "train.txt").exists():
        synthesize(SynthSection.from_values({"out": str(source), "train": size["images"], "test": 8, "classes": 14,
                                             "min_size": 256, "max_size": 400}), log=lambda *_: None)
    config = build_config(overrides={"source": "image_list", "source_path": str(source), "noise_type": "none",
                                     "noise_rate": 0.0, "num_shards": 16, "data_dir": str(work / "data"),
                                     "crop_size": size["crop"], "model": "resnet50"})
    data_dir = prepare(config.data, config.run.seed, log=lambda *_: None)
    manifest = shards.load_manifest(data_dir)
    return config, data_dir, manifest, DataInfo.from_manifest(manifest, size["crop"])


def training_rate(size: dict, work: Path, device: torch.device, log, only_after: bool = False) -> dict:
    """Images/s of ResNet-50 training steps (bf16 autocast on CUDA) fed by the JPEG loader, in the hand-overs and
    cuDNN settings before and after shared-memory, pinned batches and cuDNN's algorithm search, beside the loader
    alone at several worker counts and the step on one resident batch (the model's own rate, bf16 and fp32).
    only_after: the loader alone and the fed steps as the trainer now runs them (a second process's setting)."""
    config, data_dir, manifest, data = synthetic_shards(size, work)
    model = create_model("resnet50", 3, data.num_classes, size["crop"]).to(device)
    optimizer = build_optimizer(model, 0.01, 0.9, 1e-4)
    transform = InputTransform(data.mean, data.std)
    amp = device.type == "cuda"

    def loader_batches(transfer: str, workers: int):
        """One loader pass over the shards listed LOADER_REPEATS times: the timed steps pay no worker restart
        (a real epoch of 1M images pays one per epoch)."""
        urls = shards.shard_urls(data_dir, manifest, "train") * LOADER_REPEATS
        stream = shards.sample_stream(urls, batch_size=size["batch"], shuffle_buffer=0,
                                      images=image_stages(config.train, data, seed=0)[0])
        if transfer == "pickled":
            return iter(wds.WebLoader(stream, batch_size=None, num_workers=workers, collate_fn=_pickled))
        return shards.iterate_batches(stream, workers, pin_memory=transfer == "pinned" and amp)

    def loader_step(batch) -> int:
        _, images, labels = batch
        targets = torch.nn.functional.one_hot(torch.from_numpy(labels).to(device), data.num_classes).float()
        train_step(model, optimizer, transform(images, device), targets, amp=amp)
        return len(labels)

    def rate(batches, step, steps=size["steps"]) -> float:
        seconds, seen = timed_steps(batches, steps, step, device)
        return seen / seconds

    def count(batch) -> int:
        return len(batch[2])

    workers = size["loader_workers"]
    out = {"model": "resnet50", "crop": size["crop"], "batch": size["batch"], "amp_bf16": amp,
           "loader_workers": workers, "steps_timed": size["steps"],
           "heap_env": {key: os.environ.get(key) for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}}
    transfers = ("shared",) if only_after else ("pickled", "shared")
    out["loader_alone_images_per_s"] = {t: rate(loader_batches(t, workers), count) for t in transfers}
    if not only_after:
        out["loader_alone_shared_by_workers"] = {n: rate(loader_batches("shared", n), count)
                                                 for n in size["worker_counts"]}
    # (name, hand-over, cuDNN search): "before" is how the trainer ran until this commit, "after" how it runs now
    variants = [("before", "pickled", False), ("cudnn_search", "pickled", True), ("shared_memory", "shared", True),
                ("after", "pinned", True)]
    fed = {}
    for name, transfer, search in variants[-1:] if only_after else variants:
        log(f"training: fed, {name}")
        torch.backends.cudnn.benchmark = search
        fed[name] = rate(loader_batches(transfer, workers), loader_step)
        if not only_after and name == "before":
            out["resident_batch_images_per_s"] = resident_rates(model, optimizer, size, data.num_classes, device)
    out["fed_images_per_s"] = fed
    out["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30 if amp else None
    out["peak_rss_mb"] = {"training_process": peak_rss_mb(),
                          "largest_loader_process": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    return out


def resident_rates(model, optimizer, size: dict, classes: int, device: torch.device) -> dict:
    """Images/s of the training step on one batch already on the device: bf16 and fp32 (on CUDA), each with
    cuDNN's heuristic choice of algorithms and with its timed search."""
    resident = torch.randn(size["batch"], 3, size["crop"], size["crop"], device=device)
    resident = resident.contiguous(memory_format=torch.channels_last)
    targets = torch.nn.functional.one_hot(torch.arange(size["batch"], device=device) % classes, classes).float()
    out = {}
    precisions = (("bf16", True), ("fp32", False)) if device.type == "cuda" else (("fp32", False),)
    for search in (False, True):
        torch.backends.cudnn.benchmark = search
        for precision, use_amp in precisions:
            def resident_step(_, use_amp=use_amp) -> int:
                train_step(model, optimizer, resident, targets, amp=use_amp)
                return size["batch"]
            seconds, seen = timed_steps(itertools.repeat(None), size["model_steps"], resident_step, device)
            out[f"{precision}{'_cudnn_search' if search else ''}"] = seen / seconds
    return out


def exact_agreement(vectors: np.ndarray, table: np.ndarray, rows: np.ndarray) -> float:
    """Share of `rows` whose first neighbour in `table` scores as high as the nearest other vector by inner product
    (index_scale's numpy search), within 1e-5: float32 ties of random vectors are that close."""
    def score(ids: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", vectors[rows], vectors[ids])

    return float(np.mean(score(table[rows, 0]) >= score(exact_first_neighbours(vectors, rows)) - 1e-5))


def torch_exact_table(vectors: np.ndarray, device: torch.device, precision: str) -> np.ndarray:
    """Each row's nearest other row by inner product, by brute force on the device (bf16 or tf32 products)."""
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    base = torch.from_numpy(vectors).to(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    table = np.empty((len(vectors), 1), np.int64)
    for start in range(0, len(vectors), EXACT_BLOCK):
        scores = base[start:start + EXACT_BLOCK] @ base.T
        rows = torch.arange(len(scores), device=device)
        scores[rows, rows + start] = -torch.inf
        table[start:start + len(scores), 0] = scores.argmax(dim=1).cpu().numpy()
    return table


def index_rate(size: dict, device: torch.device, log) -> dict:
    """Build + query seconds of the neighbour index (a GPU index where faiss sees a GPU) on random vectors, beside
    a brute-force search through torch on the same device."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((size["vectors"], size["dim"]), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    out = {"vectors": size["vectors"], "dim": size["dim"], "cublas_forwarded_to": os.environ.get("GPU_CHECK_CUBLAS13")}
    sample = rng.choice(size["vectors"], size["queries"], replace=False)
    exact_rows = sample[:size["exact_queries"]]
    tables = {}
    for precision in ("bf16", "tf32") if device.type == "cuda" else ("fp32",):
        log(f"index: torch exact search, {precision}")
        started = time.perf_counter()
        tables[f"torch_{precision}"] = torch_exact_table(vectors, device, precision)
        out[f"torch_{precision}"] = {"seconds": time.perf_counter() - started,
                                     "exact_agreement": exact_agreement(vectors, tables[f"torch_{precision}"],
                                                                        exact_rows)}
    if device.type == "cuda":
        torch.cuda.empty_cache()   # the search's blocks go back before FAISS asks for its own memory
    try:
        import faiss

        from noisymix.distributed.index_actor import NeighbourIndex
    except ImportError as exc:
        out["faiss"] = f"skipped: faiss is not importable here: {exc}"
        return out
    on_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    out["faiss"] = f"{faiss.__version__}, {'GPU' if hasattr(faiss, 'StandardGpuResources') else 'CPU'} build"
    for kind in ("flat", "ivf"):
        log(f"index: {kind}")
        try:
            index = NeighbourIndex(size["dim"], "ip", kind, nprobe=16, threads=os.cpu_count() or 1, use_gpu=on_gpu)
            started = time.perf_counter()
            tables[kind], timings = index.neighbour_table(vectors, 1)
            out[kind] = {"on_gpu": index.on_gpu, "seconds": time.perf_counter() - started, **timings}
            del index
        except Exception as exc:   # one kind failing on a lent GPU must not cost the other's numbers
            out[kind] = {"error": f"{type(exc).__name__}: {exc}"}
    if "flat" in tables:
        out["flat"]["exact_agreement"] = exact_agreement(vectors, tables["flat"], exact_rows)
    reference = "flat" if "flat" in tables else next(iter(tables))
    if "ivf" in tables:
        out["ivf_recall_at_1"] = float(np.mean(tables["ivf"][sample, 0] == tables[reference][sample, 0]))
        out["ivf_recall_against"] = reference
    return out


def probe_check(size: dict) -> dict:
    """The index actor's GPU probe under this FAISS build, then a small GPU flat index through NeighbourIndex (or
    the error that refuses it), checked against exact search."""
    import faiss

    from noisymix.distributed.index_actor import GPU_PROBE, NeighbourIndex, NeighbourIndexError, gpu_search_failure

    started = time.perf_counter()
    out = {"faiss": faiss.__version__, "probe_failure": gpu_search_failure(GPU_PROBE),
           "probe_s": time.perf_counter() - started}
    vectors = np.random.default_rng(1).standard_normal((size["vectors"] // 100, 64), dtype=np.float32)
    try:
        index = NeighbourIndex(64, "ip", "flat", use_gpu=True)
        table, _ = index.neighbour_table(vectors, 1)
        out.update(on_gpu=index.on_gpu, exact_agreement=exact_agreement(vectors, table, np.arange(100)))
    except NeighbourIndexError as exc:
        out["refused"] = str(exc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--part", choices=("all", "training", "index", "probe"), default="all",
                        help="run one part only (probe: only by name, the index actor's GPU probe)")
    parser.add_argument("--work", type=Path, help="keep the synthetic shards here, for a second process to reuse "
                                                  "(default: a temporary folder)")
    parser.add_argument("--only-after", action="store_true",
                        help="training: only the loader and steps as the trainer runs them now (report "
                             "gpu_check_<part>_after.json), e.g. under other MALLOC_ variables")
    args = parser.parse_args()
    size = DRY if args.dry_run else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    def save() -> None:
        if os.environ.get("OUT"):
            name = f"gpu_check_{args.part}{'_after' if args.only_after else ''}.json"
            Path(os.environ["OUT"], name).write_text(json.dumps(report, indent=1))

    if args.part in ("all", "training"):
        log("training")
        with tempfile.TemporaryDirectory() as temporary:
            try:
                report["training"] = training_rate(size, args.work or Path(temporary), device, log, args.only_after)
            except Exception as exc:   # the index part still runs and reports
                report["training"] = {"error": f"{type(exc).__name__}: {exc}"}
        save()
    if args.part in ("all", "index"):
        log("index")
        report["index"] = index_rate(size, device, log)
    if args.part == "probe":
        report["probe"] = probe_check(size)
    report["seconds"] = time.perf_counter() - started
    save()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
