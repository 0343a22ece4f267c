"""Moving per-sample rows between ranks: each rank is the home of one contiguous id range, and rows travel
to their home (or back from it) in all-to-all rounds, whatever the world size. Each round moves at most
CHUNK_BYTES from each rank, so an exchange of any size needs buffers of a few rounds, not copies of its rows.
Without a process group every call is the identity, so one code path serves 1 and W ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist


CHUNK_BYTES = 2**23   # what one rank sends in one round of an exchange: 8 MB


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    """Where a collective's tensors must live: the GPU under NCCL, else the CPU."""
    if distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def home_range(rank: int, world: int, total: int) -> tuple[int, int]:
    """[start, stop) of the ids whose home is `rank`: balanced contiguous ranges."""
    return rank * total // world, (rank + 1) * total // world


def home_of(ids: torch.Tensor, world: int, total: int) -> torch.Tensor:
    """The home rank of each id: the largest r with home_range(r).start <= id."""
    return ((ids.long() + 1) * world - 1) // total


class Route:
    """One all-to-all plan: row j of this rank goes to rank dest[j]. `send` delivers rows grouped by source
    rank; `reply` sends rows (aligned with what was received) back, in the senders' original order."""

    def __init__(self, dest: torch.Tensor, world: int, device: torch.device | str = "cpu"):
        self.order = torch.argsort(dest.cpu(), stable=True)
        self.sent = torch.bincount(dest.cpu().long(), minlength=world)[:world].tolist()
        self.received = list(self.sent)
        if distributed():
            counts = torch.tensor(self.sent, dtype=torch.int64, device=device)
            got = torch.empty_like(counts)
            dist.all_to_all_single(got, counts)
            self.received = got.tolist()

    def send(self, rows: torch.Tensor) -> torch.Tensor:
        return _all_to_all(rows[self.order.to(rows.device)], self.sent, self.received)

    def reply(self, rows: torch.Tensor) -> torch.Tensor:
        back = _all_to_all(rows, self.received, self.sent)
        out = torch.empty_like(back)
        out[self.order.to(back.device)] = back
        return out


def _all_to_all(rows: torch.Tensor, send_counts: list[int], receive_counts: list[int]) -> torch.Tensor:
    """Variable-size all-to-all of rows of any dtype (moved as bytes: gloo lacks some 16-bit types)."""
    if not distributed():
        return rows
    as_bytes = rows.contiguous().reshape(len(rows), math.prod(rows.shape[1:])).view(torch.uint8)
    out = as_bytes.new_empty((sum(receive_counts), as_bytes.shape[1]))
    dist.all_to_all_single(out, as_bytes, receive_counts, send_counts)
    return out.view(rows.dtype).reshape(sum(receive_counts), *rows.shape[1:])


def row_bytes(rows: torch.Tensor) -> int:
    return math.prod(rows.shape[1:]) * rows.element_size()


def agreed_slices(count: int, width: int) -> list[slice]:
    """Slices of `count` rows of `width` bytes, each at most CHUNK_BYTES, as many on every rank (a rank with
    fewer rows takes empty ones): the rounds of one exchange."""
    rows = max(1, CHUNK_BYTES // max(width, 1))
    rounds = torch.tensor([math.ceil(count / rows)], dtype=torch.int64, device=collective_device())
    if distributed():
        dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
    return [slice(min(i * rows, count), min((i + 1) * rows, count)) for i in range(int(rounds.item()))]


def fetch(ids: torch.Tensor, homes: Sequence[torch.Tensor], start: int, world: int, total: int) -> list[torch.Tensor]:
    """The rows of `ids` (any ids, any rank) from their homes, for each of `homes` (tensors holding this rank's
    ids from `start`): one route per round serves them all."""
    outs = [home.new_empty((len(ids), *home.shape[1:])) for home in homes]
    device = homes[0].device
    for part in agreed_slices(len(ids), 8 + sum(map(row_bytes, homes))):
        chunk = ids[part].to(device)
        route = Route(home_of(chunk, world, total), world, device)
        asked = route.send(chunk).long() - start
        if len(asked) and not (0 <= int(asked.min()) and int(asked.max()) < len(homes[0])):
            raise RuntimeError("a rank asked for rows outside this rank's home range: the ranks disagree on the layout")
        for out, home in zip(outs, homes):
            out[part] = route.reply(home[asked])
    return outs


def store(ids: torch.Tensor, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], start: int, world: int,
          total: int) -> None:
    """Write, for each (rows, home_rows) pair, the rows of `ids` (each id at most once across ranks) into their
    homes' `home_rows`: one route per round serves every pair."""
    device = pairs[0][1].device
    for part in agreed_slices(len(ids), 8 + sum(row_bytes(rows) for rows, _ in pairs)):
        chunk = ids[part].to(device)
        route = Route(home_of(chunk, world, total), world, device)
        at = route.send(chunk).long() - start
        for rows, home in pairs:
            home[at] = route.send(rows[part].to(device))


def to_rank0(ids: torch.Tensor, values: torch.Tensor, total: int) -> torch.Tensor | None:
    """Every rank's (id, value) pairs as one id-ordered tensor on rank 0 (None elsewhere); each id exactly once."""
    rank, world = rank_and_world()
    route = Route(torch.zeros(len(ids), dtype=torch.int64), world, values.device)
    got_ids, got = route.send(ids.to(values.device)).long(), route.send(values)
    if rank != 0:
        return None
    if len(got_ids) != total or not torch.equal(torch.sort(got_ids).values, torch.arange(total, device=got.device)):
        raise RuntimeError(f"the pass gathered {len(got_ids)} rows for {total} ids, not each id once: a shard is "
                           "missing, duplicated or unevenly dealt")
    out = torch.empty_like(got)
    out[got_ids] = got
    return out


def from_rank0(values: torch.Tensor | None, home_rows: torch.Tensor, world: int, total: int) -> None:
    """Rank 0's id-ordered `values` (N rows; None elsewhere) into every rank's home range."""
    if rank_and_world()[0] == 0:
        route, rows = Route(home_of(torch.arange(total), world, total), world, home_rows.device), values
    else:
        route = Route(torch.empty(0, dtype=torch.int64), world, home_rows.device)
        rows = home_rows.new_empty((0, *home_rows.shape[1:]))
    home_rows[:] = route.send(rows.to(home_rows.device))
