"""`noisymix prepare`: a source becomes noisy WebDataset shards plus manifest.json, atomically."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from noisymix.distributed import shards, storage
from noisymix.distributed.engine import peak_rss_mb
from noisymix.distributed.images import PixelSums
from noisymix.launch import image_lists, noise
from noisymix.launch.sources import SOURCES, SourceData, SourceError, read_source
from noisymix.mixing.config import ConfigError, Section, check_choice, check_range


@dataclass
class DataSection(Section):
    """What `prepare` writes: the source, the training subset, the synthetic noise, the validation split,
    the shard count and, for image lists, how images are stored; and where (`data_dir`, `auto`: derived
    from the rest). `prepare_workers` (processes; 0 = every CPU) changes how fast, not what."""

    source: str = "digits"
    source_path: Optional[str] = None
    dataset: str = ""              # "": the source's name
    train_subset: int = 0          # use this many of the source's training samples (stratified, seeded); 0 = all
    class_limit: int = 0           # image lists: keep classes 0..class_limit-1 (mini-WebVision: 50); 0 = all
    stored_size: int = 256         # image lists: shorter side of the stored JPEGs; 0 = the source's own bytes
    jpeg_quality: int = 90
    skip_bad_images: bool = False  # image lists: leave out unreadable files (counted) instead of stopping
    prepare_workers: int = 0
    noise_type: str = "symmetric"
    noise_rate: float = 0.4
    noise_map: Optional[dict] = None
    noise_file: Optional[str] = None
    noise_file_key: Optional[str] = None
    val_fraction: float = 0.1
    num_shards: int = 8
    data_dir: str = "auto"

    def validate(self) -> None:
        super().validate()
        check_choice("source", self.source, SOURCES)
        check_choice("noise_type", self.noise_type, noise.NOISE_TYPES)
        check_range("noise_rate", self.noise_rate, 0.0, 1.0, hi_open=True)
        check_range("val_fraction", self.val_fraction, 0.0, 0.5, lo_open=True)
        check_range("num_shards", self.num_shards, 1)
        check_range("jpeg_quality", self.jpeg_quality, 1, 100)
        for key in ("train_subset", "class_limit", "stored_size", "prepare_workers"):
            check_range(key, getattr(self, key), 0)
        if self.noise_type == "none" and self.noise_rate != 0:
            raise ConfigError(f"noise_type=none needs noise_rate=0, got {self.noise_rate}")
        if self.noise_type == "file" and not self.noise_file:
            raise ConfigError("noise_type=file needs noise_file")
        if self.noise_map is not None:
            try:
                self.noise_map = {int(k): int(v) for k, v in self.noise_map.items()}
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"noise_map must map class ids to class ids, got {self.noise_map!r}") from exc

    def resolve(self, seed: int) -> None:
        """Fill the dataset name and an `auto` data_dir (named by dataset, subset, noise and seed)."""
        if not self.dataset:
            self.dataset = self.source if self.source in ("digits", "cifar") else Path(self.source_path or self.source).name
        if self.data_dir == "auto":
            rate = f"{round(self.noise_rate * 100):d}"
            subset = f"-n{self.train_subset}" if self.train_subset else ""
            self.data_dir = str(Path("data") / f"{self.dataset}{subset}-{self.noise_type}{rate}-seed{seed}")

    def spec(self, seed: int) -> dict:
        """The values that decide what prepare writes, as manifest.json holds them (JSON: class-map keys are
        strings); a data_dir prepared with other values is stale. The image-list keys count for image lists only."""
        skip = {"data_dir", "prepare_workers"} | (set() if self.source == "image_list" else set(IMAGE_LIST_KEYS))
        return json.loads(json.dumps({**{k: v for k, v in self.to_dict().items() if k not in skip}, "seed": seed}))


IMAGE_LIST_KEYS = ("class_limit", "stored_size", "jpeg_quality", "skip_bad_images")
RETIRED_DATA_KEYS = ("image_size",)   # image lists keep their aspect ratio now: stored_size, and crop_size in training


def _recorded_spec(manifest: dict, seed: int) -> dict:
    """The data spec a manifest was written with; a key added after it was written held its default."""
    recorded = {k: v for k, v in manifest.get("spec", {}).items() if k not in RETIRED_DATA_KEYS}
    source = recorded.get("source", DataSection.source)
    return {**DataSection(source=source).spec(seed), **recorded}


def _subsample(source: SourceData, size: int, seed: int) -> SourceData:
    """`size` of the source's training samples, stratified by its labels and drawn with `seed`; each keeps
    its reference into the full source, so samples.csv still points at the original sample."""
    keep, refs = _subset_rows(source.train_labels, size, source.name, seed), _train_refs(source)
    return dataclasses.replace(source, train_images=source.train_images[keep], train_labels=source.train_labels[keep],
                               train_refs=[refs[k] for k in keep])


def _train_refs(source: SourceData) -> list[str]:
    """Where each training sample came from in the source."""
    return source.train_refs or [f"train:{k}" for k in range(len(source.train_labels))]


def _split_val(given: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices of (train, val): val is a held-out slice stratified by the GIVEN label (where both parts
    can hold every class; a tiny dataset gets a plain random slice)."""
    from sklearn.model_selection import train_test_split  # here: importing scikit-learn costs every CLI start 1.4 s

    index = np.arange(len(given))
    counts = np.bincount(given)
    present, n_val = int((counts > 0).sum()), int(np.ceil(fraction * len(given)))
    possible = counts[counts > 0].min() >= 2 and present <= n_val <= len(given) - present
    stratify = given if possible else None
    train, val = train_test_split(index, test_size=fraction, stratify=stratify, random_state=seed)
    return np.sort(train), np.sort(val)


def _pixel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, summed in chunks (no float copy of the whole array)."""
    sums = PixelSums()
    for start in range(0, len(images), chunk):
        sums.add(images[start:start + chunk])
    return sums.mean_std()


def staging_dir(target: str, spec: dict) -> Path:
    """Where a prepare of `spec` writes before the atomic rename (or, for an object store, the upload): named by
    the spec, so a re-run of the same prepare finds the shards an interrupted one finished. A URL's staging
    folder is local, under NOISYMIX_CACHE (default ~/.cache/noisymix)."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return _staging_parent(target) / f".{_staging_name(target)}.partial-{digest}"


def _staging_parent(target: str) -> Path:
    if storage.is_url(target):
        return storage.local_cache("prepare")
    return Path(target).parent


def _staging_name(target: str) -> str:
    return storage.flat_name(target) if storage.is_url(target) else Path(target).name


def remove_stale_staging(target: str, keep: Path, log) -> None:
    """Staging folders of earlier prepares of this target with other specs: never finished, never resumable."""
    for stale in _staging_parent(target).glob(f".{_staging_name(target)}.partial-*"):
        if stale != keep and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
            log(f"prepare: removed {stale}, left by an interrupted prepare with other settings")


def _check_reusable(target: str, spec: dict, seed: int, force: bool, log) -> bool:
    """True when target already holds this dataset; refuses a target prepared otherwise or not by us."""
    if storage.is_file(storage.join(target, shards.MANIFEST)):
        existing = shards.load_manifest(target)
        recorded = _recorded_spec(existing, seed)
        if recorded == spec and not force:
            shards.check_shards(target, existing)
            log(f"data ready: {target} (already prepared with this spec)")
            return True
        if not force:
            changed = sorted(k for k in spec if recorded.get(k) != spec[k])
            raise SourceError(f"{target} was prepared with other settings ({', '.join(changed)} differ): "
                              "choose another data_dir, or rebuild it with `noisymix prepare ... --force`")
    elif storage.list_files(target):
        raise SourceError(f"{target} exists and is not a prepared dataset (no {shards.MANIFEST}); refusing to write into it")
    return False


def prepare(config: DataSection, seed: int, force: bool = False, log=print) -> Path | str:
    """Write the dataset of `config` to config.data_dir (a folder or an object-store URL); reuse it when already
    prepared with the same spec.

    Everything is written to a staging folder and renamed into place (or uploaded, the manifest last) at the
    end, so nothing half-written looks prepared. An interrupted image-list prepare keeps its finished shards
    there for the next run."""
    target = config.data_dir if storage.is_url(config.data_dir) else str(Path(config.data_dir))
    spec = config.spec(seed)
    if _check_reusable(target, spec, seed, force, log):
        return _as_location(target)
    staging = staging_dir(target, spec)
    staging.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target, staging, log)
    resumable = config.source == "image_list"
    if not resumable:
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(exist_ok=True)
    started = time.perf_counter()
    try:
        write = _write_image_list if resumable else _write_arrays
        manifest = {"format_version": shards.FORMAT_VERSION, "source": config.source,
                    **write(config, seed, staging, log), "spec": spec, "created_unix": time.time()}
        manifest["prepare"] = {**manifest.get("prepare", {}), "seconds": time.perf_counter() - started}
        (staging / shards.MANIFEST).write_text(json.dumps(manifest, indent=2))
        publish(staging, target)
    except BaseException:
        if not (resumable and image_lists.has_finished_shards(staging)):
            shutil.rmtree(staging, ignore_errors=True)
        raise
    counts = {split: info["count"] for split, info in manifest["splits"].items()}
    rate = manifest["noise"]["realised_rate"]
    log(f"prepared {manifest['dataset']}: {counts['train']} train / {counts['val']} val / {counts['test']} test, "
        f"{config.noise_type} noise r={config.noise_rate} (realised {'unknown' if rate is None else f'{rate:.3f}'}) "
        f"-> {target} in {time.perf_counter() - started:.1f}s")
    return _as_location(target)


def _as_location(target: str) -> Path | str:
    """A folder as a Path, a URL as it is."""
    return target if storage.is_url(target) else Path(target)


def publish(staging: Path, target: str) -> None:
    """Put a finished staging folder in place: one rename on a file system; on an object store, the old
    objects deleted (the manifest first: from then on nothing looks prepared), every file uploaded, the
    manifest last."""
    if not storage.is_url(target):
        staging.chmod(0o755)
        if Path(target).exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        return
    old = storage.list_files(target)
    for name in sorted(old, key=lambda name: name != shards.MANIFEST):
        storage.delete(storage.join(target, name))
    for path in sorted(staging.rglob("*")):
        if path.is_file() and path.name != shards.MANIFEST:
            storage.upload(path, storage.join(target, path.relative_to(staging).as_posix()))
    storage.upload(staging / shards.MANIFEST, storage.join(target, shards.MANIFEST))
    shutil.rmtree(staging)


def _noise_record(config: DataSection, seed: int, given: np.ndarray, true: np.ndarray | None,
                  train_idx: np.ndarray, val_idx: np.ndarray) -> dict:
    def rate(idx=slice(None)):
        return None if true is None else noise.realised_rate(given[idx], true[idx])

    return {"type": config.noise_type, "rate": config.noise_rate, "seed": seed, "map": config.noise_map,
            "file": config.noise_file, "realised_rate": rate(), "realised_rate_train": rate(train_idx),
            "realised_rate_val": rate(val_idx)}


def _write_arrays(config: DataSection, seed: int, staging: Path, log) -> dict:
    """An in-memory source (digits, IDX, CIFAR: small images) as npy shards."""
    source = read_source(config.source, config.source_path, config.dataset or None)
    if config.train_subset:
        source = _subsample(source, config.train_subset, seed)
    given = noise.apply_noise(
        source.train_labels, source.num_classes, config.noise_type, config.noise_rate, seed,
        images=source.train_images, dataset=source.name, class_map=config.noise_map,
        noise_file=config.noise_file, noise_file_key=config.noise_file_key,
    )
    true = source.train_labels
    train_idx, val_idx = _split_val(given, config.val_fraction, seed)
    n_train, n_val = len(train_idx), len(val_idx)
    ids = {"train": np.arange(n_train), "val": n_train + np.arange(n_val),
           "test": n_train + n_val + np.arange(len(source.test_labels))}
    splits = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        info = shards.write_split(staging, split, ids[split], source.train_images[idx], given[idx], true[idx],
                                  config.num_shards)
        splits[split] = {"count": int(len(idx)), "shards": info,
                         "labels": shards.write_labels(staging, split, given[idx], true[idx])}
    info = shards.write_split(staging, "test", ids["test"], source.test_images, source.test_labels,
                              source.test_labels, config.num_shards)
    splits["test"] = {"count": int(len(source.test_labels)), "shards": info,
                      "labels": shards.write_labels(staging, "test", source.test_labels, source.test_labels)}
    source_refs = _train_refs(source)
    refs = {"train": [source_refs[k] for k in train_idx], "val": [source_refs[k] for k in val_idx],
            "test": [f"test:{k}" for k in range(len(source.test_labels))]}
    _write_sample_refs(staging / "samples.csv", ids, refs)
    mean, std = _pixel_stats(source.train_images[train_idx])
    return {"dataset": source.name, "num_classes": source.num_classes, "class_names": source.class_names,
            "image_format": "npy", "image_shape": list(source.train_images.shape[1:]), "mean": mean, "std": std,
            "has_true_labels": True, "noise": _noise_record(config, seed, given, true, train_idx, val_idx),
            "splits": splits}


def _write_image_list(config: DataSection, seed: int, staging: Path, log) -> dict:
    """An image list as JPEG shards, one process per shard (launch.image_lists)."""
    if config.noise_type != "none":
        raise SourceError(f"{config.source_path} is an image list with its own (noisy) labels; synthetic noise "
                          f"({config.noise_type}) cannot be injected into it: set noise_type=none noise_rate=0")
    listing = image_lists.scan_image_list(config.source_path, config.class_limit, config.dataset or None)
    workers = config.prepare_workers or os.cpu_count() or 1
    if config.skip_bad_images:
        listing = image_lists.drop_unreadable(listing, workers, log)
    train = listing.splits["train"]
    if config.train_subset:
        train = train.take(_subset_rows(train.labels, config.train_subset, listing.name, seed))
    if "val" in listing.splits:
        val_idx = np.empty(0, np.int64)
        parts = {"train": train, "val": listing.splits["val"], "test": listing.splits["test"]}
    else:
        train_idx, val_idx = _split_val(train.labels, config.val_fraction, seed)
        parts = {"train": train.take(train_idx), "val": train.take(val_idx), "test": listing.splits["test"]}
    parts["test"].true_labels = parts["test"].labels   # test labels are taken as true
    first, jobs, ranges = 0, [], {}
    stats_every = image_lists.stats_stride(len(parts["train"]))
    for split, part in parts.items():
        ids = first + np.arange(len(part))
        chunks = np.array_split(np.arange(len(part)), max(1, min(config.num_shards, len(part))))
        ranges[split] = (len(jobs), len(jobs) + len(chunks), ids)
        jobs += [image_lists.ShardJob(staging / shards.shard_name(split, n), listing.root, part.take(chunk),
                                      ids[chunk], config.stored_size, config.jpeg_quality,
                                      stats_every if split == "train" else 0)
                 for n, chunk in enumerate(chunks)]
        first += len(part)
    results = image_lists.write_image_shards(jobs, workers, log)
    image_lists.remove_records(job.target for job in jobs)
    splits = {}
    for split, (a, b, ids) in ranges.items():
        infos = [r["info"] for r in results[a:b]]
        shards.write_index(staging, split, [r["rows"] for r in results[a:b]])
        splits[split] = {"count": int(len(ids)), "shards": infos,
                         "min_side": int(min(r["min_side"] for r in results[a:b])),
                         "labels": shards.write_labels(staging, split, parts[split].labels, parts[split].true_labels)}
    sums = PixelSums()
    for r in results[ranges["train"][0]:ranges["train"][1]]:
        sums = sums.merge(PixelSums(**r["sums"]))
    mean, std = sums.mean_std()
    refs = {split: _line_refs(part) for split, part in parts.items()}
    _write_sample_refs(staging / "samples.csv", {split: r[2] for split, r in ranges.items()}, refs)
    given, true = train.labels, train.true_labels
    if "val" in listing.splits:
        given, true, train_idx = parts["train"].labels, parts["train"].true_labels, np.arange(len(parts["train"]))
    return {"dataset": listing.name, "num_classes": listing.num_classes, "class_names": listing.class_names,
            "image_format": "jpeg", "stored_size": config.stored_size, "image_shape": None, "mean": mean, "std": std,
            "prepare": {"workers": workers, "stats_every": stats_every,
                        "writer_peak_rss_mb": max(r["peak_rss_mb"] for r in results),
                        "driver_peak_rss_mb": peak_rss_mb()},
            "has_true_labels": true is not None, "noise": _noise_record(config, seed, given, true, train_idx, val_idx),
            "splits": splits}


def _subset_rows(labels: np.ndarray, size: int, name: str, seed: int) -> np.ndarray:
    """`size` rows stratified by label, drawn with `seed`, in their original order."""
    if size > len(labels):
        raise SourceError(f"train_subset={size} is more than the {len(labels)} training samples of {name}")
    try:
        from sklearn.model_selection import train_test_split  # here: see _split_val

        keep, _ = train_test_split(np.arange(len(labels)), train_size=size, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise SourceError(f"train_subset={size} cannot hold every class of {name}: {exc}") from exc
    return np.sort(keep)


def _line_refs(part: image_lists.ListedSplit) -> Iterator[str]:
    """'list.txt:LINE' of each of the split's lines, made one at a time as samples.csv is written."""
    name = part.path.name
    return (f"{name}:{line}" for line in part.lines)


def _write_sample_refs(path: Path, ids: dict[str, np.ndarray], refs: dict[str, Iterable[str]]) -> None:
    """samples.csv: id -> split and where the sample came from (a source index, or list file and line); refs
    may be generators, so that an image list's N references are never held at once."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "split", "source_ref"])
        for split in ("train", "val", "test"):
            for sample_id, ref in zip(ids[split], refs[split]):
                writer.writerow([int(sample_id), split, ref])
