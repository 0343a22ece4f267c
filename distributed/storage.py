"""Where datasets and runs live: a local folder, or a URL of an object store (s3://, gs://, hdfs://, or any
file system pyarrow knows). Files are named by strings; a URL goes through pyarrow's file systems (the ones
Ray Train uses for its storage_path), a plain path through the local one.

Credentials and endpoints come from the environment, as for any AWS/GCS client (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...). Whole objects are written in one upload: an object store shows an object only once
its upload completed, so a reader never sees half a file.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path

import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")


def is_url(location: str | Path) -> bool:
    """A URL of a remote file system (file:// and plain paths are local)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_cache(kind: str) -> Path:
    """Where local copies of remote things of one kind live (staging of a prepare, a run's working copy):
    NOISYMIX_CACHE, default ~/.cache/noisymix."""
    return Path(os.environ.get("NOISYMIX_CACHE", Path.home() / ".cache" / "noisymix")) / kind


def flat_name(location: str) -> str:
    """A URL as one file name (s3://bucket/a/b -> s3_bucket_a_b)."""
    return location.replace("://", "_").replace("/", "_")


def join(base: str | Path, *parts: str) -> str:
    """base/part/...; a URL keeps its scheme's double slash (pathlib would fold s3:// into s3:/)."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(part.strip("/") for part in parts)])
    return str(Path(base).joinpath(*parts))


@functools.cache
def _filesystem(scheme_and_host: str, endpoint: str | None) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(scheme_and_host + "/")[0]


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it): one client per bucket, kept for the process."""
    text = str(location)
    if not is_url(text):
        return pafs.LocalFileSystem(), str(Path(text).resolve())
    scheme, rest = text.split("://", 1)
    host, _, path = rest.partition("/")
    return _filesystem(f"{scheme}://{host}", os.environ.get("AWS_ENDPOINT_URL")), f"{host}/{path}"


def open_input(location: str | Path):
    """A seekable binary file (local or remote: reads become byte-range requests)."""
    if not is_url(location):
        return open(location, "rb")
    fs, path = resolve(location)
    return fs.open_input_file(path)


def read_bytes(location: str | Path) -> bytes:
    with open_input(location) as fh:
        return fh.read()


def info(location: str | Path) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def is_file(location: str | Path) -> bool:
    return info(location).type == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    """A folder, or a prefix holding objects (object stores have no empty folders)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        return True
    return is_url(location) and bool(list_files(location))


def list_files(location: str | Path) -> list[str]:
    """The names of the files below a folder or prefix, relative to it ([] if there is none)."""
    fs, path = resolve(location)
    try:
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    prefix = path.rstrip("/") + "/"
    return sorted(entry.path[len(prefix):] for entry in found if entry.type == pafs.FileType.File)


def write_atomic(path: Path, write) -> None:
    """Call write(partial_path), then rename the partial file onto `path`. The partial file's name is this call's
    own, so writers of one path at once (trials on one node) never share it; a failed or interrupted write leaves
    no partial file, and a failed one (a full disk) names `path`."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        partial.unlink(missing_ok=True)


def write_bytes(location: str | Path, data: bytes) -> None:
    """The whole file at once: renamed into place locally, one completed upload remotely."""
    if not is_url(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(location), lambda partial: partial.write_bytes(data))
        return
    fs, path = resolve(location)
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def upload(local: str | Path, location: str | Path) -> None:
    """Copy a local file to `location` (a URL or a path), whole."""
    if not is_url(location):
        shutil.copyfile(local, location)
        return
    fs, path = resolve(location)
    pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def cached_copy(location: str, kind: str) -> Path:
    """A local copy of the remote file `location` in local_cache(kind), for readers that map a file (an oof.npz's
    N x C table) instead of reading it whole onto the heap. Downloaded once per version of the object (its size and
    modification time name the copy: a rewrite of the same size within the store's clock tick is not told apart),
    renamed into place whole (write_atomic); an older version's copy is removed."""
    found = info(location)
    if found.type != pafs.FileType.File:
        raise FileNotFoundError(f"no file at {location}")
    stem = flat_name(location)
    local = local_cache(kind) / f"{stem}.{found.size}-{found.mtime_ns or 0}"
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(local, lambda partial: download(location, partial))
        version = re.compile(re.escape(stem) + r"\.\d+-\d+")
        for older in local.parent.iterdir():
            if older != local and version.fullmatch(older.name):
                older.unlink(missing_ok=True)
    return local


def download(location: str | Path, local: str | Path) -> None:
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    fs, path = resolve(location)
    pafs.copy_files(path, str(Path(local).resolve()), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())


def delete(location: str | Path) -> None:
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def delete_tree(location: str | Path) -> None:
    """A folder and everything in it, or every object under a prefix (nothing if there is none)."""
    if not is_url(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    for name in list_files(location):
        delete(join(location, name))


def file_sha256(location: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open_input(location) as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def gopen_remote(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """WebDataset's opener for URLs of object stores: a buffered stream through pyarrow."""
    if mode[0] != "r":
        raise ValueError(f"{url}: shards are read, never written, through WebDataset")
    fs, path = resolve(url)
    return fs.open_input_stream(path)
