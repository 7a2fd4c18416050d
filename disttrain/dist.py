"""The only module that calls torch.distributed.

Every helper works without a process group (one process: rank 0 of 1), so the same code runs on a
laptop and on 512 GPUs. Functions marked "must be called on all ranks" run a collective: never call
them under a rank check, or the other ranks wait forever.
"""

from __future__ import annotations

import datetime
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


def any_flag(flag: bool) -> bool:
    """True on every rank if it is True on any rank. Must be called on all ranks.

    One tiny all-reduce: how ranks agree to stop at the same step after a signal reached only some.
    """
    if not initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


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


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank. Must be called on all ranks."""
    if not initialized():
        return obj
    box = [obj if is_main() else None]
    tdist.broadcast_object_list(box, src=0, device=_device() if _device().type == "cuda" else None)
    return box[0]


def scatter_from_main(objs: list[Any] | None) -> Any:
    """Rank r receives objs[r] from rank 0. Must be called on all ranks."""
    if not initialized():
        assert objs is not None
        return objs[0]
    box: list[Any] = [None]
    tdist.scatter_object_list(box, objs if is_main() else None, src=0)
    return box[0]


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



class PendingFlag:
    """An any-rank flag all-reduced in the background: started at one step boundary, read at the next.

    Agreement this way costs the loop no wait for a network round trip; every rank reads the same
    result at the same boundary, so all ranks still stop at the same step (one step later).
    """

    def __init__(self, flag: bool):
        self.tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
        self.work = tdist.all_reduce(self.tensor, op=tdist.ReduceOp.MAX, async_op=True) if initialized() else None

    def result(self) -> bool:
        if self.work is not None:
            self.work.wait()
        return bool(self.tensor.item())


def start_any_flag(flag: bool) -> PendingFlag:
    """Begin agreeing on `flag`; `.result()` later returns True if any rank set it. Must be called on all ranks."""
    return PendingFlag(flag)
