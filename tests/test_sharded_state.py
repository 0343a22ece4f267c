"""Per-sample state sharded by id range: rows move to and from their home ranks exactly, and a state
checkpoint written by W ranks restores every id's state exactly on any other number of ranks.

The ranks are real processes joined by a gloo process group on 127.0.0.1 (no Ray)."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from noisymix.distributed import exchange
from noisymix.distributed.sample_state import SampleState, StateCheckpointError, read_beliefs
from noisymix.mixing.soft_targets import TargetCodec

N, C = 101, 7   # not a multiple of any world size used: uneven home ranges


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world_state(seed: int = 0):
    """The whole state every test compares against: given labels, soft targets, clean probabilities."""
    rng = np.random.default_rng(seed)
    given = rng.integers(0, C, N)
    targets = rng.dirichlet(np.ones(C) * 0.3, N).astype(np.float32)
    clean = rng.random(N).astype(np.float32)
    return torch.from_numpy(given).int(), torch.from_numpy(targets), torch.from_numpy(clean)


def in_group(rank, world, port, job, *args):
    # A forked child must not enter the intra-op thread pool its parent may have started (it would hang).
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        job(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, job, *args) -> None:
    mp.start_processes(in_group, args=(world, free_port(), job, *args), nprocs=world, start_method="fork")


def pass_ids(rank: int, world: int) -> torch.Tensor:
    """A rank's pass ids: not its home range, and uneven (rank 0 of 2 passes two thirds of the ids)."""
    ids = torch.arange(N)
    return ids[(ids % 3 < 2) == (rank == 0)] if world == 2 else ids[ids % world == rank]


def write_state(rank, world, directory, codec_args):
    """Each rank fills its home rows through one store() of ids it does not own, then saves its file."""
    given, targets, clean = world_state()
    state = SampleState(N, TargetCodec(C, *codec_args))
    mine = pass_ids(rank, world)
    state._store(mine, (given[mine], state.given), (state.codec.encode(targets[mine]), state.targets),
                 (clean[mine], state.clean))
    state.save(directory)


def check_state(rank, world, directory, codec_args):
    """Each rank loads its home range from files of another world size and fetches arbitrary ids' rows."""
    given, targets, clean = world_state()
    codec = TargetCodec(C, *codec_args)
    state = SampleState(N, codec)
    assert state.load(directory) and state.ready
    home = slice(state.start, state.stop)
    assert torch.equal(state.given, given[home]) and torch.equal(state.clean, clean[home])
    assert torch.equal(state.targets, codec.encode(targets[home])), "bit-exact soft targets"
    wanted = torch.from_numpy(np.random.default_rng(rank).choice(N, 30, replace=False))
    fetched_clean, fetched_targets = state._fetch(wanted, state.clean, state.targets)
    assert torch.equal(fetched_clean, clean[wanted])
    assert torch.allclose(codec.decode(fetched_targets), codec.decode(codec.encode(targets[wanted])))
    losses = exchange.to_rank0(torch.arange(rank, N, world), torch.arange(rank, N, world).float() * 2, N)
    assert (losses is None) == (rank != 0) and (rank != 0 or torch.equal(losses, torch.arange(N).float() * 2))
    exchange.from_rank0(torch.arange(N).float() if rank == 0 else None, state.clean, world, N)
    assert torch.equal(state.clean, torch.arange(state.start, state.stop).float())


@pytest.mark.parametrize("codec_args", [(0, "float32"), (3, "float16")])
def test_state_written_by_two_ranks_is_restored_exactly_on_one_and_three(tmp_path, codec_args, monkeypatch):
    monkeypatch.setattr(exchange, "CHUNK_BYTES", 256)   # inherited by the forked ranks: exchanges take many rounds
    run_ranks(2, write_state, tmp_path, codec_args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample_state_000000000000_000000000050.pt",
                                                           "sample_state_000000000050_000000000101.pt"]
    check_state(0, 1, tmp_path, codec_args)          # one process: no group at all
    run_ranks(3, check_state, tmp_path, codec_args)
    given, targets, _ = world_state()
    read_given, corrected, _ = read_beliefs(tmp_path)
    codec = TargetCodec(C, *codec_args)
    assert np.array_equal(read_given, given.numpy())
    assert np.array_equal(corrected, codec.decode(codec.encode(targets)).argmax(1).numpy())


def test_home_ranges_tile_the_ids_and_home_of_agrees():
    for world in (1, 2, 3, 7):
        ranges = [exchange.home_range(r, world, N) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == N and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        homes = exchange.home_of(torch.arange(N), world, N)
        for r, (start, stop) in enumerate(ranges):
            assert (homes[start:stop] == r).all()


def test_a_state_checkpoint_of_another_dataset_or_incomplete_is_refused(tmp_path):
    state = SampleState(N, TargetCodec(C))
    state.save(tmp_path)
    with pytest.raises(StateCheckpointError, match="for 101 samples of 7 classes; this run has 101 samples of 5"):
        SampleState(N, TargetCodec(5)).load(tmp_path)
    with pytest.raises(StateCheckpointError, match=r"cover \[\(0, 101\)\], not the 90 samples"):
        SampleState(90, TargetCodec(C)).load(tmp_path)
    (tmp_path / "sample_state_000000000000_000000000101.pt").rename(tmp_path / "sample_state_000000000000_000000000050.pt")
    with pytest.raises(StateCheckpointError, match="incomplete or from another dataset"):
        SampleState(N, TargetCodec(C)).load(tmp_path)
    (tmp_path / "empty").mkdir()
    assert SampleState(N, TargetCodec(C)).load(tmp_path / "empty") is False, "a checkpoint from before the state"


def test_a_batch_asking_for_ids_outside_its_working_rows_is_an_error():
    state = SampleState(4, TargetCodec(2))
    state.fill(torch.tensor([0, 1, 0, 1]), torch.eye(2)[[0, 1, 0, 1]], torch.ones(4))
    state.rows_ids, state.rows_clean = torch.tensor([0, 2]), torch.tensor([0.5, 0.25])
    assert state.clean_of(torch.tensor([2, 0])).tolist() == [0.25, 0.5]
    with pytest.raises(RuntimeError, match="did not fetch for the epoch"):
        state.clean_of(torch.tensor([1]))


def test_the_refresh_loss_and_target_move_match_their_formulas_from_encoded_rows():
    """B1's loss is the cross-entropy against argmax t, B2's move is m t + (1 - m) p; a float16 probability
    underflowing to 0 caps the loss at its smallest subnormal instead of an arbitrary huge value."""
    from noisymix.distributed.sample_state import move_targets
    from noisymix.mixing.mixnn import update_soft_targets

    logits, labels = torch.tensor([[0.0, 30.0, 0.0], [5.0, 0.0, 0.0]]), torch.tensor([0, 0])
    p = torch.softmax(logits, dim=1)
    codec = TargetCodec(3)
    losses, moved = move_targets(codec, None, labels, codec.encode(p), 0.9)
    assert torch.allclose(losses, torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
    assert torch.allclose(codec.decode(moved), update_soft_targets(torch.eye(3)[labels], p, 0.9))
    _, same = move_targets(codec, moved, labels, codec.encode(p), None)
    assert same is moved, "without a momentum the targets stay as they were"
    half = TargetCodec(3, dtype="float16")
    capped, _ = move_targets(half, None, labels, half.encode(p), None)
    assert capped[0] == pytest.approx(-np.log(2.0 ** -24), rel=1e-3) and capped[1] == pytest.approx(losses[1], abs=1e-4)


def test_state_checkpoints_come_every_n_epochs_and_at_the_last():
    from noisymix.distributed.worker import checkpoint_due
    from noisymix.mixing.method import method_class

    assert [e for e in range(10) if checkpoint_due(e, 3, 10)] == [2, 5, 8, 9]
    assert [e for e in range(4) if checkpoint_due(e, 1, 4)] == [0, 1, 2, 3]
    mixnn = method_class("mixnn")
    assert mixnn(mixnn.Config.from_values({"state_checkpoint_every": 3})).checkpoint_every == 3
    assert method_class("ce")().checkpoint_every == 1, "a method without per-sample state checkpoints every epoch"


class LinearNet(torch.nn.Module):
    """A fixed 2 x 2 image -> 4 features -> C logits network: the refresh's pass without a real model."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.project = torch.nn.Parameter(torch.randn(4, 4, generator=generator))
        self.out = torch.nn.Parameter(torch.randn(4, C, generator=generator) * 3)

    def features(self, x):
        return x.flatten(1) @ self.project

    def head(self, z):
        return z @ self.out


def refresh_twice(rank, world, directory, momentum):
    """Two MixNN refreshes over this rank's (uneven) pass ids in batches of 8; the home rows are saved."""
    from noisymix.distributed.engine import InputTransform
    from noisymix.distributed.sample_state import refresh_state
    from noisymix.mixing.gmm_select import GMMConfig
    from noisymix.mixing.method import EpochPlan

    given = world_state()[0].long()
    ids = pass_ids(rank, world).numpy()
    images = np.random.default_rng(1).integers(0, 256, (N, 2, 2, 1), dtype=np.uint8)
    state = SampleState(N, TargetCodec(C, 3, "float16"))
    plan = EpochPlan("mix", refresh=True, target_momentum=momentum, embeddings="l2")
    for epoch in range(2):
        batches = ((ids[i:i + 8], images[ids[i:i + 8]], given[ids[i:i + 8]].numpy()) for i in range(0, len(ids), 8))
        with torch.no_grad():
            refresh_state(state, LinearNet(), batches, len(ids), InputTransform((0.5,), (0.25,)), "cpu", False, plan,
                          GMMConfig(), seed=0, token=epoch)
    assert torch.equal(state.epoch_ids, torch.from_numpy(np.sort(ids))) and len(state.embeddings) == len(ids)
    state.save(directory)


@pytest.mark.parametrize("momentum", [0.2, None])
def test_a_refresh_on_two_ranks_in_many_rounds_gives_the_state_of_one_process(tmp_path, monkeypatch, momentum):
    """The refresh's exchanges (targets fetched and stored in rounds of a few rows, losses to rank 0, clean
    probabilities back home) leave every id's state as a single process refreshing all ids leaves it."""
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    monkeypatch.setattr(exchange, "CHUNK_BYTES", 64)
    run_ranks(2, refresh_twice, tmp_path / "two", momentum)
    monkeypatch.setattr(exchange, "CHUNK_BYTES", 2**23)
    run_ranks(1, refresh_twice, tmp_path / "one", momentum)
    two, one = read_beliefs(tmp_path / "two"), read_beliefs(tmp_path / "one")
    assert np.array_equal(two[0], world_state()[0].numpy()) and np.array_equal(two[0], one[0]), "given labels"
    assert np.allclose(two[2], one[2], atol=1e-5) and one[2].min() < 0.5 < one[2].max(), "clean probabilities"
    assert np.array_equal(two[1], one[1]), "corrected labels"
    if momentum is not None:
        assert not np.array_equal(one[1], one[0]), "the targets moved away from some given labels"
