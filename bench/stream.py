"""Section 7: a streamed train split (disttrain.stream.JsonlStream through data.StreamBatches).

- resume: time to the first batch after a resume at 95% of a JSON-lines file (a seek to the saved byte
  offset) against the same at 5% (a resume costs the same wherever it lands), and against the cheapest
  resume by fast-forwarding a user could write (skipping the consumed lines without parsing them).
- read: micro-batches per second through StreamBatches (positions, collation), against a plain loop
  over the same file: readline, json.loads, the same transform, default_collate every micro-batch.

One process, page cache warm for both (each figure alternates the two, A B A B ...).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from itertools import islice
from typing import Any

import torch
from torch.utils.data._utils.collate import default_collate

from bench.common import Section, ratio_row
from disttrain.data import StreamBatches
from disttrain.stream import JsonlStream

MICRO = 32


def run(quick: bool) -> Section:
    sec = Section("stream", "8. Streams: resume by seek vs fast-forward; StreamBatches vs a plain read loop")
    records, reps = (100_000, 3) if quick else (400_000, 5)
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as root:
        path = _write(os.path.join(root, "train.jsonl"), records)
        sec.notes.append(
            f"{records:,} records of ~{os.path.getsize(path) // records} bytes ({os.path.getsize(path) >> 20} MiB)"
        )
        late, early = _alternate(reps, lambda: _resume_seek(path, 0.95), lambda: _resume_seek(path, 0.05))
        sec.rows.append(ratio_row("resume at 95% vs at 5% of the file: first batch", late, early, "ms", "<= 1.5",
                                  lambda r: r <= 1.5, scale=1e3, note="O(1): the cost does not grow with the position"))  # fmt: skip
        seek, skip = _alternate(reps, lambda: _resume_seek(path, 0.95), lambda: _resume_skip(path, 0.95))
        sec.rows.append(ratio_row("resume at 95%: seek vs fast-forward, first batch", seek, skip, "ms", "<= 0.05",
                                  lambda r: r <= 0.05, scale=1e3, note="baseline: skip the consumed lines unparsed"))  # fmt: skip
        n = records // 4
        mine, plain = _alternate(reps, lambda: _read_batches(path, n), lambda: _read_plain(path, n))
        sec.rows.append(ratio_row(f"read {n:,} records as micro-batches of {MICRO}", mine, plain, "s", "<= 1.10",
                                  lambda r: r <= 1.10, note="baseline: readline, json.loads, collate"))  # fmt: skip
    return sec


def _write(path: str, records: int) -> str:
    with open(path, "w") as fh:
        for i in range(records):
            fh.write(json.dumps({"id": i, "input_ids": list(range(i % 50, i % 50 + 40))}) + "\n")
    return path


def _sample(record: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor(record["input_ids"])}


def _alternate(reps: int, a: Any, b: Any) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for _ in range(reps):
        xs.append(a())
        ys.append(b())
    return xs, ys


def _position_at(path: str, frac: float) -> tuple[int, dict[str, Any]]:
    """(lines consumed, the StreamBatches position) after `frac` of the file's lines."""
    with open(path, "rb") as fh:
        lines = sum(1 for _ in fh)
        k = int(lines * frac) // MICRO * MICRO
        fh.seek(0)
        for _ in islice(fh, k):
            pass
        offset = fh.tell()
    return k, {"epoch": 0, "at": {"offset": offset, "bytes": os.path.getsize(path)}}


def _resume_seek(path: str, frac: float) -> float:
    _, position = _position_at(path, frac)
    reader = StreamBatches(
        JsonlStream(path, transform=_sample), rank=0, world_size=1, micro=MICRO, num_workers=0
    )
    t0 = time.perf_counter()
    reader.restore({"stream": position}, 1)
    reader.check()
    next(reader.batches(seed=0))
    return time.perf_counter() - t0


def _resume_skip(path: str, frac: float) -> float:
    k, _ = _position_at(path, frac)
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        for _ in islice(fh, k):
            pass
        default_collate([_sample(json.loads(fh.readline())) for _ in range(MICRO)])
    return time.perf_counter() - t0


def _read_batches(path: str, n: int) -> float:
    reader = StreamBatches(
        JsonlStream(path, transform=_sample), rank=0, world_size=1, micro=MICRO, num_workers=0
    )
    t0 = time.perf_counter()
    for _ in islice(reader.batches(seed=0), n // MICRO):
        pass
    return time.perf_counter() - t0


def _read_plain(path: str, n: int) -> float:
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        for _ in range(n // MICRO):
            default_collate([_sample(json.loads(fh.readline())) for _ in range(MICRO)])
    return time.perf_counter() - t0
