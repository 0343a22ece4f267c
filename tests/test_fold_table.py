"""The driver's out-of-fold table as a file-backed map (FoldCache.table): the same rows as an in-memory one, its
disk space reserved before anything is written, a full disk refused in a line naming the file, and the table
let go once the selection is over."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from noisymix.distributed import folds
from noisymix.distributed.folds import TABLE_FILE, FoldCache, Selection
from noisymix.selection.crossval import FoldOutput, out_of_fold_probabilities
from noisymix.selection.mismatch import build_mixing_table


def softmax_fold(fold):
    rng = np.random.default_rng(fold.index)
    logits = rng.standard_normal((len(fold.held), 4)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return FoldOutput(fold.held, probs.astype(np.float32), {"fold": fold.index})


def test_the_table_fills_a_reserved_file_backed_map_with_the_rows_an_in_memory_one_holds(tmp_path):
    given = np.random.default_rng(0).integers(0, 4, 300)
    in_memory, _, _ = out_of_fold_probabilities(given, 3, 0, softmax_fold)
    cache = FoldCache(tmp_path / "folds")
    mapped, _, _ = out_of_fold_probabilities(given, 3, 0, softmax_fold, allocate=cache.table)
    assert type(mapped) is np.ndarray and isinstance(mapped.base, np.memmap), "a plain array over the map"
    assert np.array_equal(mapped, in_memory)
    path = cache.directory / TABLE_FILE
    assert os.stat(path).st_blocks * 512 >= os.path.getsize(path) >= mapped.nbytes, "its blocks are reserved"
    mapped.base.flush()
    assert np.array_equal(np.load(path), in_memory), "the rows are the file's"
    cache.clear()
    assert not cache.directory.exists()


def test_a_table_the_disk_has_no_room_for_is_refused_naming_the_file_and_leaves_none(tmp_path, monkeypatch):
    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(folds.os, "posix_fallocate", no_room)
    cache = FoldCache(tmp_path / "folds")
    with pytest.raises(OSError, match="no room for the 0.01 GiB out-of-fold table") as caught:
        cache.table((2_000, 1_000))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(cache.directory / TABLE_FILE)
    assert not (cache.directory / TABLE_FILE).exists()


def test_a_table_larger_than_a_real_full_disk_is_refused_before_any_row_is_written(small_disk):
    cache = FoldCache(small_disk / "folds")
    with pytest.raises(OSError, match="no room for the") as caught:
        cache.table((1_000, 1_000))   # 4 MB on a 1 MiB disk: a sparse file would take it, a write would SIGBUS
    assert caught.value.errno == errno.ENOSPC
    assert not (cache.directory / TABLE_FILE).exists()


def test_the_selection_the_driver_keeps_has_no_probabilities_and_the_rest_unchanged():
    given = np.random.default_rng(1).integers(0, 4, 120)
    probs, fold_of, _ = out_of_fold_probabilities(given, 3, 0, softmax_fold)
    selection = Selection(build_mixing_table(probs, given), fold_of, [], 1.0, None)
    kept = selection.without_probs()
    assert kept.table.probs is None and selection.table.probs is probs
    assert kept.table.uncertain is selection.table.uncertain and kept.fold_of is fold_of
    assert [p.tolist() for p in kept.table.pools] == [p.tolist() for p in selection.table.pools]
