"""Resumable data order and dataloaders.

One global sample order per (seed, epoch). An optimizer step consumes the next `batch_size` samples of
that order; they are cut into `grad_accum` micro-batches and each micro-batch into `world_size` rank
slices. The cursor is the number of samples of the current epoch already consumed, so a resume jumps
straight to it (O(1), no iterating through data), and a resume at another world size with the same
global batch consumes exactly the same samples per step: none repeated, none skipped.

Each epoch trains on floor(N / batch_size) full batches; the remainder of the shuffled order is left
for that epoch (a different remainder every epoch, so every sample is still seen).

A train split that is a stream (disttrain.stream) has no global order: each rank reads its own part,
and `StreamBatches` keeps this rank's position, saved per rank in the checkpoint.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, TensorDataset
from torch.utils.data._utils.collate import default_collate

from disttrain.errors import ConfigError
from disttrain.stream import Position, Stream

# Signals the preemption protocol handles in the main process. A DataLoader worker that received one
# would die mid-batch and take the step with it, so workers ignore them (DESIGN §5).
_WORKER_IGNORED = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGCONT")


@dataclass
class DataCursor:
    """Where training is in the data: epoch and samples consumed within it (global, all ranks)."""

    epoch: int = 0
    offset: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    @classmethod
    def from_state(cls, state: dict[str, int]) -> DataCursor:
        return cls(epoch=int(state["epoch"]), offset=int(state["offset"]))


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The global sample order of one epoch: the same on every rank and every run."""
    if not shuffle:
        return torch.arange(num_samples)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=gen)


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of indices) forever, starting at a cursor.

    The sampler never holds state the trainer depends on: DataLoader workers prefetch ahead, so the
    trainer advances its own DataCursor by `batch_size` per optimizer step (`advance`).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        rank: int,
        world_size: int,
        grad_accum: int,
        seed: int,
        shuffle: bool,
        start: DataCursor,
    ):
        check_train_split(num_samples, batch_size)
        self.n, self.batch, self.rank, self.world = num_samples, batch_size, rank, world_size
        self.accum, self.seed, self.shuffle, self.start = grad_accum, seed, shuffle, start
        self.micro = batch_size // (world_size * grad_accum)  # per rank, per micro-batch

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = self.start.epoch, self.start.offset
        while True:
            order = epoch_order(self.n, self.seed, epoch, self.shuffle)
            for begin in range(offset, self.steps_per_epoch * self.batch, self.batch):
                step_ids = order[begin : begin + self.batch]
                for m in range(self.accum):
                    lo = (m * self.world + self.rank) * self.micro
                    yield step_ids[lo : lo + self.micro].tolist()
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # DataLoader asks; the stream is endless, report one epoch
        return self.steps_per_epoch * self.accum


def dataset_size(dataset: Dataset, split: str) -> int:
    """The number of samples of a map-style split. Raises ConfigError for a split without a length."""
    if not isinstance(dataset, Sized):
        raise ConfigError(
            f"the {split} split ({type(dataset).__name__}) has no len(): it is read whole at every eval, so "
            "it must be a map-style dataset (__len__ and __getitem__); only the train split may be a stream"
        )
    return len(dataset)


def check_train_split(num_samples: int, batch_size: int) -> None:
    """One optimizer step needs a full global batch from the training split. Raises ConfigError."""
    if num_samples == 0:
        raise ConfigError("the pipeline's train split is empty; give datasets() a 'train' split with samples")
    if num_samples < batch_size:
        raise ConfigError(
            f"data.batch_size={batch_size} is larger than the train split ({num_samples} samples); "
            f"use data.batch_size of at most {num_samples}"
        )


def advance(cursor: DataCursor, batch_size: int, num_samples: int) -> DataCursor:
    """The cursor after one optimizer step."""
    offset = cursor.offset + batch_size
    if offset + batch_size > num_samples:
        return DataCursor(cursor.epoch + 1, 0)
    return DataCursor(cursor.epoch, offset)


class TrainData:
    """The train split as the loop sees it: endless micro-batches of this rank from where training is,
    and where that is (the checkpoint's data cursor; a stream's position is per rank, kept by
    `StreamBatches`). Map-style splits advance one global cursor by `batch_size` per optimizer step."""

    def __init__(self, dataset: Any, stream: StreamBatches | None, spec: TrainSpec, rank: int, world: int):
        self.dataset, self.stream, self.spec = dataset, stream, spec
        self.rank, self.world = rank, world
        self.size = 0 if stream is not None else dataset_size(dataset, "train")
        if stream is None:
            check_train_split(self.size, spec.batch_size)  # before anything is built
        self.cursor = DataCursor()

    def advance(self) -> None:
        """One optimizer step's samples are consumed (a stream's position moves as batches are taken)."""
        if self.stream is None:
            self.cursor = advance(self.cursor, self.spec.batch_size, self.size)

    @property
    def epoch(self) -> float:
        if self.stream is not None:
            return float(self.stream.epoch)  # passes over this rank's part (rank 0's is logged)
        return self.cursor.epoch + self.cursor.offset / self.size

    def loader(self, worker_seed: int) -> Any:
        """This rank's micro-batches from the cursor on (workers seeded per rank and segment)."""
        if self.stream is not None:
            self.stream.check()  # positions restored for this world size, before anything is written
            return self.stream.batches(worker_seed)
        spec = self.spec
        sampler = ResumableBatchSampler(
            self.size, spec.batch_size, rank=self.rank, world_size=self.world, grad_accum=spec.grad_accum,
            seed=spec.seed, shuffle=spec.shuffle, start=self.cursor,
        )  # fmt: skip
        return make_loader(self.dataset, sampler, spec.num_workers, spec.pin, worker_seed)

    def state_dict(self) -> dict[str, int]:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor = DataCursor.from_state(state)

    def restore_positions(self, rank_state: dict[str, Any] | None, saved_world: int) -> None:
        """A stream's per-rank positions (only the same world size continues them); nothing otherwise."""
        if self.stream is not None:
            self.stream.restore(rank_state, saved_world)

    def position(self) -> dict[str, Any]:
        """What this rank saves of the data besides the global cursor: a stream's position."""
        return {} if self.stream is None else {"stream": self.stream.position}


@dataclass(frozen=True)
class TrainSpec:
    """What the train data needs of the config."""

    batch_size: int
    grad_accum: int
    seed: int
    shuffle: bool
    num_workers: int
    pin: bool


class ShardedEvalBatches(Sampler[list[int]]):
    """Evaluation order without padding: global batch i is indices [i*B, (i+1)*B), and each rank takes
    its contiguous slice. Every rank runs the same number of batches (so ranks can agree between
    batches); slices at the end may be short or empty, and no sample is counted twice."""

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int):
        self.n, self.batch, self.rank, self.world = num_samples, global_batch, rank, world_size

    def __len__(self) -> int:
        return -(-self.n // self.batch)

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.batch // self.world
        for begin in range(0, self.n, self.batch):
            lo = begin + self.rank * per_rank
            yield list(range(lo, min(lo + per_rank, begin + self.batch, self.n)))


class _Gathered(tuple):
    """A batch already gathered whole from in-memory tensors; collate passes it through."""


class _TensorBatches(Dataset):
    """A TensorDataset whose batches are gathered with one index per tensor instead of sample by sample
    and stacked: the same values, several times faster for small samples (the digits example spent
    6% of its step there, bench/RESULTS.md section 5)."""

    def __init__(self, inner: TensorDataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> Any:
        return self.inner[i]

    def __getitems__(self, ids: list[int]) -> Any:
        if not ids:
            return []
        index = torch.tensor(ids, dtype=torch.long)
        return _Gathered(t[index] for t in self.inner.tensors)


def collate_or_empty(items: Any) -> Any:
    """default_collate, but an empty slice (a rank with nothing left to evaluate) becomes None, and a
    batch gathered whole by _TensorBatches passes through."""
    if isinstance(items, _Gathered):
        return tuple(items)
    return default_collate(items) if items else None


def _ignore_signals(_worker_id: int) -> None:
    for name in _WORKER_IGNORED:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def make_loader(
    dataset: Dataset, batch_sampler: Sampler[list[int]], num_workers: int, pin: bool, seed: int = 0
) -> DataLoader:
    # Every DataLoader iterator draws a base seed for its workers. From the global RNG, that draw would
    # shift the training stream (dropout & co) whenever a loader is created, e.g. for eval or on
    # resume, and break exact resume; a private generator keeps the global stream untouched.
    if type(dataset) is TensorDataset:
        dataset = _TensorBatches(dataset)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_or_empty,
        pin_memory=pin,
        worker_init_fn=_ignore_signals if num_workers else None,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
        generator=torch.Generator().manual_seed(seed),
    )


class StreamBatches:
    """This rank's micro-batches from a Stream, and the position after the last batch handed out.

    Each batch travels with the position after its last sample, from wherever it was read (this process,
    or one DataLoader worker when data.num_workers > 0: a stream is sequential, so one reader keeps its
    order), and `position` moves only when the trainer takes the batch: prefetching never moves it.
    A part that ends mid-batch continues the batch from the part's next pass (epoch), so every sample is
    used and a batch boundary is always a position to resume from.
    """

    def __init__(self, stream: Stream, *, rank: int, world_size: int, micro: int, num_workers: int):
        self.stream, self.rank, self.world, self.micro = stream, rank, world_size, micro
        self.workers = min(num_workers, 1)
        self.position: Position = {"epoch": 0, "at": None}
        self._problem: str | None = None  # why restored positions cannot continue (see check)

    @property
    def epoch(self) -> int:
        return int(self.position["epoch"])

    def restore(self, rank_state: dict[str, Any] | None, saved_world: int) -> None:
        """Continue from the position a checkpoint saved for this rank. Positions that cannot continue
        here (another world size, changed data) are refused by `check()` when training starts, not now:
        evaluating the checkpoint (--test) needs none."""
        try:
            position = _saved_position(rank_state, saved_world, self.world)
            self.stream.check_position(self.rank, self.world, position["at"])
        except ConfigError as err:
            self._problem = str(err)
        else:
            self.position, self._problem = position, None

    def check(self) -> None:
        """Raise ConfigError if the restored positions cannot continue this stream."""
        if self._problem is not None:
            raise ConfigError(self._problem)

    def batches(self, seed: int) -> Iterator[Any]:
        """Endless micro-batches of this rank's part, from `position`."""
        source: Iterator[tuple[Any, Position]] = self._read()
        if self.workers:
            loader = DataLoader(
                _Positioned(self), batch_size=None, num_workers=1, worker_init_fn=_ignore_signals,
                prefetch_factor=4, generator=torch.Generator().manual_seed(seed),
            )  # fmt: skip
            source = iter(loader)
        for batch, position in source:
            self.position = position
            yield batch

    def _read(self) -> Iterator[tuple[Any, Position]]:
        epoch, at = self.epoch, self.position["at"]
        samples: list[Any] = []
        while True:
            empty = True
            for sample, after in self.stream.read(self.rank, self.world, epoch, at):
                empty = False
                samples.append(sample)
                if len(samples) == self.micro:
                    yield default_collate(samples), {"epoch": epoch, "at": after}
                    samples = []
            if empty and at is None:
                raise ConfigError(
                    f"part {self.rank} of {self.world} of the train stream is empty: give it more data or use "
                    "fewer ranks"
                )
            epoch, at = epoch + 1, None


def _saved_position(rank_state: dict[str, Any] | None, saved_world: int, world: int) -> Position:
    if rank_state is None:
        raise ConfigError(
            f"cannot resume at world size {world}: the train split is a stream split into one part per "
            f"rank, and the checkpoint holds the positions of {saved_world} parts; resume with {saved_world} "
            "ranks, or start a new run_dir with init_from=PATH to keep only the weights"
        )
    if "stream" not in rank_state:
        raise ConfigError(
            "the checkpoint holds no stream position (its train split was map-style); start a new run_dir"
        )
    return dict(rank_state["stream"])


class _Positioned(IterableDataset):
    """StreamBatches' (batch, position) pairs, for a DataLoader worker to produce."""

    def __init__(self, batches: StreamBatches):
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[Any, Position]]:
        return self.batches._read()
