"""distributed.heap: the free heap handed back between batches, and the passes without gradient that do it."""

import numpy as np
import pytest
import torch

from noisymix.distributed import engine, heap


def resident_anonymous_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024


@pytest.fixture
def trims(monkeypatch):
    """The batch counts at which a trim ran (the real malloc_trim replaced by a recorder)."""
    calls = []
    monkeypatch.setattr(heap, "heap_trimmer", lambda: lambda pad: calls.append(pad) or 1)
    return calls


def test_trimmed_passes_every_batch_through_in_order_and_trims_every_k(trims):
    seen = []
    for batch in heap.trimmed(range(45), every=20):
        seen.append((batch, len(trims)))
    assert [b for b, _ in seen] == list(range(45))
    # a trim follows the 20th and the 40th batch, after the consumer has had it
    assert [count for _, count in seen][19:22] == [0, 1, 1] and len(trims) == 2 and trims == [0, 0]


def test_trimmed_every_zero_never_trims(trims):
    assert list(heap.trimmed(iter([1, 2, 3]), every=0)) == [1, 2, 3] and trims == []


def test_passes_without_gradient_trim_every_few_batches(trims):
    model = engine.build_model(engine.TrainSection(model="small_cnn", width=4),
                               engine.DataInfo(3, 8, 1, (0.5,), (0.25,), {"train": 90}))
    rng = np.random.default_rng(0)
    batches = [(np.arange(2 * i, 2 * i + 2), rng.integers(0, 255, (2, 8, 8, 1), dtype=np.uint8), np.zeros(2, np.int64))
               for i in range(2 * heap.TRIM_EVERY + 5)]
    ids, _, probs = engine.predict(model, batches, engine.InputTransform((0.5,), (0.25,)), torch.device("cpu"))
    assert len(ids) == 2 * len(batches) and probs.shape == (len(ids), 3)
    assert len(trims) == 2


@pytest.mark.skipif(heap.heap_trimmer() is None, reason="this C library has no malloc_trim (not glibc)")
def test_the_trimmer_hands_freed_heap_holes_back_to_the_system():
    # 100 KB blocks stay under glibc's mmap threshold, so they come from the heap; keeping every 20th pins the
    # holes between them, which glibc does not return by itself
    blocks = [np.ones(100_000 // 8) for _ in range(3000)]
    kept = blocks[::20]
    del blocks
    before = resident_anonymous_mb()
    list(heap.trimmed(range(1), every=1))
    assert before - resident_anonymous_mb() > 100, "malloc_trim returned less than 100 MB of ~285 MB of holes"
    assert all(block[0] == 1.0 for block in kept)
