"""Every file of a run directory, written and read here and nowhere else: config.yaml, metrics.jsonl,
summary.json, label_issues.csv, oof.npz, the checkpoints and the audit files of the tests.

Whole files are written next to their target and renamed, so a reader never sees half a file; summary.json
is written last, and its presence means the run finished. A run directory may be an object-store URL: its
files are then written in a local working copy and uploaded whole after each write (an object appears only
once complete), and read from the store; Ray Train writes its checkpoints there itself.
"""

from __future__ import annotations

import csv
import json
import shutil
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from noisymix.distributed import storage
from noisymix.distributed.storage import write_atomic
from noisymix.selection.crossval import SelectionError
from noisymix.selection.report import LabelReport

CHECKPOINT_FILE = "state.pt"
CONFIG, METRICS, SUMMARY, STATUS = "config.yaml", "metrics.jsonl", "summary.json", "status.json"
RAY_STORAGE, RAY_RUN = "ray", "train"   # Ray Train's storage inside the run directory, and the run's fixed name
LABEL_ISSUES, OUT_OF_FOLD = "label_issues.csv", "oof.npz"
MODEL_BEST, MODEL_LAST = "model_best.pt", "model_last.pt"
AUDIT_IDS, STATE_DIGESTS = "audit_ids.npz", "state_digests.json"


def write_json_atomic(path: Path, payload) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(payload, indent=2, sort_keys=False)))


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, seed: int, extra: dict | None = None) -> None:
    """Everything a resumed run needs but the per-sample state (each rank's own file beside this one); the RNG
    state is a function of (seed, epoch, rank): see epoch_rng. `extra`: tensors and lists of them."""
    extra = {} if extra is None else _to_cpu(extra)
    torch.save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "seed": seed,
                "torch_rng": torch.get_rng_state(), **extra}, path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint saved by save_checkpoint, read with weights_only=True (no arbitrary unpickling)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_cpu(value):
    """Tensors, and dicts and lists of them, on the CPU; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return [_to_cpu(v) for v in value] if isinstance(value, list) else value


def read_out_of_fold(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an oof.npz, a file or a URL (never unpickled); `probs` and `given` must be there. The N x C
    `probs` is mapped from the file's bytes where it is stored uncompressed, not read onto the heap (9.6 GB at
    WebVision's size); a URL's file is mapped from its local copy (storage.cached_copy), one download per version."""
    try:
        local = storage.cached_copy(str(path), "tables") if storage.is_url(path) else path
        with np.load(local, allow_pickle=False) as data:
            members = data.files
            arrays = {key: data[key] for key in members if key != "probs"}
        if "probs" in members:
            arrays["probs"] = mapped_npz_member(local, "probs")
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SelectionError(f"cannot read out-of-fold predictions from {path}: {exc}") from exc
    missing = {"probs", "given"} - set(arrays)
    if missing:
        raise SelectionError(f"{path} lacks {', '.join(sorted(missing))}: not an oof.npz of a SelectMix run")
    return arrays


ARRAY_ALIGN = 64          # numpy's own alignment of an .npy header's end
PADDING_FIELD = 0xD935    # the zip extra-field id zipalign uses for padding


def mapped_npz_member(path: str | Path, key: str) -> np.ndarray:
    """Array `key` of an .npz as a copy-on-write map of the file's bytes where the member is stored uncompressed at an
    aligned offset (save_aligned_npz's files), else read as np.load would: a compressed member has no bytes to map,
    an empty one none worth it, and numpy would copy a misaligned map whole to argmax it (np.savez's own files). An
    object array is refused (no pickles)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(member)
            header_bytes = member.tell()
        if dtype.hasobject:
            raise ValueError(f"{key} in {path} holds Python objects, which are never unpickled")
        offset = None
        if info.compress_type == zipfile.ZIP_STORED and shape and 0 not in shape:
            with open(path, "rb") as fh:   # the data follows the local header, whose name and extra fields vary
                fh.seek(info.header_offset)
                name_length, extra_length = struct.unpack("<HH", fh.read(30)[26:30])
            offset = info.header_offset + 30 + name_length + extra_length + header_bytes
        if offset is None or offset % ARRAY_ALIGN:
            with archive.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
    # copy-on-write, not read-only: numpy copies a read-only array whole before argmax and the like, as a
    # misaligned one; a page written to stays this process's own, the file is never changed
    mapped = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape, order="F" if fortran_order else "C")
    return np.asarray(mapped)   # a plain ndarray over the map, which its base keeps open


def save_aligned_npz(fh, **arrays: np.ndarray) -> None:
    """An .npz np.load reads, written to the open file `fh`, with each member's data at a multiple of ARRAY_ALIGN
    bytes into the file (a padding field in its local header, as Android's zipalign does), so that a map of it is
    aligned: numpy copies a misaligned array whole before argmax and the like."""
    with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            # the local header: 30 bytes, the name, this padding field (4 + pad), then zipfile's zip64 field (20);
            # the .npy header that follows is itself a multiple of ARRAY_ALIGN long
            before = fh.tell() + 30 + len(info.filename.encode()) + 4 + 20
            pad = -before % ARRAY_ALIGN
            info.extra = struct.pack("<HH", PADDING_FIELD, pad) + bytes(pad)
            with archive.open(info, mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def write_out_of_fold(path: Path, probs: np.ndarray, given: np.ndarray, **arrays: np.ndarray) -> None:
    """oof.npz: out-of-fold probabilities P (N x C) and the given labels they were made for, plus any
    per-id arrays (fold, predicted, confidence, uncertain)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def write(partial: Path) -> None:
        with open(partial, "wb") as fh:
            save_aligned_npz(fh, probs=probs, given=given, **arrays)

    write_atomic(path, write)


def working_copy(location: str) -> Path:
    """The local folder where a run directory at an object-store URL is written before each upload."""
    return storage.local_cache("runs") / storage.flat_name(location)


class RunDir:
    """A run directory, as `noisymix train` leaves it: a folder, or a URL with a local working copy."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.remote = storage.is_url(self.location)
        self.path = working_copy(self.location) if self.remote else Path(location)

    def __truediv__(self, name: str) -> Path:
        """The local file `name`; for a remote run, fetched from the store if it is there."""
        path = self.path / name
        if self.remote and storage.is_file(self.url(name)):
            storage.download(self.url(name), path)
        return path

    def url(self, name: str) -> str:
        return storage.join(self.location, name)

    def exists(self, name: str) -> bool:
        return storage.is_file(self.url(name))

    def holds_files(self) -> bool:
        return bool(storage.list_files(self.location))

    def create(self) -> None:
        """An empty run directory (a fresh working copy for a remote one)."""
        if self.remote:
            shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)

    def written(self, name: str) -> None:
        """After a local write of `name`: upload it whole, for a remote run."""
        if self.remote:
            storage.upload(self.path / name, self.url(name))

    def write_config(self, values: dict) -> None:
        write_atomic(self.path / CONFIG, lambda p: p.write_text(yaml.safe_dump(values, sort_keys=False)))
        self.written(CONFIG)

    def config_values(self) -> dict:
        return yaml.safe_load((self / CONFIG).read_text())

    def append_metrics(self, record: dict) -> None:
        with open(self.path / METRICS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.written(METRICS)

    def metrics(self) -> list[dict]:
        """One record per epoch, in epoch order; an epoch run again (after a failure or an interruption) keeps
        its last line."""
        if not self.exists(METRICS):
            return []
        path = self / METRICS
        records = {}
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["epoch"]] = record
        return [records[epoch] for epoch in sorted(records)]

    def write_status(self, state: str, stage: str, **info) -> None:
        """status.json: running / interrupted / failed / finished, the stage, and what a resume needs."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / STATUS, {"state": state, "stage": stage, "updated_unix": time.time(), **info})
        self.written(STATUS)

    def status(self) -> dict | None:
        return self._read_json(STATUS)

    def _read_json(self, name: str):
        return json.loads(storage.read_bytes(self.url(name))) if self.exists(name) else None

    @property
    def ray_storage(self) -> str:
        """Ray Train's storage_path: inside the run directory (a URL there for a remote run)."""
        return self.url(RAY_STORAGE) if self.remote else str(self.path.resolve() / RAY_STORAGE)

    def ray_snapshot(self) -> dict | None:
        """Ray Train's own record of the run's checkpoints, if it has one."""
        snapshot = storage.join(self.ray_storage, RAY_RUN, "checkpoint_manager_snapshot.json")
        return json.loads(storage.read_bytes(snapshot)) if storage.is_file(snapshot) else None

    def latest_checkpoint_epoch(self) -> int | None:
        """The epoch of Ray Train's latest registered checkpoint, if any."""
        latest = (self.ray_snapshot() or {}).get("latest_checkpoint_result")
        return None if latest is None else int(latest["metrics"]["epoch"])

    def latest_checkpoint_dir(self) -> str:
        """Where Ray Train's latest checkpoint is (a folder or a URL)."""
        name = self.ray_snapshot()["latest_checkpoint_result"]["checkpoint_dir_name"]
        return storage.join(self.ray_storage, RAY_RUN, name)

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.path / SUMMARY, summary)
        self.written(SUMMARY)

    def summary(self) -> dict | None:
        return self._read_json(SUMMARY)

    def write_label_issues(self, report: LabelReport) -> None:
        """One row per train id, the least trusted given labels first (ascending trust column)."""
        columns = report.columns
        names = ["id", *columns]
        values = [np.arange(len(columns[report.trust])), *columns.values()]
        order = np.argsort(columns[report.trust], kind="stable")

        def write(path: Path) -> None:
            with open(path, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(names)
                for i in order:
                    writer.writerow([f"{v[i]:.6f}" if np.issubdtype(v.dtype, np.floating) else int(v[i])
                                     for v in values])

        write_atomic(self.path / LABEL_ISSUES, write)
        self.written(LABEL_ISSUES)

    def label_issues(self) -> dict[str, np.ndarray]:
        """label_issues.csv's columns in id order (ints stay ints)."""
        with open(self / LABEL_ISSUES, newline="") as fh:
            rows = list(csv.DictReader(fh))
        rows.sort(key=lambda row: int(row["id"]))
        return {name: np.array([float(r[name]) if "." in r[name] else int(r[name]) for r in rows])
                for name in (rows[0] if rows else {})}

    def write_out_of_fold(self, probs: np.ndarray, given: np.ndarray, **arrays: np.ndarray) -> None:
        write_out_of_fold(self.path / OUT_OF_FOLD, probs, given, **arrays)
        self.written(OUT_OF_FOLD)

    def out_of_fold(self) -> dict[str, np.ndarray]:
        return read_out_of_fold(self / OUT_OF_FOLD)

    def export_model(self, checkpoint_dir: str | Path, name: str) -> None:
        """Copy a Ray Train checkpoint's state file to `name` (model_best.pt / model_last.pt)."""
        source = Path(checkpoint_dir) / CHECKPOINT_FILE
        write_atomic(self.path / name, lambda p: p.write_bytes(source.read_bytes()))
        self.written(name)

    def write_audit(self, trained_ids: dict[tuple[int, int], np.ndarray], digests: list[dict]) -> None:
        if digests:
            (self.path / STATE_DIGESTS).write_text(json.dumps(digests, indent=1))
            self.written(STATE_DIGESTS)
        if trained_ids:
            np.savez(self.path / AUDIT_IDS, **{f"epoch{e}_rank{r}": ids for (e, r), ids in sorted(trained_ids.items())})
            self.written(AUDIT_IDS)
