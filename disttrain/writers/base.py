"""Writer base classes, the JSONL and console writers, and the JSONL reader."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from disttrain import fs, rundir
from disttrain.rundir import read_jsonl

__all__ = [
    "ConsoleWriter", "JsonlWriter", "MultiWriter", "NullWriter", "Writer", "read_jsonl", "repair_tail", "truncate_after",
]  # fmt: skip


class Writer:
    """Receives `{"train/loss": ..., ...}` at a global optimizer step."""

    # Highest step an earlier segment wrote to metrics.jsonl (before the resume dropped replayed lines):
    # where the interruption happened. None when unknown or on a fresh run.
    logged_through: int | None = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class NullWriter(Writer):
    """What ranks other than 0 write to."""


class MultiWriter(Writer):
    def __init__(self, writers: list[Writer]):
        self.writers = writers
        self.logged_through = max(
            (w.logged_through for w in writers if w.logged_through is not None), default=None
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for w in self.writers:
            w.log(step, metrics)

    def close(self) -> None:
        for w in self.writers:
            w.close()


class JsonlWriter(Writer):
    """RUN_DIR/metrics.jsonl: one object a line, `{"step": N, "train/loss": ...}`.

    On resume from step S, lines after S (written after the checkpoint, before the interruption) are
    dropped first: the resumed run recomputes those steps, and a reader must never see a step twice.
    """

    def __init__(self, run_dir: str, resumed_step: int):
        self.path = rundir.RunDir(run_dir).metrics
        if fs.exists(self.path):
            self.logged_through = truncate_after(self.path, resumed_step)
            repair_tail(self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        fs.append_text(self.path, json.dumps({"step": step, **_finite(metrics)}) + "\n")


def truncate_after(path: str, step: int) -> int | None:
    """Keep only the records of `path` whose step is at most `step` (atomically); lines that are not
    records (torn by a kill -9) go too. Returns the highest step the file held before (None if none)."""
    lines = [line for line in fs.read_text(path).splitlines() if line.strip()]
    kept = [line for line in lines if _parses(line) and _step_of(line) <= step]
    if len(kept) != len(lines):
        fs.atomic_write(path, "".join(line + "\n" for line in kept))
    return max((_step_of(line) for line in lines), default=None)


def repair_tail(path: str) -> bool:
    """Make a JSONL file end with a whole line before anything is appended: a last line without its
    newline (an append cut short by kill -9 or a full disk) would swallow the next record. A torn line
    that still parses gets its newline; one that does not is dropped. Returns whether it changed."""
    if not fs.exists(path):
        return False
    text = fs.read_text(path)
    if not text or text.endswith("\n"):
        return False
    head, _, last = text.rpartition("\n")
    kept = head + "\n" if head else ""
    if _parses(last):
        kept += last + "\n"
    fs.atomic_write(path, kept)
    return True


def _parses(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0  # a torn last line from a kill -9: keep position, reader skips it


class ConsoleWriter(Writer):
    """Plain metric lines on stdout. With a progress bar on the terminal (`use_tqdm`) the bar shows the
    train window, so only the other records (eval) print, through tqdm.write above the bar."""

    def __init__(self, max_steps: int, use_tqdm: bool):
        self.max_steps = max_steps
        self.use_tqdm = use_tqdm
        self._first: tuple[int, float] | None = None

    def _eta(self, step: int) -> str:
        now = time.monotonic()
        if self._first is None:
            self._first = (step, now)
            return ""
        done, elapsed = step - self._first[0], now - self._first[1]
        if done <= 0:
            return ""
        left = elapsed / done * (self.max_steps - step)
        return f"eta {int(left // 60)}m{int(left % 60):02d}s"

    def log(self, step: int, metrics: dict[str, float]) -> None:
        train = any(k.startswith("train/") for k in metrics)
        if train and self.use_tqdm:
            return  # the bar has these figures
        parts = [f"step {step}/{self.max_steps}"] + [f"{k} {fmt_number(v)}" for k, v in metrics.items()]
        if train and (eta := self._eta(step)):
            parts.append(eta)
        line = " | ".join(parts)
        if self.use_tqdm:
            from tqdm import tqdm

            tqdm.write(line)
        else:
            print(line, flush=True)


def fmt_number(value: float) -> str:
    """One format for every metric: four decimals for the usual range, one for figures from 100 on
    (throughput, memory), three significant digits with an exponent for tiny ones (a learning rate)."""
    if not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if 0 < abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"


def _finite(metrics: dict[str, float]) -> dict[str, Any]:
    # JSON has no NaN/Infinity; write null so every line stays parseable by strict readers.
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
