"""The only module that calls torch.distributed.

Every helper works without a process group (one process: rank 0 of 1), so the same code runs on a
laptop and on 512 GPUs. Functions marked "must be called on all ranks" run a collective: never call
them under a rank check, or the other ranks wait forever.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as tdist


def initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors.
    if initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Must be called on all ranks."""
    if initialized():
        tdist.barrier()


def any_flag(flag: bool, group: Any = None) -> bool:
    """True on every rank if it is True on any rank. Must be called on all ranks (of `group`).

    One tiny all-reduce: how ranks agree to stop at the same step after a signal reached only some.
    """
    if not initialized():
        return flag
    device = _device() if group is None else torch.device("cpu")  # side groups are gloo
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=group)
    return bool(t.item())


def side_group(timeout_s: float) -> Any:
    """A gloo group of every rank whose collectives time out after `timeout_s`, not after the process
    group's timeout: for waits known to be long (a save on slow storage). None without a process
    group. Must be called on all ranks, in the same order."""
    if not initialized():
        return None
    return tdist.new_group(backend="gloo", timeout=timeout(timeout_s))


def all_reduce_sum(values: list[float]) -> list[float]:
    """Elementwise sum over ranks in float64. Must be called on all ranks."""
    if not initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.tolist()


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` as a list on rank 0, None elsewhere. Must be called on all ranks.

    Objects travel pickled between our own processes over the job's private process group; nothing
    read from storage goes through here.
    """
    if not initialized():
        return [obj]
    if tdist.get_backend() == "nccl":
        # gather_object is unsupported on NCCL; all_gather_object is, at the cost of memory on all ranks.
        out: list[Any] = [None] * world_size()
        tdist.all_gather_object(out, obj)
        return out if is_main() else None
    gathered: list[Any] | None = [None] * world_size() if is_main() else None
    tdist.gather_object(obj, gathered, dst=0)
    return gathered


def from_main(fn: Callable[[], Any]) -> Any:
    """fn() run on rank 0 alone (a decision from its clock, say), its result on every rank. Must be
    called on all ranks."""
    return broadcast_from_main(fn() if is_main() else None)


def on_main(fn: Callable[[], Any]) -> Any:
    """fn() on rank 0, None on every other rank; no collective."""
    return fn() if is_main() else None


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank. Must be called on all ranks."""
    if not initialized():
        return obj
    box = [obj if is_main() else None]
    tdist.broadcast_object_list(box, src=0, device=_device() if _device().type == "cuda" else None)
    return box[0]


# How a peer's death or hang surfaces from gloo (plain RuntimeError) and NCCL (DistBackendError).
_COLLECTIVE_FAILURES = ("gloo/transport", "Connection closed by peer", "Connection reset by peer", "NCCL")


def is_collective_failure(err: BaseException) -> bool:
    """Whether an exception is a collective that failed because a peer died or hangs."""
    if isinstance(err, getattr(tdist, "DistError", ())):
        return True
    return any(marker in str(err) for marker in _COLLECTIVE_FAILURES)


def timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def destroy(clean: bool = True) -> None:
    """Tear down the process group. Must be called on all ranks when `clean`.

    The barrier first matters: a rank that closes its gloo sockets while a peer is still finishing its
    last collective makes the peer's transport thread abort the process ("terminate called ...").
    After a failure the peers may be gone, so `clean=False` skips it.
    """
    if initialized():
        if clean:
            tdist.barrier()
        tdist.destroy_process_group()



class PendingFlags:
    """Any-rank flags all-reduced in the background: started at one step boundary, read at the next.

    Agreement this way costs the loop no wait for a network round trip; every rank reads the same
    result at the same boundary, so all ranks still act at the same step (one step later).
    """

    def __init__(self, flags: list[bool]):
        self.tensor = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=_device())
        self.work = tdist.all_reduce(self.tensor, op=tdist.ReduceOp.MAX, async_op=True) if initialized() else None

    def result(self) -> list[bool]:
        if self.work is not None:
            self.work.wait()
        return [bool(v) for v in self.tensor.tolist()]


def start_any_flags(flags: list[bool]) -> PendingFlags:
    """Begin agreeing on `flags`; `.result()[i]` is later True if any rank set flag i. Must be called on all ranks."""
    return PendingFlags(flags)


def broadcast_tensors_from_main(tensors: list[torch.Tensor]) -> None:
    """Overwrite every rank's tensors in place with rank 0's. Must be called on all ranks."""
    if not initialized():
        return
    for t in tensors:
        tdist.broadcast(t.data, src=0)
