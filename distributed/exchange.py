"""Moving per-sample rows between ranks: each rank is the home of one contiguous id range, and rows travel
to their home (or back from it) in one all-to-all, whatever the world size. Without a process group every
call is the identity, so one code path serves 1 and W ranks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


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


def fetch(ids: torch.Tensor, home_rows: torch.Tensor, start: int, world: int, total: int) -> torch.Tensor:
    """The rows of `ids` (any ids, any rank) from their homes; `home_rows` holds this rank's ids from `start`."""
    route = Route(home_of(ids, world, total), world, home_rows.device)
    asked = route.send(ids.to(home_rows.device)).long() - start
    if len(asked) and not (0 <= int(asked.min()) and int(asked.max()) < len(home_rows)):
        raise RuntimeError("a rank asked for rows outside this rank's home range: the ranks disagree on the layout")
    return route.reply(home_rows[asked])


def store(ids: torch.Tensor, rows: torch.Tensor, home_rows: torch.Tensor, start: int, world: int, total: int) -> None:
    """Write rows of `ids` (each id at most once across ranks) into their homes' `home_rows`."""
    route = Route(home_of(ids, world, total), world, home_rows.device)
    at = route.send(ids.to(home_rows.device)).long() - start
    home_rows[at] = route.send(rows.to(home_rows.device))


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
