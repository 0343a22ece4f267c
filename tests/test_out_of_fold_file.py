"""An oof.npz's N x C probabilities are mapped from the file's bytes, not read onto the heap: the same values as
np.load's for every way np.savez can store them, and nothing that would need unpickling."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from noisymix.distributed.artifacts import (mapped_npz_member, read_out_of_fold, save_aligned_npz,
                                             write_out_of_fold)
from noisymix.selection.crossval import SelectionError


def probabilities(rows: int, classes: int, seed: int = 0) -> np.ndarray:
    logits = np.random.default_rng(seed).standard_normal((rows, classes)).astype(np.float32)
    return (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)


def test_a_runs_oof_file_maps_its_probabilities_and_reads_the_rest(tmp_path):
    probs, given = probabilities(500, 7), np.arange(500) % 7
    path = tmp_path / "oof.npz"
    write_out_of_fold(path, probs, given, fold=np.arange(500) % 3)
    arrays = read_out_of_fold(path)
    assert isinstance(arrays["probs"].base, np.memmap) and str(arrays["probs"].base.filename) == str(path.resolve())
    assert type(arrays["probs"]) is np.ndarray and np.array_equal(arrays["probs"], probs)
    assert np.array_equal(arrays["given"], given)
    arrays["probs"][0] = 7.0   # copy-on-write: this process's page, not the file's
    assert np.array_equal(read_out_of_fold(path)["probs"], probs)
    assert np.array_equal(arrays["fold"], np.arange(500) % 3)


@pytest.mark.parametrize("layout", ["fortran", "float64", "empty", "compressed", "np.savez"])
def test_every_layout_reads_back_as_np_load_reads_it_and_only_aligned_members_are_mapped(tmp_path, layout):
    probs = probabilities(40, 5).astype(np.float64 if layout == "float64" else np.float32)
    probs = {"fortran": np.asfortranarray(probs), "empty": probs[:0]}.get(layout, probs)
    path, given = tmp_path / "oof.npz", np.zeros(len(probs), int)
    if layout == "compressed":
        np.savez_compressed(path, probs=probs, given=given)
    elif layout == "np.savez":   # its members start where the zip headers end: misaligned
        np.savez(path, probs=probs, given=given)
    else:
        with open(path, "wb") as fh:
            save_aligned_npz(fh, given=given, probs=probs)   # probs second: its offset depends on given's size
    read = mapped_npz_member(path, "probs")
    with np.load(path) as data:
        assert np.array_equal(read, data["probs"]) and read.dtype == data["probs"].dtype
        assert read.flags.f_contiguous == data["probs"].flags.f_contiguous
    mapped = isinstance(read.base, np.memmap)
    assert mapped == (layout in ("fortran", "float64"))
    if mapped:
        assert read.flags.aligned and read.ctypes.data % 64 == 0


def test_an_argmax_over_a_read_back_table_copies_nothing(tmp_path):
    """A misaligned or a read-only map made numpy copy the whole table to argmax it; an aligned, copy-on-write one
    does not."""
    probs, given = probabilities(20_000, 100), np.arange(20_000) % 100
    write_out_of_fold(tmp_path / "oof.npz", probs, given)
    read = read_out_of_fold(tmp_path / "oof.npz")["probs"]
    tracemalloc.start()
    predicted = read.argmax(axis=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(predicted, probs.argmax(axis=1)) and peak < probs.nbytes / 10


def test_an_object_array_in_an_oof_file_is_refused_and_never_unpickled(tmp_path):
    path = tmp_path / "oof.npz"
    np.savez(path, probs=np.array([{"a": 1}, None], dtype=object), given=np.array([0, 1]))
    with pytest.raises(SelectionError, match="cannot read out-of-fold predictions from .*never unpickled"):
        read_out_of_fold(path)


def test_a_file_that_is_no_zip_is_named_in_one_error(tmp_path):
    path = tmp_path / "oof.npz"
    path.write_bytes(b"not an archive")
    with pytest.raises(SelectionError, match="cannot read out-of-fold predictions from"):
        read_out_of_fold(path)


@pytest.mark.parametrize("absent", ["probs", "given"])
def test_a_file_without_probs_or_given_is_refused_by_name(tmp_path, absent):
    path = tmp_path / "other.npz"
    arrays = {"probs": probabilities(10, 3), "given": np.zeros(10, int)}
    del arrays[absent]
    np.savez(path, **arrays)
    with pytest.raises(SelectionError, match=f"{path} lacks {absent}: not an oof.npz of a SelectMix run"):
        read_out_of_fold(path)
