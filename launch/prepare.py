"""`noisymix prepare`: a source becomes noisy WebDataset shards plus manifest.json, atomically."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from sklearn.model_selection import train_test_split

from noisymix.distributed import shards
from noisymix.launch import noise
from noisymix.launch.sources import SOURCES, SourceData, SourceError, read_source
from noisymix.mixing.config import ConfigError, Section, check_choice, check_range


@dataclass
class DataSection(Section):
    """What `prepare` writes: the source, the training subset, the image size, the synthetic noise, the
    validation split and the shard count; and where (`data_dir`, `auto`: derived from the rest)."""

    source: str = "digits"
    source_path: Optional[str] = None
    dataset: str = ""              # "": the source's name
    train_subset: int = 0          # use this many of the source's training samples (stratified, seeded); 0 = all
    image_size: int = 32
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
        for key in ("image_size", "num_shards"):
            check_range(key, getattr(self, key), 1)
        check_range("train_subset", self.train_subset, 0)
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
        strings); a data_dir prepared with other values is stale."""
        return json.loads(json.dumps({**{k: v for k, v in self.to_dict().items() if k != "data_dir"}, "seed": seed}))


def _recorded_spec(manifest: dict, seed: int) -> dict:
    """The data spec a manifest was written with; a key added after it was written held its default."""
    return {**DataSection().spec(seed), **manifest.get("spec", {})}


def _subsample(source: SourceData, size: int, seed: int) -> SourceData:
    """`size` of the source's training samples, stratified by its labels and drawn with `seed`; each keeps
    its reference into the full source, so samples.csv still points at the original sample."""
    total = len(source.train_labels)
    if size > total:
        raise SourceError(f"train_subset={size} is more than the {total} training samples of {source.name}")
    try:
        keep, _ = train_test_split(np.arange(total), train_size=size, stratify=source.train_labels, random_state=seed)
    except ValueError as exc:
        raise SourceError(f"train_subset={size} cannot hold every class of {source.name} "
                          f"({source.num_classes} classes): {exc}") from exc
    keep, refs = np.sort(keep), _train_refs(source)
    return dataclasses.replace(source, train_images=source.train_images[keep], train_labels=source.train_labels[keep],
                               train_refs=[refs[k] for k in keep])


def _train_refs(source: SourceData) -> list[str]:
    """Where each training sample came from: its image path for image lists, its source index otherwise."""
    return source.train_refs or [f"train:{k}" for k in range(len(source.train_labels))]


def _inject(source: SourceData, config: DataSection, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(given labels, true labels or None) of the source's train split."""
    if not source.train_labels_true:
        if config.noise_type != "none":
            raise SourceError(
                f"{source.name} carries real noisy labels with unknown truth; synthetic noise "
                f"({config.noise_type}) cannot be measured on it: set noise_type=none noise_rate=0"
            )
        return source.train_labels.copy(), None
    given = noise.apply_noise(
        source.train_labels, source.num_classes, config.noise_type, config.noise_rate, seed,
        images=source.train_images, dataset=source.name, class_map=config.noise_map,
        noise_file=config.noise_file, noise_file_key=config.noise_file_key,
    )
    return given, source.train_labels


def _split_val(given: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices of (train, val): val is a held-out slice stratified by the GIVEN label."""
    index = np.arange(len(given))
    counts = np.bincount(given)
    stratify = given if counts[counts > 0].min() >= 2 else None
    train, val = train_test_split(index, test_size=fraction, stratify=stratify, random_state=seed)
    return np.sort(train), np.sort(val)


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    flat = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return flat.mean(axis=0).tolist(), np.maximum(flat.std(axis=0), 1e-3).tolist()


def prepare(config: DataSection, seed: int, force: bool = False, log=print) -> Path:
    """Write the dataset of `config` to config.data_dir; reuse it when already prepared with the same spec."""
    target = Path(config.data_dir)
    spec = config.spec(seed)
    if (target / shards.MANIFEST).is_file():
        existing = shards.load_manifest(target)
        recorded = _recorded_spec(existing, seed)
        if recorded == spec and not force:
            shards.check_shards(target, existing)
            log(f"data ready: {target} (already prepared with this spec)")
            return target
        if not force:
            changed = sorted(k for k in spec if recorded.get(k) != spec[k])
            raise SourceError(f"{target} was prepared with other settings ({', '.join(changed)} differ): "
                              "choose another data_dir or pass --force to rebuild it")
    elif target.exists() and any(target.iterdir()):
        raise SourceError(f"{target} exists and is not a prepared dataset (no {shards.MANIFEST}); refusing to write into it")

    started = time.perf_counter()
    source = read_source(config.source, config.source_path, config.image_size, config.dataset or None)
    if config.train_subset:
        source = _subsample(source, config.train_subset, seed)
    given, true = _inject(source, config, seed)
    train_idx, val_idx = _split_val(given, config.val_fraction, seed)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        n_train, n_val = len(train_idx), len(val_idx)
        ids = {"train": np.arange(n_train), "val": n_train + np.arange(n_val),
               "test": n_train + n_val + np.arange(len(source.test_labels))}
        splits = {}
        for split, idx in (("train", train_idx), ("val", val_idx)):
            info = shards.write_split(staging, split, ids[split], source.train_images[idx], given[idx],
                                      None if true is None else true[idx], config.num_shards)
            splits[split] = {"count": int(len(idx)), "shards": info}
        info = shards.write_split(staging, "test", ids["test"], source.test_images, source.test_labels,
                                  source.test_labels, config.num_shards)
        splits["test"] = {"count": int(len(source.test_labels)), "shards": info}
        _write_sample_index(staging / "samples.csv", ids, train_idx, val_idx, source)

        mean, std = _channel_stats(source.train_images[train_idx])
        manifest = {
            "format_version": shards.FORMAT_VERSION,
            "dataset": source.name,
            "source": config.source,
            "num_classes": source.num_classes,
            "class_names": source.class_names,
            "image_shape": list(source.train_images.shape[1:]),
            "mean": mean,
            "std": std,
            "has_true_labels": true is not None,
            "noise": {
                "type": config.noise_type, "rate": config.noise_rate, "seed": seed,
                "map": config.noise_map, "file": config.noise_file,
                "realised_rate": None if true is None else noise.realised_rate(given, true),
                "realised_rate_train": None if true is None else noise.realised_rate(given[train_idx], true[train_idx]),
                "realised_rate_val": None if true is None else noise.realised_rate(given[val_idx], true[val_idx]),
            },
            "splits": splits,
            "spec": spec,
            "created_unix": time.time(),
        }
        (staging / shards.MANIFEST).write_text(json.dumps(manifest, indent=2))
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    rate = manifest["noise"]["realised_rate"]
    log(f"prepared {source.name}: {n_train} train / {n_val} val / {splits['test']['count']} test, "
        f"{config.noise_type} noise r={config.noise_rate} (realised "
        f"{'unknown' if rate is None else f'{rate:.3f}'}) -> {target} in {time.perf_counter() - started:.1f}s")
    return target


def _write_sample_index(path: Path, ids: dict, train_idx: np.ndarray, val_idx: np.ndarray, source: SourceData) -> None:
    """id -> split and where the sample came from (source index, or image path for image lists)."""
    refs = _train_refs(source)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "split", "source_ref"])
        for split, idx in (("train", train_idx), ("val", val_idx)):
            for sample_id, k in zip(ids[split], idx):
                writer.writerow([int(sample_id), split, refs[k]])
        for sample_id, k in zip(ids["test"], range(len(source.test_labels))):
            writer.writerow([int(sample_id), "test", f"test:{k}"])
