"""`noisymix synth`: a synthetic image-list dataset (JPEGs of varying sizes and a list file), so that the
Clothing1M/WebVision-scale paths can be measured without downloading anything.

Every image carries its class in two global cues a CNN can learn from any crop: the background's hue and
the orientation of a stripe pattern; shapes and per-pixel texture make JPEGs about as large and as costly
to decode as photographs. The folder has the image_list source's layout: train.txt, test.txt (and val.txt
with `val`), classes.txt and images/.
"""

from __future__ import annotations

import colorsys
import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from noisymix.mixing.config import ConfigError, Section, check_range


@dataclass
class SynthSection(Section):
    """What `noisymix synth` writes: `train` + `test` (+ `val`) images of `classes` classes, sides drawn
    from [min_size, max_size] px; `noise_rate` of the train list's labels moved to another class."""

    out: str = "data/synth"
    train: int = 20_000
    val: int = 0
    test: int = 2_000
    classes: int = 14
    min_size: int = 200
    max_size: int = 500
    noise_rate: float = 0.0
    quality: int = 90
    seed: int = 0
    workers: int = 0           # processes; 0 = every CPU

    def validate(self) -> None:
        super().validate()
        for key in ("train", "classes", "min_size", "quality"):
            check_range(key, getattr(self, key), 1)
        for key in ("val", "test", "workers"):
            check_range(key, getattr(self, key), 0)
        check_range("classes", self.classes, 2)
        check_range("quality", self.quality, 1, 100)
        check_range("noise_rate", self.noise_rate, 0.0, 1.0, hi_open=True)
        if self.max_size < self.min_size:
            raise ConfigError(f"max_size={self.max_size} is below min_size={self.min_size}")


def class_image(label: int, classes: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One RGB image of class `label`: hue and stripe orientation say the class, the rest is clutter."""
    width, height = size
    hue = label / classes
    base = np.array(colorsys.hsv_to_rgb(hue, 0.55, 0.85)) * 255
    angle = np.pi * label / classes
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / 24.0))
    pixels = base[None, None, :] * (0.8 + 0.2 * stripes[..., None]) + rng.normal(0, 18, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 10, width // 3)), int(rng.integers(height // 10, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse([x - w, y - h, x + w, y + h], fill=colour) if rng.random() < 0.5 else \
            draw.rectangle([x - w, y - h, x + w, y + h], fill=colour)
    return image


SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}   # a fixed random stream per split (str hashes vary by process)


def _write_images(job: tuple) -> list[str]:
    """Write images start..stop-1 of one split; returns their relative paths."""
    out, split, start, stop, classes, min_size, max_size, quality, seed = job
    paths = []
    for index in range(start, stop):
        rng = np.random.default_rng([seed, SPLIT_STREAMS[split], index])
        label = index % classes
        size = (int(rng.integers(min_size, max_size + 1)), int(rng.integers(min_size, max_size + 1)))
        rel = f"images/{split}/{index // 1000:04d}/{index:07d}.jpg"
        path = Path(out) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        class_image(label, classes, size, rng).save(buffer, "JPEG", quality=quality)
        path.write_bytes(buffer.getvalue())
        paths.append(rel)
    return paths


def synthesize(s: SynthSection, log=print) -> Path:
    """Write the dataset; returns its folder. Labels cycle over the classes (balanced); train labels are
    flipped to a uniformly drawn other class at `noise_rate` (the true ones go to train_true.txt)."""
    out = Path(s.out)
    if (out / "train.txt").exists():
        raise ConfigError(f"{out} already holds a dataset (train.txt); choose another out=")
    workers = s.workers or os.cpu_count() or 1
    splits = {"train": s.train, "val": s.val, "test": s.test}
    chunk = 1000
    lists = {}
    with ProcessPoolExecutor(workers) as pool:
        for split, count in splits.items():
            if not count:
                continue
            jobs = [(str(out), split, a, min(a + chunk, count), s.classes, s.min_size, s.max_size, s.quality,
                     s.seed) for a in range(0, count, chunk)]
            lists[split] = [p for paths in pool.map(_write_images, jobs) for p in paths]
            log(f"synth: {count} {split} images")
    rng = np.random.default_rng(s.seed)
    for split, paths in lists.items():
        true = np.arange(len(paths)) % s.classes
        given = true.copy()
        if split == "train" and s.noise_rate > 0:
            flip = rng.choice(len(true), size=round(s.noise_rate * len(true)), replace=False)
            given[flip] = (true[flip] + rng.integers(1, s.classes, size=flip.size)) % s.classes
            (out / "train_true.txt").write_text("".join(f"{p} {t}\n" for p, t in zip(paths, true)))
        (out / f"{split}.txt").write_text("".join(f"{p} {g}\n" for p, g in zip(paths, given)))
    (out / "classes.txt").write_text("".join(f"class{c}\n" for c in range(s.classes)))
    total = sum(f.stat().st_size for f in (out / "images").rglob("*.jpg"))
    log(f"synth: {sum(splits.values())} JPEGs, {total / 2**20:.1f} MiB, in {out}")
    return out
