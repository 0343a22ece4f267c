"""Freed heap memory handed back to the system between batches (glibc's malloc_trim), for passes without gradient.

A pass without gradient frees each layer's output as soon as the next has read it, between the decoder's buffers:
glibc keeps the holes, and a fold's held-out pass of 57,600 JPEGs peaked 389-419 MB above its start (about 7 KB per
sample; a fold task predicts N/K samples, so this grew with N). Trimmed every TRIM_EVERY batches it peaked 139-152
MB above, at 0.91-0.96x the untrimmed wall time; trimmed every batch, 97-112 MB at 1.12x
(benchmarks/results/heldout_memory.md).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Optional, TypeVar

TRIM_EVERY = 20

T = TypeVar("T")


@functools.cache
def heap_trimmer() -> Optional[Callable[[int], int]]:
    """glibc's malloc_trim(pad), or None where the C library has none (macOS, musl); looked up once per process."""
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def trimmed(batches: Iterable[T], every: Optional[int] = None) -> Iterator[T]:
    """The batches, with the free heap handed back after every `every` of them (None: TRIM_EVERY; 0: never)."""
    every = TRIM_EVERY if every is None else every
    trim = heap_trimmer() if every else None
    for count, batch in enumerate(batches, 1):
        yield batch
        if trim is not None and count % every == 0:
            trim(0)
