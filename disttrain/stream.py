"""Streams: training data without a length, read in order, larger than memory, resumable in O(1).

A `Stream` splits itself into `parts` disjoint parts, one per rank, and reads one part from a saved
position. Every sample comes with the position right after it: plain data (ints, strings) that the
checkpoint keeps per rank in ranks.pt, next to the RNG states. Resuming opens the part at that
position, so nothing already consumed is read again and nothing is skipped.

Positions belong to a number of parts: a part is a function of (part, parts), so a resume must use the
world size the positions were saved with (the trainer refuses another one with one line).

Two streams ship here: `JsonlStream` (JSON-lines files split by byte ranges; a position is a byte
offset, so resuming is one seek) and `HFStream`, which adapts a HuggingFace `datasets.IterableDataset`
(streaming mode): its parts come from `split_dataset_by_node` and its positions are datasets' own
`state_dict()`, which restarts at the saved shard and skips the examples already read in that shard.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sized
from typing import Any

from torch.utils.data import IterableDataset

from disttrain import fs
from disttrain.errors import ConfigError

Position = dict[str, Any]
Transform = Callable[[Any], Any]


class Stream(IterableDataset):
    """The user-facing base for data read in order: subclass it and implement `read`.

    disttrain calls `read(rank, world_size, epoch, position)` on every rank; the parts of one stream
    must be disjoint and together cover it. A part is read again from its start for the next epoch.
    """

    def read(
        self, part: int, parts: int, epoch: int, start: Position | None
    ) -> Iterator[tuple[Any, Position]]:
        """Yield (sample, position after it) from `start` (None: the part's beginning) to the part's end."""
        raise NotImplementedError

    def check_position(self, part: int, parts: int, position: Position | None) -> None:
        """Raise ConfigError if `position` cannot be resumed from (e.g. the data changed since)."""

    def __iter__(self) -> Iterator[Any]:  # the whole stream once, for use outside disttrain
        for sample, _ in self.read(0, 1, 0, None):
            yield sample


class JsonlStream(Stream):
    """JSON-lines files (a file, a folder of `*.jsonl`, or a list; local or fsspec URLs) as one stream.

    The files are one byte space; part p of P holds the records whose first byte falls in
    [p*T/P, (p+1)*T/P) of the T bytes. Finding a part's first record reads at most one line, and a
    position is the byte offset of the next record: resuming is a seek. Blank lines are skipped.
    """

    def __init__(self, paths: str | list[str], transform: Transform | None = None):
        self.paths = _jsonl_files(paths)
        self.sizes = [fs.size(p) for p in self.paths]
        self.total = sum(self.sizes)
        self.transform = transform

    def bounds(self, part: int, parts: int) -> tuple[int, int]:
        return part * self.total // parts, (part + 1) * self.total // parts

    def read(
        self, part: int, parts: int, epoch: int, start: Position | None
    ) -> Iterator[tuple[Any, Position]]:
        lo, hi = self.bounds(part, parts)
        at, aligned = (lo, False) if start is None else (int(start["offset"]), True)
        base = 0
        for path, size in zip(self.paths, self.sizes):
            if base + size > at and base < hi:
                yield from self._read_file(path, base, max(at, base) - base, hi - base, aligned or at <= base)
            base += size

    def _read_file(
        self, path: str, base: int, begin: int, end: int, aligned: bool
    ) -> Iterator[tuple[Any, Position]]:
        """Records of one file that start in [begin, end): offsets local to the file, `base` its start."""
        with fs.open_file(path, "rb") as fh:
            here = begin
            if not aligned and begin > 0:
                fh.seek(begin - 1)
                here += len(fh.readline()) - 1  # the record that began before `begin` is the previous part's
            else:
                fh.seek(begin)
            while here < end:  # offsets counted, not asked: two tell() a line cost ~15% of the read here
                line = fh.readline()
                if not line:
                    return
                start, here = here, here + len(line)
                if line.strip():
                    yield self._sample(line, path, start), {"offset": base + here, "bytes": self.total}

    def _sample(self, line: bytes, path: str, offset: int) -> Any:
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}: the line at byte {offset} is not JSON ({err})") from None
        return self.transform(record) if self.transform is not None else record

    def check_position(self, part: int, parts: int, position: Position | None) -> None:
        if position is None:
            return
        saved = int(position.get("bytes", -1))
        if saved != self.total:
            raise ConfigError(
                f"the train stream's files hold {self.total} bytes, but {saved} when the checkpoint was saved: "
                "its positions would point into other records; restore the files or start a new run_dir"
            )


def _jsonl_files(paths: str | list[str]) -> list[str]:
    if isinstance(paths, str):
        paths = (
            [fs.join(paths, n) for n in sorted(fs.listdir(paths)) if n.endswith(".jsonl")]
            if fs.isdir(paths)
            else [paths]
        )
    missing = [p for p in paths if not fs.isfile(p)]
    if missing or not paths:
        raise ConfigError(
            f"JSON-lines data: {missing[0] if missing else 'no *.jsonl file'} not found; give a file or a folder of *.jsonl files"
        )
    return list(paths)


class HFStream(Stream):
    """A HuggingFace `datasets.IterableDataset` (streaming mode) as a Stream.

    Parts: `split_dataset_by_node` (whole shards per rank when the shard count divides by the world
    size, else every rank reads all shards and keeps every world_size-th example). Positions: datasets'
    `state_dict()`, which resumes at the saved shard and skips the examples already read in it (not a
    seek within a shard: many small shards keep a resume short). A shuffle buffer is not saved.
    """

    def __init__(self, dataset: Any, transform: Transform | None = None):
        self.dataset = dataset
        self.transform = transform

    def read(
        self, part: int, parts: int, epoch: int, start: Position | None
    ) -> Iterator[tuple[Any, Position]]:
        from datasets.distributed import split_dataset_by_node

        shard = split_dataset_by_node(self.dataset, rank=part, world_size=parts)
        shard.set_epoch(epoch)
        if start is not None:
            shard.load_state_dict(start)
        for record in shard:
            yield (self.transform(record) if self.transform else record), shard.state_dict()


def as_stream(dataset: Any, split: str) -> Stream | None:
    """The Stream to read `dataset` through, or None for a map-style dataset. Raises ConfigError for an
    iterable dataset that cannot say where it is (it could not resume without reading again)."""
    if isinstance(dataset, Stream):
        return dataset
    if _is_hf_iterable(dataset):
        return HFStream(dataset)
    if isinstance(dataset, Sized):
        return None
    raise ConfigError(
        f"the {split} split ({type(dataset).__name__}) has no len() and no position to resume from: return a "
        "map-style dataset, a HuggingFace datasets.IterableDataset, or a disttrain.stream.Stream "
        "(e.g. JsonlStream) whose read() yields (sample, position)"
    )


def _is_hf_iterable(dataset: Any) -> bool:
    cls = type(dataset)
    return cls.__module__.startswith("datasets.") and cls.__name__ == "IterableDataset"
