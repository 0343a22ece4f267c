"""An oof.npz's N x C probabilities are mapped from the file's bytes, not read onto the heap: the same values as
np.load's for every way np.savez can store them, and nothing that would need unpickling."""

from __future__ import annotations

import numpy as np
import pytest

from noisymix.distributed.artifacts import mapped_npz_member, read_out_of_fold, write_out_of_fold
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
    assert type(arrays["probs"]) is np.ndarray and not arrays["probs"].flags.writeable
    assert np.array_equal(arrays["probs"], probs) and np.array_equal(arrays["given"], given)
    assert np.array_equal(arrays["fold"], np.arange(500) % 3)


@pytest.mark.parametrize("layout", ["fortran", "compressed", "float64", "empty"])
def test_every_layout_np_savez_writes_reads_back_as_np_load_reads_it(tmp_path, layout):
    probs = probabilities(40, 5).astype(np.float64 if layout == "float64" else np.float32)
    probs = {"fortran": np.asfortranarray(probs), "empty": probs[:0]}.get(layout, probs)
    path = tmp_path / "oof.npz"
    (np.savez_compressed if layout == "compressed" else np.savez)(path, probs=probs, given=np.zeros(len(probs), int))
    read = mapped_npz_member(path, "probs")
    with np.load(path) as data:
        assert np.array_equal(read, data["probs"]) and read.dtype == data["probs"].dtype
    assert isinstance(read.base, np.memmap) == (layout in ("fortran", "float64"))


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
