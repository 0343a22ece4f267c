"""Readers that turn a raw dataset on disk into uint8 image arrays (N, H, W, C) and integer labels."""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SOURCES = ("digits", "idx", "cifar", "image_list")


class SourceError(ValueError):
    """A dataset source that is missing, unreadable or inconsistent."""


@dataclass
class SourceData:
    """A dataset as read from its source: train and test arrays, before noise and splitting.

    train_labels are the true classes: synthetic noise is injected into them and measured against them.
    """

    name: str
    num_classes: int
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str] = field(default_factory=list)
    train_refs: list[str] | None = None

    def __post_init__(self):
        for split, images, labels in (("train", self.train_images, self.train_labels),
                                      ("test", self.test_images, self.test_labels)):
            if images.ndim != 4 or images.dtype != np.uint8:
                raise SourceError(f"{self.name} {split} images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
            if len(images) != len(labels):
                raise SourceError(f"{self.name} {split}: {len(images)} images but {len(labels)} labels")
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                bad = int(np.flatnonzero((labels < 0) | (labels >= self.num_classes))[0])
                raise SourceError(
                    f"{self.name} {split}: label {int(labels[bad])} of sample {bad} is outside [0, {self.num_classes})"
                )
        if len(self.train_labels) == 0:
            raise SourceError(f"{self.name}: the train split is empty")
        empty = np.flatnonzero(np.bincount(self.train_labels, minlength=self.num_classes) == 0)
        if empty.size:
            largest = int(max(self.train_labels.max(), self.test_labels.max(initial=0)))
            raise SourceError(
                f"{self.name}: {empty.size} of {self.num_classes} classes (ids {int(empty[0])}..{int(empty[-1])}) have "
                f"no training sample; the largest label is {largest}: is a label outside the real class range?"
            )


def read_digits(test_fraction: float = 0.2) -> SourceData:
    """scikit-learn's 8x8 digits; a fixed stratified 20% becomes the test split (same for every seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=0
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return SourceData("digits", 10, images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                      class_names=[str(c) for c in range(10)])


def _open_maybe_gz(path: Path) -> bytes:
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            return fh.read()
    except (OSError, EOFError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise SourceError(f"missing IDX file {stem}[.gz] in {directory}")


def read_idx_file(path: Path) -> np.ndarray:
    """One IDX file (MNIST format): magic 2049 for labels (1-d) or 2051 for images (3-d), big-endian."""
    raw = _open_maybe_gz(path)
    if len(raw) < 8:
        raise SourceError(f"{path} is too short to be an IDX file")
    magic = int.from_bytes(raw[:4], "big")
    ndim = {2049: 1, 2051: 3}.get(magic)
    if ndim is None:
        raise SourceError(f"{path}: wrong IDX magic {magic} (expected 2049 for labels or 2051 for images)")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise SourceError(f"{path}: header says {shape} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(directory: str | Path, name: str | None = None) -> SourceData:
    """A directory of MNIST-format files: train-images/labels and t10k-images/labels, gzipped or not."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SourceError(f"IDX source directory not found: {directory}")
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx_file(_find(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx_file(_find(directory, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1:
            raise SourceError(f"{directory}: {prefix} images must be 3-d and labels 1-d IDX arrays")
        if len(images) != len(labels):
            raise SourceError(f"{directory}: {len(images)} {prefix} images but {len(labels)} labels")
        arrays[split] = (images[..., None].copy(), labels.astype(np.int64))
    num_classes = int(max(arrays["train"][1].max(), arrays["test"][1].max())) + 1
    return SourceData(name or directory.name, num_classes, *arrays["train"], *arrays["test"],
                      class_names=[str(c) for c in range(num_classes)])


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR's python batches contain (numpy arrays in dicts); any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise SourceError(f"refusing to unpickle {module}.{name}: CIFAR batches hold only arrays and lists")
        return super().find_class(module, name)


def load_cifar_batch(path: Path) -> dict:
    """One CIFAR python batch through the restricted unpickler; keys decoded to str."""
    try:
        with open(path, "rb") as fh:
            batch = _CifarUnpickler(fh, encoding="bytes").load()
    except SourceError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise SourceError(f"cannot read CIFAR batch {path}: {exc}") from exc
    if not isinstance(batch, dict):
        raise SourceError(f"CIFAR batch {path} is not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _cifar_arrays(batches: list[dict], label_key: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    except KeyError as exc:
        raise SourceError(f"CIFAR batches in {path} lack key {exc}") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise SourceError(f"CIFAR data in {path} must be rows of 3072 bytes, got {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def read_cifar(directory: str | Path) -> SourceData:
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test) python batches."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SourceError(f"CIFAR source directory not found: {directory}")
    if (directory / "data_batch_1").is_file():
        name, label_key, num_classes = "cifar10", "labels", 10
        train_files = [directory / f"data_batch_{k}" for k in range(1, 6)]
        test_files = [directory / "test_batch"]
    elif (directory / "train").is_file():
        name, label_key, num_classes = "cifar100", "fine_labels", 100
        train_files, test_files = [directory / "train"], [directory / "test"]
    else:
        raise SourceError(f"{directory} holds neither CIFAR-10 (data_batch_1..5) nor CIFAR-100 (train, test) batches")
    for path in train_files + test_files:
        if not path.is_file():
            raise SourceError(f"missing CIFAR batch {path}")
    train = _cifar_arrays([load_cifar_batch(p) for p in train_files], label_key, directory)
    test = _cifar_arrays([load_cifar_batch(p) for p in test_files], label_key, directory)
    return SourceData(name, num_classes, *train, *test, class_names=[str(c) for c in range(num_classes)])


def read_source(source: str, path: str | None, name: str | None = None) -> SourceData:
    """An in-memory source by the kind named in the config (image lists are streamed: launch.image_lists)."""
    if source == "digits":
        return read_digits()
    if source not in SOURCES:
        raise SourceError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if not path:
        raise SourceError(f"source {source!r} needs source_path")
    if source == "idx":
        return read_idx(path, name)
    if source == "cifar":
        return read_cifar(path)
    raise SourceError(f"source {source!r} is not read into memory; prepare streams it")
