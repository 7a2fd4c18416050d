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
    # NCCL only moves CUDA tensors; gloo moves CPU tensors (also in a mixed "cuda:nccl,cpu:gloo" group).
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
# A hang during eval can surface as gloo closing the pair on its own timeout, without a transport path.
_COLLECTIVE_FAILURES = (
    "gloo/transport", "Connection closed by peer", "Connection reset by peer", "NCCL",
    "Application timeout caused pair closure",
)  # fmt: skip


def is_collective_failure(err: BaseException) -> bool:
    """Whether an exception is a collective that failed because a peer died or hangs."""
    if isinstance(err, getattr(tdist, "DistError", ())):
        return True
    return any(marker in str(err) for marker in _COLLECTIVE_FAILURES)


def timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


# ------------------------------------------------------------------------------- sharding (FSDP2)


def init_for_sharding(cuda: bool, timeout_s: float) -> torch.device:
    """Initialise the process group for sharded training and return this rank's device. Reads the
    rendezvous from the environment (torchrun, or the SLURM layout run.start exported); one process
    alone gets a group of one, so the same sharded code runs on a laptop."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not initialized():
        # NCCL moves CUDA tensors; gloo serves the CPU side (rank-state gathers, flags) on GPUs too.
        backend = "cuda:nccl,cpu:gloo" if cuda else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout(timeout_s)}
        if world == 1 and "MASTER_ADDR" not in os.environ:
            kwargs.update(store=tdist.HashStore(), rank=0, world_size=1)
        tdist.init_process_group(**kwargs)
    return device


def fully_shard(
    model: torch.nn.Module,
    units: list[torch.nn.Module],
    *,
    device: torch.device,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
    cpu_offload: bool,
) -> None:
    """Shard `units` (each its own all-gather group), then the root, over all ranks. Must be called on all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy
    from torch.distributed.fsdp import fully_shard as shard

    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for unit in units:
        shard(unit, mesh=mesh, mp_policy=policy, offload_policy=offload)
    shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)


def is_sharded(t: Any) -> bool:
    """Whether `t` is a DTensor (a tensor whose rows are spread over the ranks)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded tensor (the tensor itself when it is not sharded)."""
    if not is_sharded(t):
        return t
    from torch.distributed.tensor import Shard

    if tuple(t.placements) != (Shard(0),):  # type: ignore[attr-defined]
        raise ValueError(f"unsupported sharding {t.placements}: disttrain saves Shard(0) on one mesh dim")  # type: ignore[attr-defined]
    return t.to_local()  # type: ignore[attr-defined]


def shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of dim 0 that `rank` holds of a tensor sharded over `world` ranks: FSDP2's
    Shard(0) cuts like torch.chunk, c = ceil(rows / world) rows per rank, the last ones short or empty."""
    chunk = -(-rows // world) if rows else 0
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def local_rows(t: torch.Tensor) -> tuple[int, int]:
    """This rank's rows [start, stop) of a sharded tensor (checked against its local shape)."""
    start, stop = shard_rows(t.shape[0], rank(), world_size())
    if local_part(t).shape[0] != stop - start:
        raise ValueError(
            f"a shard of {tuple(t.shape)} holds {local_part(t).shape[0]} rows, not {stop - start}"
        )
    return start, stop


def sharded_like(like: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A DTensor laid out as `like` (same mesh, placements, global shape) holding `local` rows."""
    from torch.distributed.tensor import DTensor

    assert isinstance(like, DTensor)
    return DTensor.from_local(
        local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    )


def new_gloo_group() -> Any:
    """A separate gloo group for background work (async sharded saves): collectives from another
    thread on the default group would interleave with the training loop's. Must be called on all ranks.

    It gets the default group's timeout (trainer.collective_timeout_s): torch gives a new group its own
    default, 30 minutes for gloo, and a save thread blocked on a frozen peer would outlive the run by
    that much."""
    return tdist.new_group(backend="gloo", timeout=group_timeout()) if initialized() else None


def group_timeout() -> datetime.timedelta | None:
    """The default group's collective timeout (the run's, however the group was made: here for FSDP,
    by accelerate for DDP); None without a process group or where torch does not say."""
    if not initialized():
        return None
    default = tdist.distributed_c10d._get_default_group()
    for device in ("cpu", "cuda"):  # NCCL's options carry the same timeout as gloo's
        try:
            return default._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError, ValueError):  # no backend for this device in the group
            continue
    return None


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's `obj`, on every rank. Must be called on all ranks (of `group`)."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size(group)
    tdist.all_gather_object(out, obj, group=group)
    return out


TRADE_HEADER, TRADE_BODY = 71, 72  # tags: one pair's messages of one tag arrive in the order sent


def trade_bytes(
    outgoing: dict[int, list[bytes] | None], incoming: list[int], parts: int, group: Any
) -> dict[int, list[bytes] | None]:
    """Point to point: send each rank in `outgoing` its `parts` byte strings (None: "nothing") and
    receive one such message from each rank in `incoming`, as uint8 tensors over `group` (gloo; never
    pickled). Every rank named on either side calls this at the same point with matching lists. Sends are
    posted first (non-blocking) and receives block in order, so no pairing deadlocks."""
    sends = []
    for dst, blobs in outgoing.items():
        sizes = [1, *map(len, blobs)] if blobs is not None else [0] * (parts + 1)
        sends.append(tdist.isend(torch.tensor(sizes, dtype=torch.int64), dst, group=group, tag=TRADE_HEADER))
    headers = {}
    for src in incoming:
        header = torch.zeros(parts + 1, dtype=torch.int64)
        tdist.recv(header, src, group=group, tag=TRADE_HEADER)
        headers[src] = [int(n) for n in header]
    _wait(sends)
    sends = [
        tdist.isend(torch.frombuffer(bytearray(blob), dtype=torch.uint8), dst, group=group, tag=TRADE_BODY)
        for dst, blobs in outgoing.items()
        for blob in blobs or []
        if blob  # gloo moves no empty tensor: the header says a part is empty
    ]
    got: dict[int, list[bytes] | None] = {}
    for src in incoming:
        present, *sizes = headers[src]
        got[src] = [_receive(src, size, group) for size in sizes] if present else None
    _wait(sends)
    return got


def _receive(src: int, size: int, group: Any) -> bytes:
    if not size:
        return b""
    buf = torch.empty(size, dtype=torch.uint8)
    tdist.recv(buf, src, group=group, tag=TRADE_BODY)
    return buf.numpy().tobytes()


def _wait(works: list[Any]) -> None:
    for work in works:
        if work is not None:
            work.wait()


_had_group = False  # whether `destroy` tore one down


def destroy(clean: bool = True) -> None:
    """Tear down the process group. Must be called on all ranks when `clean`.

    The barrier first matters: a rank that closes its gloo sockets while a peer is still finishing its
    last collective makes the peer's transport thread abort the process ("terminate called ...").
    After a failure the peers may be gone, so `clean=False` skips it.

    This does not end gloo's threads: torch shuts the groups down, but a group's transport loop and
    workers live as long as the group object, and objects that reference it (the sharded model's mesh,
    the async-save group in the checkpoint manager) are start-up objects gc.freeze() keeps
    (phases.resume_gc). The entry point therefore skips the interpreter's teardown after one
    (had_process_group, main._exit).
    """
    global _had_group
    if initialized():
        _had_group = True
        if clean:
            tdist.barrier()
        tdist.destroy_process_group()


def had_process_group() -> bool:
    """Whether this process tore down a process group (`destroy`): its gloo threads still run."""
    return _had_group


class PendingMax:
    """An elementwise max over ranks of a few ints, all-reduced in the background: started at one step
    boundary, read at a later one.

    Agreement this way costs the loop no wait for a network round trip; every rank reads the same
    result at the same boundary, so all ranks still act at the same step.
    """

    def __init__(self, values: list[int]):
        self.tensor = torch.tensor(values, dtype=torch.int64, device=_device())
        self.work = (
            tdist.all_reduce(self.tensor, op=tdist.ReduceOp.MAX, async_op=True) if initialized() else None
        )

    def result(self) -> list[int]:
        if self.work is not None:
            self.work.wait()
        return [int(v) for v in self.tensor.tolist()]


def start_max(values: list[int]) -> PendingMax:
    """Begin an elementwise max over ranks; `.result()` returns it later. Must be called on all ranks."""
    return PendingMax(values)


def broadcast_tensors_from_main(tensors: list[torch.Tensor]) -> None:
    """Overwrite every rank's tensors in place with rank 0's. Must be called on all ranks."""
    if not initialized():
        return
    for t in tensors:
        tdist.broadcast(t.data, src=0)
