"""WebDataset shards: how samples are written, checked, indexed and streamed to ranks.

A sample is a tar group keyed by its zero-padded id: its image, `<id>.input.npy` (uint8 H x W x C, for
small in-memory sources) or `<id>.jpg` (encoded bytes, for image lists), `<id>.cls` (the given label)
and, where known, `<id>.clean.cls` (the true label, for evaluation only). Readers pick tar members by
name, so a stream opened for training never even extracts the true label. A split's `<split>.index.npy`
holds where each id's image lies in its shard, for reading images by id without holding the dataset.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import random
import shutil
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from noisymix.distributed import storage
from noisymix.distributed.storage import file_sha256

# Shards in object stores stream through pyarrow's file systems (WebDataset's own openers shell out to CLIs).
for _scheme in storage.REMOTE_SCHEMES:
    importlib.import_module("webdataset.gopen").gopen_schemes[_scheme] = storage.gopen_remote

MANIFEST = "manifest.json"
FORMAT_VERSION = 2             # 2: JPEG samples and the per-split index; version 1 (npy only) still reads
READABLE_VERSIONS = (1, 2)
NPY_MEMBER, JPEG_MEMBER = "input.npy", "jpg"
GIVEN_LABEL = "cls"
TRUE_LABEL = "clean.cls"
# The tar member of each label a method may train on (mixing.method.GIVEN / TRUE).
LABEL_KEYS = {"given": GIVEN_LABEL, "true": TRUE_LABEL}


class ShardError(ValueError):
    """A shard or manifest that is missing, truncated, corrupt or inconsistent."""


class SharedMemoryError(RuntimeError):
    """Loader processes could not hand a batch over through shared memory (/dev/shm full, or a container's small
    default)."""


# What torch's DataLoader says when a worker cannot place a batch in shared memory (its tensor's file, or a bus
# error on writing into it), inside the error it re-raises in the consuming process.
SHARED_MEMORY_FAILURES = ("unable to write to file </torch_", "out of shared memory", "insufficient shared memory")


def encode_sample(sample_id: int, image: np.ndarray | bytes, label: int, true_label: int | None) -> dict:
    """The tar members of one sample, as bytes: no pickle anywhere. An array is stored as npy, bytes (an
    encoded JPEG) as they are."""
    if isinstance(image, bytes):
        sample = {"__key__": f"{sample_id:010d}", JPEG_MEMBER: image}
    else:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(image, dtype=np.uint8), allow_pickle=False)
        sample = {"__key__": f"{sample_id:010d}", NPY_MEMBER: buf.getvalue()}
    sample[GIVEN_LABEL] = b"%d" % label
    if true_label is not None:
        sample[TRUE_LABEL] = b"%d" % true_label
    return sample


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def write_shard(path: Path, samples: Iterable[dict], member: str) -> tuple[dict, np.ndarray]:
    """Write one tar shard; returns its manifest entry and the (id, offset, size) rows of its `member`."""
    # A fixed integer mtime keeps tar headers plain ustar (a float mtime adds a PAX header per member,
    # which halves read speed) and makes shards byte-identical for the same seed.
    count = 0
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
            count += 1
    info = {"name": path.name, "count": count, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return info, member_offsets(path, member)


def member_offsets(path: str | Path, member: str) -> np.ndarray:
    """(id, data offset, size) of every `<id>.<member>` in a tar, in file order."""
    rows = []
    with storage.open_input(path) as fh, tarfile.open(fileobj=fh) as tar:
        for info in tar:
            key, _, ext = Path(info.name).name.partition(".")
            if ext == member:
                rows.append((int(key), info.offset_data, info.size))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def write_split(directory: Path, split: str, ids: np.ndarray, images: np.ndarray, labels: np.ndarray,
                true_labels: np.ndarray | None, num_shards: int) -> list[dict]:
    """Write one in-memory split as num_shards tar files whose sizes differ by at most one sample, and its index."""
    num_shards = max(1, min(num_shards, len(ids)))
    shards, index = [], []
    for number, part in enumerate(np.array_split(np.arange(len(ids)), num_shards)):
        samples = (encode_sample(int(ids[k]), images[k], int(labels[k]),
                                 None if true_labels is None else int(true_labels[k])) for k in part)
        info, rows = write_shard(directory / shard_name(split, number), samples, NPY_MEMBER)
        shards.append(info)
        index.append(rows)
    write_index(directory, split, index)
    return shards


def index_file(split: str) -> str:
    return f"{split}.index.npy"


def write_index(directory: Path, split: str, rows: list[np.ndarray]) -> None:
    """`<split>.index.npy`: per id (row = id - the split's first id), the shard number, data offset and size
    of its image member: 24 bytes per sample, filled in place shard by shard (no sorted copies of it)."""
    count = sum(len(r) for r in rows)
    first = min((int(r[:, 0].min()) for r in rows if len(r)), default=0)
    table, seen = np.empty((count, 3), dtype=np.int64), np.zeros(count, dtype=bool)
    for number, shard_rows in enumerate(rows):
        at = shard_rows[:, 0] - first
        if len(at) and int(at.max()) >= count:
            raise ShardError(f"the ids of split {split!r} are not consecutive")
        table[at, 0], table[at, 1:] = number, shard_rows[:, 1:]
        seen[at] = True
    if not seen.all():   # as many rows as ids, so a repeated id leaves another unseen
        raise ShardError(f"the ids of split {split!r} are not consecutive")
    np.save(Path(directory) / index_file(split), table, allow_pickle=False)


def labels_file(split: str) -> str:
    return f"{split}.labels.npy"


def write_labels(directory: Path, split: str, given: np.ndarray, true: np.ndarray | None) -> dict:
    """`<split>.labels.npy`: each id's given and true label (-1: unknown), int32 in id order, 8 bytes per sample,
    so that what reads only labels (folds' stratification, evaluation) never reads the images. Returns the
    split's manifest entry for it."""
    table = np.column_stack([given, np.full(len(given), -1) if true is None else true]).astype(np.int32)
    path = Path(directory) / labels_file(split)
    np.save(path, table, allow_pickle=False)
    return {"name": path.name, "sha256": file_sha256(path)}


def load_manifest(data_dir: str | Path) -> dict:
    """Read and sanity-check manifest.json; shards are checked by `check_shards`."""
    path = storage.join(data_dir, MANIFEST)
    if not storage.is_file(path):
        raise ShardError(f"no {MANIFEST} in {data_dir}: run `noisymix prepare` first")
    try:
        manifest = json.loads(storage.read_bytes(path))
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ShardError(f"{path}: format_version {manifest.get('format_version')} is not one of {READABLE_VERSIONS}: "
                         "prepare it again with this version")
    for split in ("train", "val", "test"):
        if split not in manifest.get("splits", {}):
            raise ShardError(f"{path} lists no {split!r} split")
    return manifest


VERIFIED = ".verified.json"   # shards whose checksum was checked, by name: {size, mtime_ns, sha256}


def check_shards(data_dir: str | Path, manifest: dict, full: bool = False, cached: bool = False) -> int:
    """Every shard of the manifest exists with its recorded size; with full=True its sha256 is checked too,
    and with cached=True only where the shard's size or mtime changed since the last check recorded in
    data_dir/.verified.json (kept when the folder is writable). Returns how many checksums were computed."""
    verified = _read_verified(data_dir) if cached else {}
    computed = 0
    for split, info in manifest["splits"].items():
        if not info["shards"]:
            raise ShardError(f"split {split!r} of {data_dir} has no shards")
        for shard in info["shards"]:
            path = storage.join(data_dir, shard["name"])
            stat = storage.info(path)
            if stat.type != storage.pafs.FileType.File:
                raise ShardError(f"shard {path} is missing")
            if stat.size != shard["bytes"]:
                raise ShardError(f"shard {path} has {stat.size} bytes, the manifest says {shard['bytes']}: "
                                 "truncated or replaced; prepare the dataset again")
            seen = {"size": stat.size, "mtime_ns": stat.mtime_ns, "sha256": shard["sha256"]}
            if full and verified.get(shard["name"]) != seen:
                computed += 1
                if file_sha256(path) != shard["sha256"]:
                    raise ShardError(f"shard {path} fails its sha256 check: its bytes changed since prepare "
                                     "(corrupt or replaced); prepare the dataset again")
                verified[shard["name"]] = seen
    if cached and computed:
        _write_verified(data_dir, verified)
    return computed


def _read_verified(data_dir: str | Path) -> dict:
    try:
        return json.loads(storage.read_bytes(storage.join(data_dir, VERIFIED)))
    except (OSError, ValueError):
        return {}


def _write_verified(data_dir: str | Path, verified: dict) -> None:
    """Best effort: a read-only dataset is checked again on its next use."""
    try:
        storage.write_bytes(storage.join(data_dir, VERIFIED), json.dumps(verified).encode())
    except OSError:
        pass


def shard_urls(data_dir: str | Path, manifest: dict, split: str) -> list[str]:
    return [storage.join(data_dir, shard["name"]) for shard in manifest["splits"][split]["shards"]]


def image_member(manifest: dict) -> str:
    """The tar member holding each sample's image: npy arrays, or JPEG bytes."""
    return JPEG_MEMBER if manifest.get("image_format") == "jpeg" else NPY_MEMBER


def sample_index(data_dir: str | Path, manifest: dict, split: str = "train") -> np.ndarray:
    """The split's (shard number, offset, size) per id: its index file, or a scan of its shards (datasets
    prepared before index files existed)."""
    path = storage.join(data_dir, index_file(split))
    if storage.is_file(path):
        return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
    member = image_member(manifest)
    rows = [member_offsets(url, member) for url in shard_urls(data_dir, manifest, split)]
    table = np.concatenate([np.column_stack([np.full(len(r), n), r[:, 1:]]) for n, r in enumerate(rows)])
    ids = np.concatenate([r[:, 0] for r in rows])
    return table[np.argsort(ids)]


class SampleReader:
    """Images of one split by id, read straight from the shards at their indexed offsets (no decode):
    what partner and neighbour lookups fetch instead of holding the dataset. Files open lazily, per process."""

    def __init__(self, data_dir: str | Path, manifest: dict, split: str = "train"):
        self.urls = shard_urls(data_dir, manifest, split)
        self.index = sample_index(data_dir, manifest, split)
        self.first_id = _first_id(manifest, split)
        self._files: dict[int, object] = {}

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}

    def read(self, sample_id: int) -> bytes:
        shard, offset, size = self.index[sample_id - self.first_id]
        handle = self._files.get(shard)
        if handle is None:
            handle = self._files[shard] = storage.open_input(self.urls[shard])
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise ShardError(f"{self.urls[shard]}: sample {sample_id} is cut short ({len(data)} of {size} bytes)")
        return data


def _first_id(manifest: dict, split: str) -> int:
    """Ids run train, then val, then test."""
    first = 0
    for name in ("train", "val", "test"):
        if name == split:
            return first
        first += manifest["splits"][name]["count"]
    raise ShardError(f"no split {split!r}")


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


def dealt_count(manifest: dict, split: str, rank: int, world_size: int, shard_seed: int | None = None) -> int:
    """How many samples of `split` the shards dealt to `rank` hold (the deal RankShards makes of its URLs)."""
    return sum(entry["count"] for entry in RankShards(rank, world_size, shard_seed)(manifest["splits"][split]["shards"]))


def _reraise_with_shard(exn: Exception) -> bool:
    raise ShardError(f"corrupt or unreadable shard: {exn}") from exn


def _member_filter(fields: Sequence[str]):
    wanted = set(fields)

    def keep(member_name: str) -> bool:
        _, _, ext = Path(member_name).name.partition(".")
        return ext in wanted

    return keep


class NpyImages:
    """The image stage of npy shards: np.load for a stream of same-shaped arrays, the .npy header parsed
    once and then reused (parsing it, a Python literal, costs more than the pixels of a small image)."""

    member = NPY_MEMBER

    def __init__(self):
        self._header = b""
        self._layout: tuple[int, tuple, np.dtype] | None = None

    def __call__(self, data: bytes, sample_id: int = -1) -> np.ndarray:
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


def _decode(sample: dict, label_key: str, images) -> tuple[int, np.ndarray, int]:
    try:
        sample_id = int(sample["__key__"])
        return sample_id, images(sample[images.member], sample_id), int(sample[label_key])
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


def label_stream(urls: Sequence[str], *, label_key: str = GIVEN_LABEL, member: str = NPY_MEMBER) -> wds.WebDataset:
    """(id, label) of every sample in fixed order, the images never decoded or kept.

    The image member is still selected, so that a sample without its label raises as in sample_stream
    instead of vanishing from the stream (WebDataset drops a sample none of whose members are selected).
    """
    return _shard_dataset(urls, (member, label_key)).map(partial(_decode_label, label_key=label_key))


@dataclass(frozen=True)
class IdFilter:
    """Keep the samples whose id is marked in `keep` (row = id - first_id): a fold's training or held-out part."""

    keep: np.ndarray
    first_id: int = 0

    def __call__(self, sample: dict) -> bool:
        return bool(self.keep[int(sample["__key__"]) - self.first_id])


def sample_stream(urls: Sequence[str], *, images=None, label_key: str = GIVEN_LABEL, rank: int = 0,
                  world_size: int = 1, shard_seed: int | None = None, shuffle_buffer: int = 0, shuffle_seed: int = 0,
                  batch_size: int | None = None, only: IdFilter | None = None) -> wds.WebDataset:
    """(id, image, label) samples, or collated batches, of this rank's shards.

    `images` is the image stage (default NpyImages; distributed.images.JpegCrops for JPEG shards): it
    decodes the member it names, in the loader worker. Only that member and `label_key` are read from the
    tars; `only` drops samples by id before anything is decoded. With shard_seed=None the order is fixed
    (exact passes: evaluation, loss passes); otherwise shards are permuted with shard_seed and samples
    shuffled in a buffer seeded by shuffle_seed.
    """
    images = images if images is not None else NpyImages()
    dataset = _shard_dataset(urls, (images.member, label_key), rank, world_size, shard_seed)
    if only is not None:
        dataset = dataset.select(only)
    # The buffer shuffles samples as stored, before decoding: a 224 px crop is 150 KB as pixels, about a fifth of
    # that as the JPEG it comes from. Crops are seeded by id, so the order of the two steps changes no crop.
    if shuffle_buffer > 1:
        dataset = dataset.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(shuffle_seed))
    dataset = dataset.map(partial(_decode, label_key=label_key, images=images))
    if batch_size:
        dataset = dataset.batched(batch_size, collation_fn=collate, partial=True)
    return dataset


def _shareable(batch: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """A loader process's batch with its images as a tensor: torch hands tensors to the consuming process through
    shared memory (and can pin them there), where a numpy array would be pickled through a pipe."""
    ids, images, labels = batch
    return ids, torch.from_numpy(images), labels


def iterate_batches(dataset, loader_workers: int, pin_memory: bool = False
                    ) -> Iterator[tuple[np.ndarray, np.ndarray | torch.Tensor, np.ndarray]]:
    """Run a batched stream in-process (images as numpy arrays), or through a WebLoader with loader_workers
    processes (images as uint8 tensors in shared memory, copied to page-locked memory when pin_memory, so that
    their copy to a GPU runs beside the previous step). Ids and labels stay numpy arrays either way."""
    if loader_workers <= 0:
        return iter(dataset)
    return _naming_shared_memory(wds.WebLoader(dataset, batch_size=None, num_workers=loader_workers,
                                               collate_fn=_shareable, pin_memory=pin_memory))


def _naming_shared_memory(loader) -> Iterator:
    """The loader's batches; its failure to use shared memory becomes a SharedMemoryError that says what to do."""
    try:
        yield from loader
    except RuntimeError as exc:
        if not any(failure in str(exc) for failure in SHARED_MEMORY_FAILURES):
            raise
        free = f"{shutil.disk_usage('/dev/shm').free / 2**20:,.0f} MB free" if Path("/dev/shm").is_dir() else "absent"
        said = [line.strip() for line in str(exc).strip().splitlines() if line.strip()][-1]
        raise SharedMemoryError(
            f"loader processes could not hand a batch over through shared memory (/dev/shm: {free}): give it room "
            f"(a container: docker --shm-size), or lower loader_workers or batch_size; torch said: {said}") from exc


def load_split(data_dir: str, manifest: dict, split: str = "train",
               label_key: str = GIVEN_LABEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, uint8 images, labels) of a whole (small, npy) split in id order: one exact pass over its shards.

    label_key is the given label unless an evaluation asks for the true one. Tests and small scripts only:
    training never holds a whole split.
    """
    stream = sample_stream(shard_urls(data_dir, manifest, split), label_key=label_key, batch_size=4096)
    parts = list(stream)
    ids = np.concatenate([p[0] for p in parts])
    order = np.argsort(ids)
    return ids[order], np.concatenate([p[1] for p in parts])[order], np.concatenate([p[2] for p in parts])[order]


def load_labels(data_dir: str, manifest: dict, split: str = "train", label_key: str = GIVEN_LABEL) -> np.ndarray:
    """The labels of a whole split in id order: from its labels file (no shard read), or, for datasets prepared
    before labels files, from a pass over the shards that skips the images."""
    entry = manifest["splits"][split].get("labels")
    if entry is None:
        return scan_labels(data_dir, manifest, split, label_key)
    path = storage.join(data_dir, entry["name"])
    data = storage.read_bytes(path)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ShardError(f"{path} fails its sha256 check: it changed since prepare; prepare the dataset again")
    labels = np.load(io.BytesIO(data), allow_pickle=False)[:, 0 if label_key == GIVEN_LABEL else 1].astype(np.int64)
    if len(labels) != manifest["splits"][split]["count"] or (labels < 0).any():
        raise ShardError(f"{path} holds no {label_key} for every sample of the {split} split")
    return labels


def scan_labels(data_dir: str, manifest: dict, split: str = "train", label_key: str = GIVEN_LABEL) -> np.ndarray:
    """The labels of a whole split in id order, read from its shards (the images are skipped, not decoded)."""
    stream = label_stream(shard_urls(data_dir, manifest, split), label_key=label_key, member=image_member(manifest))
    pairs = np.array(list(stream), dtype=np.int64).reshape(-1, 2)
    return pairs[np.argsort(pairs[:, 0]), 1]
