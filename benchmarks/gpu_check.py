"""GPU check, for a session that is lent a GPU: the training step of ResNet-50 at 224 px with bf16 autocast
on synthetic JPEG shards read through the real loader (images/s), and the FAISS index of the neighbour
actor on 1M x 2048 random vectors (build and query seconds, recall@1 of the approximate index against
exact search on a sample). Runs in-process (no Ray: its wheel does not travel to the GPU machine), in
under 8 minutes on an H100/H200. `--dry-run`: tiny sizes on the CPU, as the test suite runs it.

    bash benchmarks/gpu_check.sh            # on the GPU machine
    python benchmarks/gpu_check.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from noisymix.distributed import shards
from noisymix.distributed.engine import DataInfo, InputTransform, build_optimizer, image_stages, train_step
from noisymix.distributed.models import create_model
from noisymix.launch.config import build_config
from noisymix.launch.prepare import prepare
from noisymix.launch.synth import SynthSection, synthesize

FULL = {"images": 4096, "crop": 224, "batch": 256, "steps": 60, "loader_workers": 12, "vectors": 1_000_000,
        "dim": 2048, "queries": 2000}
DRY = {"images": 48, "crop": 32, "batch": 8, "steps": 3, "loader_workers": 0, "vectors": 3000, "dim": 16,
       "queries": 200}


def training_rate(size: dict, work: Path, device: torch.device) -> dict:
    """Images/s of ResNet-50 training steps (bf16 autocast on CUDA) fed by the JPEG loader."""
    source = synthesize(SynthSection.from_values({"out": str(work / "synth"), "train": size["images"],
                                                  "test": 8, "classes": 14, "min_size": 256, "max_size": 400}),
                        log=lambda *_: None)
    config = build_config(overrides={"source": "image_list", "source_path": str(source), "noise_type": "none",
                                     "noise_rate": 0.0, "num_shards": 16, "data_dir": str(work / "data"),
                                     "crop_size": size["crop"], "model": "resnet50"})
    data_dir = prepare(config.data, config.run.seed, log=lambda *_: None)
    manifest = shards.load_manifest(data_dir)
    data = DataInfo.from_manifest(manifest, size["crop"])
    model = create_model("resnet50", 3, data.num_classes, size["crop"]).to(device)
    optimizer = build_optimizer(model, 0.01, 0.9, 1e-4)
    transform = InputTransform(data.mean, data.std)
    stream = shards.sample_stream(shards.shard_urls(data_dir, manifest, "train"), batch_size=size["batch"],
                                  images=image_stages(config.train, data, seed=0)[0], shuffle_buffer=0)
    amp, steps, seen, started = device.type == "cuda", 0, 0, None
    while steps < size["steps"]:
        for _, images, labels in shards.iterate_batches(stream, size["loader_workers"]):
            x = transform(images, device).contiguous(memory_format=torch.channels_last)
            targets = torch.nn.functional.one_hot(torch.from_numpy(labels).to(device), data.num_classes).float()
            train_step(model, optimizer, x, targets, amp=amp)
            steps += 1
            if steps == 2:              # the first steps pay cuDNN's autotuning and the loaders' start
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
            elif steps > 2:
                seen += len(labels)
            if steps >= size["steps"]:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"model": "resnet50", "crop": size["crop"], "batch": size["batch"], "amp_bf16": amp,
            "images_per_s": seen / seconds, "steps_timed": steps - 2,
            "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def index_rate(size: dict) -> dict:
    """Build + query seconds of the neighbour index (a GPU index where faiss sees a GPU) on random vectors."""
    try:
        import faiss

        from noisymix.distributed.index_actor import NeighbourIndex
    except ImportError as exc:
        return {"skipped": f"faiss is not importable here: {exc}"}
    on_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((size["vectors"], size["dim"]), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    out = {"vectors": size["vectors"], "dim": size["dim"]}
    for kind in ("flat", "ivf"):
        index = NeighbourIndex(size["dim"], "ip", kind, nprobe=16, threads=os.cpu_count() or 1, use_gpu=on_gpu)
        started = time.perf_counter()
        table, timings = index.neighbour_table(vectors, 1)
        out[kind] = {"on_gpu": index.on_gpu, "seconds": time.perf_counter() - started, **timings}
        out[kind]["table"] = table
    sample = rng.choice(size["vectors"], size["queries"], replace=False)
    out["ivf_recall_at_1"] = float(np.mean(out["ivf"].pop("table")[sample, 0] == out["flat"].pop("table")[sample, 0]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args()
    size = DRY if args.dry_run else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    with tempfile.TemporaryDirectory() as work:
        report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "training": training_rate(size, Path(work), device),
                  "index": index_rate(size)}
    print(json.dumps(report, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
