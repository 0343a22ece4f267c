"""Where a re-encoding prepare spends its time per image, beside the bare decode loop it is measured against
(benchmarks/scale.py): decode + shorter-side resize, JPEG re-encode, pixel statistics (PIL's histogram the
writers use, and numpy's histogram and the float sums they used before), the shard checksum, and the writers'
own `stored_image` (which keeps a JPEG that needs no resize as its own bytes), with and without the pixels
for the statistics. Medians of 5 passes, one core.

    python benchmarks/prepare_cost.py --source runs/scale/synth-20000 [--images 400] [--out benchmarks/results/prepare_cost]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from noisymix.distributed.images import PixelSums, encode_jpeg, open_rgb, resize_shorter, stored_image
from noisymix.launch.image_lists import STATS_EVERY

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_support.reports import write_report  # noqa: E402

STORED_SIZE, QUALITY, PASSES = 256, 90, 5


def per_image_ms(step, items) -> float:
    """Median over passes of the mean milliseconds per item."""
    times = []
    for _ in range(PASSES):
        started = time.perf_counter()
        for item in items:
            step(item)
        times.append((time.perf_counter() - started) / len(items) * 1000)
    return statistics.median(times)


def float_sums(pixels: np.ndarray) -> None:
    values = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64) / 255.0
    values.sum(axis=0), np.square(values).sum(axis=0)


def measure(source: Path, count: int) -> dict:
    lines = (source / "train.txt").read_text().splitlines()[:count]
    data = [(source / line.split()[0]).read_bytes() for line in lines]
    images = [resize_shorter(open_rgb(d, at_least=STORED_SIZE), STORED_SIZE) for d in data]
    pixels = [np.asarray(image) for image in images]
    encoded = [encode_jpeg(image, QUALITY) for image in images]
    as_is = np.mean([stored_image(d, STORED_SIZE, QUALITY)[0] == d for d in data])
    return {"images": len(data), "stored_size": STORED_SIZE, "quality": QUALITY, "stored_as_is": float(as_is),
            "ms_per_image": {
        "decode_resize": per_image_ms(lambda d: resize_shorter(open_rgb(d, at_least=STORED_SIZE), STORED_SIZE), data),
        "encode_jpeg": per_image_ms(lambda image: encode_jpeg(image, QUALITY), images),
        "pixel_stats_pil_histogram": per_image_ms(lambda image: PixelSums().add_image(image), images),
        "pixel_stats_numpy_histogram": per_image_ms(lambda p: PixelSums().add(p), pixels),
        "pixel_stats_float_sums": per_image_ms(float_sums, pixels),
        "sha256": per_image_ms(lambda b: hashlib.sha256(b).digest(), encoded),
        "stored_image": per_image_ms(lambda d: stored_image(d, STORED_SIZE, QUALITY), data),
        "stored_image_no_pixels": per_image_ms(lambda d: stored_image(d, STORED_SIZE, QUALITY, False), data)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="a `noisymix synth` folder")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prepare_cost"))
    args = parser.parse_args()
    result = {"command": f"python benchmarks/prepare_cost.py --source {args.source} --images {args.images}",
              **measure(args.source, args.images)}
    costs = result["ms_per_image"]
    work = costs["decode_resize"] + costs["encode_jpeg"] + costs["pixel_stats_pil_histogram"] + costs["sha256"]
    result["prepare_vs_decode_bound"] = costs["decode_resize"] / work
    # a writer decodes 1 training image in STATS_EVERY whole, for the pixel statistics
    writer = ((STATS_EVERY - 1) * costs["stored_image_no_pixels"] + costs["stored_image"]
              + costs["pixel_stats_pil_histogram"]) / STATS_EVERY + costs["sha256"]
    result["writer_vs_decode_bound"] = costs["decode_resize"] / writer
    lines = ["# Where prepare spends its time, per image", "", f"Command: `{result['command']}`; one core, "
             f"{result['images']} images re-encoded at {STORED_SIZE} px, quality {QUALITY}; medians of {PASSES} passes.",
             "", "| step | ms per image |", "|---|---|"]
    lines += [f"| {name.replace('_', ' ')} | {value:.3f} |" for name, value in costs.items()]
    lines += ["", f"decode+resize (the bare loop's work) / a prepare's work per image = "
              f"{result['prepare_vs_decode_bound']:.2f}: the per-core rate a re-encoding prepare can reach against "
              "the bare loop, before any I/O.",
              "", f"The writers' work per training image (the stored image, with the pixels and PIL's histogram for 1 "
              f"in {STATS_EVERY}, + sha256; "
              f"{result['stored_as_is']:.0%} of these JPEGs need no resize and keep their own bytes): "
              f"{result['writer_vs_decode_bound']:.2f}x the bare loop's rate, before any I/O."]
    write_report(args.out, result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
