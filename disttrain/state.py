"""What a checkpoint holds besides the model and optimizer: the registry of stateful parts, the run's
progress, each rank's random streams, and the seeds they start from.

Saving and loading state are loops over a `StateRegistry`: every part that has state (the schedule, the
progress and data cursor, the non-finite guard, the hooks, the log window, the RNG) is registered once,
under the path its state has in the checkpoint, as *shared* (the same on every rank: rank 0 saves it
in `state.pt`) or *per rank* (every rank's own: gathered into `ranks.pt`). The model and optimizer are
not here: how they are laid out (replicated, sharded) is the strategy's (`parallel.Strategy`).

Paths are `/`-separated keys into the nested state, so the on-disk layout stays what it has always
been (`trainer/guard` lives inside the `trainer` record, hooks under `hooks/<ClassName>`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
import torch

State = dict[str, Any]

# A large prime: the per-rank and per-segment seeds below never collide for realistic ranks and steps.
_SEGMENT_STRIDE = 7919


@runtime_checkable
class Stateful(Protocol):
    """A part with state a checkpoint keeps: plain data and tensors only (torch.load(weights_only))."""

    def state_dict(self) -> State: ...

    def load_state_dict(self, state: State) -> None: ...


@dataclass
class _Entry:
    path: tuple[str, ...]
    part: Stateful
    optional: bool  # absent from older checkpoints (or empty): skipped, not an error


@dataclass
class StateRegistry:
    """The stateful parts of a run, by checkpoint path. Registration order is load order."""

    shared: list[_Entry] = field(default_factory=list)
    per_rank: list[_Entry] = field(default_factory=list)

    def add(self, path: str, part: Stateful, *, optional: bool = False, rank: bool = False) -> None:
        """Register `part` under `path` (e.g. "scheduler", "trainer/guard"); `rank`: per-rank state."""
        entry = _Entry(tuple(path.split("/")), part, optional)
        (self.per_rank if rank else self.shared).append(entry)

    def shared_state(self) -> State:
        return _collect(self.shared)

    def rank_state(self) -> State:
        return _collect(self.per_rank)

    def load_shared(self, state: State) -> None:
        _apply(self.shared, state)

    def load_rank(self, state: State) -> None:
        _apply(self.per_rank, state)


def _collect(entries: list[_Entry]) -> State:
    out: State = {}
    for entry in entries:
        value = entry.part.state_dict()
        if entry.optional and not value:
            continue  # an empty optional part leaves no key, as hooks without state always have
        node = out
        for key in entry.path[:-1]:
            node = node.setdefault(key, {})
        leaf = entry.path[-1]
        if isinstance(node.get(leaf), dict) and isinstance(value, dict):
            node[leaf] = {**value, **node[leaf]}  # a parent registered after one of its children
        else:
            node[leaf] = value
    return out


def _apply(entries: list[_Entry], state: State) -> None:
    for entry in entries:
        node: Any = state
        for key in entry.path:
            if not isinstance(node, dict) or key not in node:
                node = None
                break
            node = node[key]
        if node is None:
            if entry.optional:
                continue
            raise KeyError(f"the checkpoint holds no {'/'.join(entry.path)!r}")
        entry.part.load_state_dict(node)


class Progress:
    """Where the run is: the optimizer step, and why it ended early (early stopping), if it did."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.step = 0
        self.ended = ""  # why the run ended before max_steps; a restarted job then does nothing

    def state_dict(self) -> State:
        # samples_seen: for readers of the checkpoint; the data cursor says where the data is.
        return {"step": self.step, "samples_seen": self.step * self.batch_size, "ended": self.ended}

    def load_state_dict(self, state: State) -> None:
        self.step = int(state["step"])
        self.ended = str(state.get("ended", ""))


class RankRNG:
    """This rank's random streams (torch, CUDA, numpy, python), as data weights_only loading accepts."""

    def state_dict(self) -> State:
        return capture_rank_state()

    def load_state_dict(self, state: State) -> None:
        restore_rank_state(state)


def capture_rank_state() -> State:
    name, keys, pos, has_gauss, gauss = cast(tuple, np.random.get_state(legacy=True))
    version, internal, gauss_next = random.getstate()
    state: State = {
        "torch": torch.get_rng_state(),
        "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": (version, list(internal), gauss_next),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rank_state(state: State) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda is not None:
        import logging

        logging.getLogger("disttrain.state").warning(
            "checkpoint holds CUDA RNG states of %d device(s); not restored here", len(cuda)
        )


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of one rank's random stream (dropout & co) in a segment that starts at `step`. Every rank
    draws differently; a segment that cannot continue a saved stream (a resume at another world size)
    starts a fresh one that differs from every other segment's."""
    return seed * 1000 + 1 + rank + _SEGMENT_STRIDE * step


def worker_seed(seed: int, rank: int, step: int) -> int:
    """The base seed of a rank's DataLoader workers in a segment starting at `step`."""
    return rank_seed(seed, rank, step) - 1


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
