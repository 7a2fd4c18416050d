"""Where a rank's part of a DTensor sits in the whole tensor: a list of boxes (per-dim [start, stop)).

The sharded checkpoint saves every rank's pieces with their boxes and loads a new layout by cutting the
saved boxes that overlap each new piece, so it reshards across any (dp, tp) mesh and to or from
replicated tensors. A box is read off the DTensor's placements, left to right over the mesh dims, with
torch.chunk's cuts (uneven sizes: the last chunks short or empty):

- `Shard(d)`: the mesh dim cuts dim d's current index list into n chunks, this rank keeps chunk r.
- `_StridedShard(d, split_factor=k)`: dim d is k parts (a fused [q; k; v] weight), each part cut n ways;
  this rank keeps chunk r of every part, so its local rows are k runs, not one: k boxes.
- Replicate (and Partial): no cut on that mesh dim.

FSDP2 over a tensor-parallel parameter writes its own placement so that this reading holds: for a tp
`Shard(0)` it labels the dp cut `_StridedShard(0, split_factor=tp)` (rank (d, t) holds dp chunk d of tp
chunk t: one contiguous box). The computed local shape is checked against the local tensor: metadata
that disagrees with the data is refused, never guessed at.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

Box = list[list[int]]  # per dim [start, stop) of the global tensor


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def pieces(t: torch.Tensor, local: torch.Tensor | None = None) -> list[tuple[Box, torch.Tensor]]:
    """This rank's part of `t` as (box, view of the local tensor) pairs; a plain tensor is one whole box.
    `local`: the tensor to take the views of (default: t's own local part), laid out like it."""
    if not is_dtensor(t):
        return [([[0, n] for n in t.shape], t if local is None else local)]
    local = t.to_local() if local is None else local  # type: ignore[attr-defined]
    runs = [_runs(ix) for ix in _indices(t)]
    got = tuple(sum(b - a for a, b, _ in rs) for rs in runs)
    if got != tuple(local.shape):
        where = getattr(t, "placements", None)
        raise ValueError(f"{where}: placements give a local shape {got}, the tensor is {tuple(local.shape)}")
    out = []
    for combo in itertools.product(*runs):
        view = local
        for d, (a, b, offset) in enumerate(combo):
            view = view.narrow(d, offset, b - a)
        out.append(([[a, b] for a, b, _ in combo], view))
    return out


def owns(t: torch.Tensor) -> bool:
    """Whether this rank writes its part of `t`: its mesh coordinate is 0 on every mesh dim that does not
    cut `t` (a replica over tp or over data-parallel replicas is then written exactly once)."""
    if not is_dtensor(t):
        return True
    coord = t.device_mesh.get_coordinate() or []  # type: ignore[attr-defined]
    return all(cuts(p) or c == 0 for p, c in zip(t.placements, coord))  # type: ignore[attr-defined]


def cuts(placement: Any) -> bool:
    """Whether a placement cuts the tensor (Shard, or _StridedShard: in torch 2.13 not a Shard subclass)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return isinstance(placement, (Shard, _StridedShard))


def _indices(t: Any) -> list[torch.Tensor]:
    """The global indices this rank holds along each dim."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh, coord = t.device_mesh, t.device_mesh.get_coordinate()
    idx = [torch.arange(int(n)) for n in t.shape]
    for mdim, p in enumerate(t.placements):
        n, r = mesh.size(mdim), coord[mdim]
        if isinstance(p, _StridedShard):
            parts = [_chunk(part, n, r) for part in torch.chunk(idx[p.dim], int(p.split_factor))]
            idx[p.dim] = torch.cat(parts) if parts else idx[p.dim][:0]
        elif isinstance(p, Shard):
            idx[p.dim] = _chunk(idx[p.dim], n, r)
    return idx


def _chunk(ix: torch.Tensor, n: int, r: int) -> torch.Tensor:
    chunks = torch.chunk(ix, n) if len(ix) else ()
    return chunks[r] if r < len(chunks) else ix[:0]


def _runs(ix: torch.Tensor) -> list[tuple[int, int, int]]:
    """Consecutive runs of an index list as (global start, global stop, local offset)."""
    values = ix.tolist()
    if not values:
        return [(0, 0, 0)]
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            runs.append((values[start], values[i - 1] + 1, start))
            start = i
    return runs


def volume(box: Box) -> int:
    n = 1
    for a, b in box:
        n *= max(0, b - a)
    return n


def overlap(a: Box, b: Box) -> Box | None:
    """The box both cover, None when they do not meet."""
    out = [[max(x0, y0), min(x1, y1)] for (x0, x1), (y0, y1) in zip(a, b)]
    return out if all(lo < hi for lo, hi in out) else None


def view_of(t: torch.Tensor, box: Box, within: Box) -> torch.Tensor:
    """The part `box` of a tensor `t` that holds the box `within` of the whole."""
    for d, ((a, b), (origin, _)) in enumerate(zip(box, within)):
        t = t.narrow(d, a - origin, b - a)
    return t
