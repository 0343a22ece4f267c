"""Image-list sources (Clothing1M / WebVision layout) prepared by parallel, streaming shard writers.

A folder holds `train.txt` and `test.txt` of `relative/path.jpg label` lines, optionally `val.txt` (a
validation list, e.g. Clothing1M's clean 14k for model selection), `train_true.txt` (the true labels of
train.txt's lines, where known: synthetic sets) and `classes.txt` (one class name per line). The lists are
scanned once (each kept line's byte offset, line number and label, 20 bytes per sample); then one process per output
shard reads its lines, re-encodes each image larger than stored_size after a shorter-side resize (a JPEG
that needs none keeps its own bytes), and writes its tar with the offsets of its images and, for the training
split, the pixel sums for mean/std of a systematic sample of its images (`stats_stride`). No process holds
more than one shard's images. A finished shard is kept in the staging folder, so a re-run after an
interruption writes only the shards that are missing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from array import array
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from noisymix.distributed import shards
from noisymix.distributed.engine import peak_rss_mb
from noisymix.distributed.images import CHECK_SIDE, ImageDecodeError, PixelSums, open_rgb, stored_image
from noisymix.launch.sources import SourceError

LISTS = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}
TRUE_TRAIN_LIST = "train_true.txt"
CLASSES_FILE = "classes.txt"
STATS_EVERY, STATS_AT_LEAST = 8, 1000


@dataclass
class ListedSplit:
    """One list file, scanned: per kept line its byte offset, line number, label (and true label)."""

    path: Path
    offsets: np.ndarray
    lines: np.ndarray
    labels: np.ndarray
    true_labels: np.ndarray | None = None

    def take(self, keep: np.ndarray) -> "ListedSplit":
        return ListedSplit(self.path, self.offsets[keep], self.lines[keep], self.labels[keep],
                           None if self.true_labels is None else self.true_labels[keep])

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageList:
    name: str
    root: Path
    num_classes: int
    class_names: list[str]
    splits: dict[str, ListedSplit] = field(default_factory=dict)


def parse_line(raw: bytes, path: Path, lineno: int) -> tuple[str, int] | None:
    """(relative path, label) of one list line; None for a blank line; a malformed line or a path that
    leaves the list's folder is an error naming the file and line."""
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        return None
    parts = text.rsplit(maxsplit=1)
    if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
        raise SourceError(f"{path}:{lineno}: expected 'relative/path.jpg label', got {text!r}")
    rel, label = parts[0], int(parts[1])
    normal = os.path.normpath(rel)
    if os.path.isabs(rel) or normal == ".." or normal.startswith(".." + os.sep):
        raise SourceError(f"{path}:{lineno}: {rel!r} is outside the list's folder {path.parent}")
    if label < 0:
        raise SourceError(f"{path}:{lineno}: label {label} is negative")
    return rel, label


def scan_list(path: Path, class_limit: int = 0) -> ListedSplit:
    """Scan a list file once (every line checked); with class_limit, keep only lines whose label is below it.
    The paths are not kept: the shard writers re-read their lines at the recorded offsets. The columns grow as
    typed arrays (20 bytes per line; Python lists of ints took about 110)."""
    offsets, lines, labels = array("q"), array("i"), array("q")
    with open(path, "rb") as fh:
        offset, lineno = 0, 0
        for raw in fh:
            lineno += 1
            parsed = parse_line(raw, path, lineno)
            if parsed is not None and (not class_limit or parsed[1] < class_limit):
                offsets.append(offset)
                lines.append(lineno)
                labels.append(parsed[1])
            offset += len(raw)
    if not labels:
        raise SourceError(f"{path} lists no images" + (f" of the first {class_limit} classes" if class_limit else ""))
    return ListedSplit(path, np.frombuffer(offsets, np.int64), np.frombuffer(lines, np.int32),
                       np.frombuffer(labels, np.int64))


def scan_image_list(directory: str | Path, class_limit: int = 0, name: str | None = None) -> ImageList:
    directory = Path(directory)
    for split in ("train", "test"):
        if not (directory / LISTS[split]).is_file():
            raise SourceError(f"image-list source {directory} has no {LISTS[split]}")
    listed = {split: scan_list(directory / file, class_limit) for split, file in LISTS.items()
              if (directory / file).is_file()}
    true_path = directory / TRUE_TRAIN_LIST
    if true_path.is_file():
        true, train = scan_list(true_path), listed["train"]
        rows = np.searchsorted(true.lines, train.lines)
        if rows.max() >= len(true) or not np.array_equal(true.lines[rows], train.lines):
            raise SourceError(f"{true_path} does not list the same lines as {directory / LISTS['train']}")
        train.true_labels = true.labels[rows]
    names_file = directory / CLASSES_FILE
    class_names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()] if names_file.is_file() else []
    if class_limit:
        class_names = class_names[:class_limit]
    largest = max(int(s.labels.max()) for s in listed.values())
    num_classes = len(class_names) or largest + 1
    for split in listed.values():
        if split.labels.max() >= num_classes:
            row = int(np.argmax(split.labels >= num_classes))
            raise SourceError(f"{split.path}:{split.lines[row]}: label {split.labels[row]} is outside "
                              f"[0, {num_classes}) ({CLASSES_FILE} names {num_classes} classes)")
    empty = np.flatnonzero(np.bincount(listed["train"].labels, minlength=num_classes) == 0)
    if empty.size:
        raise SourceError(f"{directory / LISTS['train']}: {empty.size} of {num_classes} classes have no training "
                          f"image (first: {int(empty[0])})")
    return ImageList(name or directory.name, directory, num_classes,
                     class_names or [str(c) for c in range(num_classes)], listed)


def stats_stride(train_count: int) -> int:
    """Mean/std come from every s-th training image, s = min(8, count // 1000): at least 1,000 images (or all of
    a smaller set) decoded whole, while the others that need no resize are only proven to decode (cheaper)."""
    return max(1, min(STATS_EVERY, train_count // STATS_AT_LEAST))


def read_line_path(fh, offset: int) -> str:
    fh.seek(offset)
    return fh.readline().decode("utf-8", errors="replace").strip().rsplit(maxsplit=1)[0]


@dataclass
class ShardJob:
    """One output shard: its lines of a list file and the ids they get."""

    target: Path
    root: Path
    split: ListedSplit
    ids: np.ndarray
    stored_size: int
    quality: int
    stats_every: int = 0     # pixel sums from every stats_every-th image of the shard; 0: none (val, test)

    def __call__(self) -> dict:
        """Write the shard; returns its manifest entry, index rows, pixel sums and smallest stored side (the
        record is also saved beside the shard, for a resumed prepare)."""
        sums, sides = PixelSums(), []

        def samples():
            with open(self.split.path, "rb") as fh:
                for k, sample_id in enumerate(self.ids):
                    rel = read_line_path(fh, self.split.offsets[k])
                    where = f"{self.split.path}:{self.split.lines[k]}: {self.root / rel}"
                    with_pixels = self.stats_every > 0 and k % self.stats_every == 0
                    try:
                        data, image, side = stored_image((self.root / rel).read_bytes(), self.stored_size,
                                                          self.quality, with_pixels)
                    except OSError as exc:
                        raise SourceError(f"{where}: cannot read the image: {exc.strerror or exc}") from exc
                    except ImageDecodeError as exc:
                        raise SourceError(f"{where}: not a decodable image ({exc}); set skip_bad_images=true "
                                          "to leave such files out") from exc
                    if with_pixels:
                        sums.add_image(image)
                    sides.append(side)
                    true = None if self.split.true_labels is None else int(self.split.true_labels[k])
                    yield shards.encode_sample(int(sample_id), data, int(self.split.labels[k]), true)

        info, rows = shards.write_shard(self.target, samples(), shards.JPEG_MEMBER)
        done = {"info": info, "sums": asdict(sums), "min_side": int(min(sides, default=0)), "peak_rss_mb": peak_rss_mb()}
        np.save(self.target.with_suffix(".rows.npy"), rows, allow_pickle=False)
        _write_json(self.target.with_suffix(".done.json"), done)
        return {**done, "rows": rows}


def _write_json(path: Path, payload: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(payload))
    os.replace(partial, path)


def finished_shard(target: Path) -> dict | None:
    """The record of a shard an earlier run finished, if its tar is still whole (size and sha256)."""
    done, rows = target.with_suffix(".done.json"), target.with_suffix(".rows.npy")
    if not (done.is_file() and rows.is_file() and target.is_file()):
        return None
    record = json.loads(done.read_text())
    info = record["info"]
    if target.stat().st_size != info["bytes"] or shards.file_sha256(target) != info["sha256"]:
        return None
    return {**record, "rows": np.load(rows, allow_pickle=False)}


def has_finished_shards(staging: Path) -> bool:
    """Whether an interrupted prepare left shards a re-run would keep."""
    return staging.is_dir() and any(staging.glob("*.done.json"))


def remove_records(targets) -> None:
    """Drop the per-shard resume records once every shard is written (the manifest holds what they said)."""
    for target in targets:
        for suffix in (".done.json", ".rows.npy"):
            target.with_suffix(suffix).unlink(missing_ok=True)


def _run_job(job: ShardJob) -> dict:
    return job()


def _readable(job: tuple[Path, Path, np.ndarray]) -> np.ndarray:
    """Which lines at these offsets name a readable, decodable image (a reduced decode: cheap)."""
    list_path, root, offsets = job
    ok = np.zeros(len(offsets), dtype=bool)
    with open(list_path, "rb") as fh:
        for k, offset in enumerate(offsets):
            try:
                open_rgb((root / read_line_path(fh, offset)).read_bytes(), at_least=CHECK_SIDE)
                ok[k] = True
            except (OSError, ImageDecodeError):
                pass
    return ok


def drop_unreadable(image_list: ImageList, workers: int, log) -> ImageList:
    """skip_bad_images: leave out lines whose file cannot be read or decoded, before ids are given."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for name, split in image_list.splits.items():
            chunks = np.array_split(np.arange(len(split)), max(1, len(split) // 2000))
            ok = np.concatenate(list(pool.map(_readable, [(split.path, image_list.root, split.offsets[c])
                                                           for c in chunks])))
            if not ok.all():
                first = int(np.flatnonzero(~ok)[0])
                log(f"prepare: skipped {int((~ok).sum())} of {len(ok)} lines of {split.path} whose image cannot be "
                    f"read or decoded (first: line {split.lines[first]})")
                image_list.splits[name] = split.take(ok)
    return image_list


class ShardProgress:
    """A progress bar over shards on the log, at most every few seconds."""

    def __init__(self, total: int, images: int, log, every_s: float = 5.0):
        self.total, self.images, self.log, self.every_s = total, images, log, every_s
        self.done = self.done_images = 0
        self.started = self.last = time.perf_counter()

    def shard(self, count: int) -> None:
        self.done += 1
        self.done_images += count
        now = time.perf_counter()
        if now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        rate = self.done_images / max(now - self.started, 1e-9)
        eta = (self.images - self.done_images) / max(rate, 1e-9)
        bar = "#" * round(20 * self.done / self.total)
        self.log(f"prepare: [{bar:<20}] {self.done}/{self.total} shards, {rate:,.0f} images/s, ETA {eta:.0f}s")


def write_image_shards(jobs: list[ShardJob], workers: int, log) -> list[dict]:
    """Run the shard jobs in `workers` processes (skipping shards a previous run finished); results in job order."""
    results: list[dict | None] = [finished_shard(job.target) for job in jobs]
    todo = [k for k, result in enumerate(results) if result is None]
    if len(todo) < len(jobs):
        log(f"prepare: {len(jobs) - len(todo)} of {len(jobs)} shards already written by an earlier run, kept")
    progress = ShardProgress(len(todo), sum(len(jobs[k].ids) for k in todo), log)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, min(workers, len(todo) or 1)), mp_context=context) as pool:
        futures = {pool.submit(_run_job, jobs[k]): k for k in todo}
        try:
            for future in as_completed(futures):
                k = futures[future]
                results[k] = future.result()
                progress.shard(len(jobs[k].ids))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results
