"""WebDataset shards: how samples are written, checked and streamed to ranks.

A sample is a tar group keyed by its zero-padded id: `<id>.input.npy` (uint8 H x W x C), `<id>.cls`
(the given label) and, where known, `<id>.clean.cls` (the true label, for evaluation only). Readers pick tar members
by name, so a stream opened for training never even extracts the true label.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from functools import partial
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
GIVEN_LABEL = "cls"
TRUE_LABEL = "clean.cls"
# The tar member of each label a method may train on (mixing.method.GIVEN / TRUE).
LABEL_KEYS = {"given": GIVEN_LABEL, "true": TRUE_LABEL}


class ShardError(ValueError):
    """A shard or manifest that is missing, truncated, corrupt or inconsistent."""


def encode_sample(sample_id: int, image: np.ndarray, label: int, true_label: int | None) -> dict:
    """The tar members of one sample, as bytes: no pickle anywhere."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(image, dtype=np.uint8), allow_pickle=False)
    sample = {"__key__": f"{sample_id:010d}", "input.npy": buf.getvalue(), GIVEN_LABEL: b"%d" % label}
    if true_label is not None:
        sample[TRUE_LABEL] = b"%d" % true_label
    return sample


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_split(directory: Path, split: str, ids: np.ndarray, images: np.ndarray, labels: np.ndarray,
                true_labels: np.ndarray | None, num_shards: int) -> list[dict]:
    """Write one split as num_shards tar files whose sizes differ by at most one sample."""
    num_shards = max(1, min(num_shards, len(ids)))
    shards = []
    for index, part in enumerate(np.array_split(np.arange(len(ids)), num_shards)):
        name = f"{split}-{index:06d}.tar"
        # A fixed integer mtime keeps tar headers plain ustar (a float mtime adds a PAX header per
        # member, which halves read speed) and makes shards byte-identical for the same seed.
        with wds.TarWriter(str(directory / name), encoder=False, mtime=0) as sink:
            for k in part:
                true = None if true_labels is None else int(true_labels[k])
                sink.write(encode_sample(int(ids[k]), images[k], int(labels[k]), true))
        path = directory / name
        shards.append({"name": name, "count": int(len(part)), "bytes": path.stat().st_size, "sha256": _sha256(path)})
    return shards


def load_manifest(data_dir: str | Path) -> dict:
    """Read and sanity-check manifest.json; shards are checked by `check_shards`."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"no {MANIFEST} in {data_dir}: run `noisymix prepare` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    for split in ("train", "val", "test"):
        if split not in manifest.get("splits", {}):
            raise ShardError(f"{path} lists no {split!r} split")
    return manifest


def check_shards(data_dir: str | Path, manifest: dict, full: bool = False) -> None:
    """Every shard of the manifest exists with its recorded size (and checksum when full=True)."""
    for split, info in manifest["splits"].items():
        if not info["shards"]:
            raise ShardError(f"split {split!r} of {data_dir} has no shards")
        for shard in info["shards"]:
            path = Path(data_dir) / shard["name"]
            if not path.is_file():
                raise ShardError(f"shard {path} is missing")
            size = path.stat().st_size
            if size != shard["bytes"]:
                raise ShardError(f"shard {path} has {size} bytes, the manifest says {shard['bytes']}: truncated or replaced")
            if full and _sha256(path) != shard["sha256"]:
                raise ShardError(f"shard {path} fails its sha256 check")


def shard_urls(data_dir: str | Path, manifest: dict, split: str) -> list[str]:
    return [str(Path(data_dir) / shard["name"]) for shard in manifest["splits"][split]["shards"]]


@dataclass(frozen=True)
class RankShards:
    """WebDataset node splitter: a fresh seeded shard permutation each epoch, dealt round-robin to ranks.

    Unlike split_by_node, a rank sees different shards in different epochs, and every shard still
    goes to exactly one rank, so each id is seen exactly once per epoch across ranks.
    """

    rank: int
    world_size: int
    seed: int | None = None

    def __call__(self, src):
        urls = list(src)
        if self.seed is not None:
            random.Random(self.seed).shuffle(urls)
        yield from urls[self.rank::self.world_size]


def _reraise_with_shard(exn: Exception) -> bool:
    raise ShardError(f"corrupt or unreadable shard: {exn}") from exn


def _member_filter(fields: Sequence[str]):
    wanted = set(fields)

    def keep(member_name: str) -> bool:
        _, _, ext = Path(member_name).name.partition(".")
        return ext in wanted

    return keep


class NpyDecoder:
    """np.load for a stream of same-shaped arrays: the .npy header is parsed once and then reused.

    Parsing the header (a Python literal) costs more than the pixels of a small image; samples of one
    dataset share it, so later ones whose header bytes match are read with np.frombuffer.
    """

    def __init__(self):
        self._header = b""
        self._layout: tuple[int, tuple, np.dtype] | None = None

    def __call__(self, data: bytes) -> np.ndarray:
        if self._layout is not None and data.startswith(self._header):
            offset, shape, dtype = self._layout
            return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
        if fortran or dtype.hasobject:
            raise ValueError("only C-ordered arrays of plain dtypes are accepted")
        self._header, self._layout = data[:stream.tell()], (stream.tell(), shape, dtype)
        return np.frombuffer(data, dtype=dtype, offset=stream.tell()).reshape(shape)


def _decode(sample: dict, label_key: str, decode_npy: NpyDecoder) -> tuple[int, np.ndarray, int]:
    try:
        image = decode_npy(sample["input.npy"])
        return int(sample["__key__"]), image, int(sample[label_key])
    except KeyError as exc:
        raise ShardError(f"{sample.get('__url__')}: sample {sample.get('__key__')} lacks the field {exc}") from exc
    except ValueError as exc:
        raise ShardError(f"{sample.get('__url__')}: sample {sample.get('__key__')} does not decode: {exc}") from exc


def collate(samples: list[tuple[int, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, images, labels = zip(*samples)
    return np.asarray(ids, dtype=np.int64), np.stack(images), np.asarray(labels, dtype=np.int64)


def _shard_dataset(urls: Sequence[str], members: Sequence[str], rank: int = 0, world_size: int = 1,
                   shard_seed: int | None = None) -> wds.WebDataset:
    """The raw samples of this rank's shards, with only the named members read from the tars."""
    if len(urls) < world_size:
        raise ShardError(f"{len(urls)} shards cannot feed {world_size} ranks: prepare with num_shards >= {world_size}")
    return wds.WebDataset(
        list(urls), shardshuffle=False, nodesplitter=RankShards(rank, world_size, shard_seed),
        workersplitter=wds.split_by_worker, handler=_reraise_with_shard, empty_check=False,
        select_files=_member_filter(members),
    )


def _decode_label(sample: dict, label_key: str) -> tuple[int, int]:
    try:
        return int(sample["__key__"]), int(sample[label_key])
    except KeyError as exc:
        raise ShardError(f"{sample.get('__url__')}: sample {sample.get('__key__')} lacks the field {exc}") from exc


def label_stream(urls: Sequence[str], *, label_key: str = GIVEN_LABEL) -> wds.WebDataset:
    """(id, label) of every sample in fixed order, the images never decoded or kept.

    The image member is still selected, so that a sample without its label raises as in sample_stream
    instead of vanishing from the stream (WebDataset drops a sample none of whose members are selected).
    """
    return _shard_dataset(urls, ("input.npy", label_key)).map(partial(_decode_label, label_key=label_key))


def sample_stream(urls: Sequence[str], *, label_key: str = GIVEN_LABEL, rank: int = 0, world_size: int = 1,
                  shard_seed: int | None = None, shuffle_buffer: int = 0, shuffle_seed: int = 0,
                  batch_size: int | None = None) -> wds.WebDataset:
    """(id, image, label) samples, or collated batches, of this rank's shards.

    Only the members `input.npy` and `label_key` are read from the tars. With shard_seed=None
    the order is fixed (exact passes: evaluation, loss passes); otherwise shards are permuted with
    shard_seed and samples shuffled in a buffer seeded by shuffle_seed.
    """
    dataset = _shard_dataset(urls, ("input.npy", label_key), rank, world_size, shard_seed).map(
        partial(_decode, label_key=label_key, decode_npy=NpyDecoder()))
    if shuffle_buffer > 1:
        dataset = dataset.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(shuffle_seed))
    if batch_size:
        dataset = dataset.batched(batch_size, collation_fn=collate, partial=True)
    return dataset


def iterate_batches(dataset, loader_workers: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Run a batched stream in-process, or through a WebLoader with loader_workers processes."""
    if loader_workers <= 0:
        return iter(dataset)
    return iter(wds.WebLoader(dataset, batch_size=None, num_workers=loader_workers))


def load_split(data_dir: str, manifest: dict, split: str = "train",
               label_key: str = GIVEN_LABEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, uint8 images, labels) of a whole split in id order: one exact pass over its shards.

    label_key is the given label unless an evaluation asks for the true one.
    """
    stream = sample_stream(shard_urls(data_dir, manifest, split), label_key=label_key, batch_size=4096)
    parts = list(stream)
    ids = np.concatenate([p[0] for p in parts])
    order = np.argsort(ids)
    return ids[order], np.concatenate([p[1] for p in parts])[order], np.concatenate([p[2] for p in parts])[order]


def load_labels(data_dir: str, manifest: dict, split: str = "train", label_key: str = GIVEN_LABEL) -> np.ndarray:
    """The labels of a whole split in id order, read without the images (load_split's labels, cheaply)."""
    pairs = np.array(list(label_stream(shard_urls(data_dir, manifest, split), label_key=label_key)),
                     dtype=np.int64).reshape(-1, 2)
    return pairs[np.argsort(pairs[:, 0]), 1]
