"""Where metrics and lifecycle events go. Rank roles are decided once, here: rank 0 gets real writers,
every other rank gets NullWriter, so the loop never asks "am I rank 0?".
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

from disttrain import dist, fs
from disttrain.config import Config


class Writer:
    """Receives `{"train/loss": ..., ...}` at a global optimizer step."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class NullWriter(Writer):
    """What ranks other than 0 write to."""


class MultiWriter(Writer):
    def __init__(self, writers: list[Writer]):
        self.writers = writers

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
        self.path = fs.join(run_dir, "metrics.jsonl")
        if fs.exists(self.path):
            truncate_after(self.path, resumed_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        fs.append_text(self.path, json.dumps({"step": step, **_finite(metrics)}) + "\n")


def truncate_after(path: str, step: int) -> None:
    """Keep only the records of `path` whose step is at most `step` (atomically)."""
    lines = fs.read_text(path).splitlines()
    kept = [line for line in lines if line.strip() and _step_of(line) <= step]
    if len(kept) != len([line for line in lines if line.strip()]):
        fs.atomic_write(path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0  # a torn last line from a kill -9: keep position, reader skips it


class ConsoleWriter(Writer):
    """Plain metric lines on stdout; through tqdm.write when a progress bar owns the terminal."""

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
        parts = [f"step {step}/{self.max_steps}"] + [f"{k} {_fmt(v)}" for k, v in metrics.items()]
        if any(k.startswith("train/") for k in metrics) and (eta := self._eta(step)):
            parts.append(eta)
        line = " | ".join(parts)
        if self.use_tqdm:
            from tqdm import tqdm

            tqdm.write(line)
        else:
            print(line, flush=True)


def _fmt(value: float) -> str:
    if isinstance(value, float) and (abs(value) >= 1e4 or (0 < abs(value) < 1e-3)):
        return f"{value:.3e}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _finite(metrics: dict[str, float]) -> dict[str, Any]:
    # JSON has no NaN/Infinity; write null so every line stays parseable by strict readers.
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}


def build_writer(cfg: Config, run_dir: str, *, resumed_step: int, use_tqdm: bool) -> Writer:
    """The writers the config asks for on rank 0; NullWriter on every other rank."""
    if not dist.is_main():
        return NullWriter()
    writers: list[Writer] = []
    if cfg.log.jsonl:
        writers.append(JsonlWriter(run_dir, resumed_step))
    if cfg.log.console:
        writers.append(ConsoleWriter(cfg.trainer.max_steps, use_tqdm))
    return MultiWriter(writers)


class EventLog:
    """RUN_DIR/events.jsonl: start, resume, signal, checkpoint, requeue, finish, error (DESIGN §3)."""

    def __init__(self, run_dir: str, job_id: str = "", restart_count: int = 0):
        self.path = fs.join(run_dir, "events.jsonl")
        self.job_id = job_id
        self.restart_count = restart_count
        self.enabled = dist.is_main()

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "event": event, "job_id": self.job_id}
        record["restart_count"] = self.restart_count
        record.update(fields)
        try:
            fs.append_text(self.path, json.dumps(record, default=str) + "\n")
        except OSError as err:  # an event must never take the run down; say so on stderr
            print(f"disttrain: could not write {self.path}: {err}", file=sys.stderr)
