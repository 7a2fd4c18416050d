"""Where metrics and lifecycle events go. Rank roles are decided once, here: rank 0 gets real writers,
every other rank gets NullWriter, so the loop never asks "am I rank 0?".

Writers continue across segments of one run (requeue, restart): the resumed step is passed in, and a
step logged before an interruption and replayed after the resume is never shown twice.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from typing import Any

from disttrain import dist, fs
from disttrain.config import Config
from disttrain.rundir import RunDir
from disttrain.secrets import redact_text, secret_values
from disttrain.writers.base import (
    ConsoleWriter,
    JsonlWriter,
    MultiWriter,
    NullWriter,
    Writer,
    read_jsonl,
    repair_tail,
    truncate_after,
)
from disttrain.writers.curves import CurvesWriter, resume_spans, write_curves
from disttrain.writers.files import NullRunFiles, RunFiles, build_run_files
from disttrain.writers.staging import Staging
from disttrain.writers.tensorboard import TensorBoardWriter
from disttrain.writers.wandb_writer import STEP_KEY, WandbWriter, _logged_floors, wandb_history, wandb_run_id

__all__ = [
    "STEP_KEY", "ConsoleWriter", "CurvesWriter", "EventLog", "JsonlWriter", "MultiWriter", "NullRunFiles",
    "NullWriter", "RunFiles", "Staging", "build_run_files",
    "TensorBoardWriter", "WandbWriter", "Writer", "_logged_floors", "build_writer", "read_jsonl",
    "repair_tail", "resume_spans", "truncate_after", "wandb_history",
    "wandb_run_id", "write_curves",
]  # fmt: skip


def build_writer(cfg: Config, run_dir: str, *, resumed_step: int, use_tqdm: bool) -> Writer:
    """The writers the config asks for on rank 0; NullWriter on every other rank."""
    if not dist.is_main():
        return NullWriter()
    writers: list[Writer] = []
    if cfg.log.jsonl:
        writers.append(JsonlWriter(run_dir, resumed_step))
    logged_through = writers[0].logged_through if writers else None
    if cfg.log.console:
        writers.append(ConsoleWriter(cfg.trainer.max_steps, use_tqdm))
    if cfg.log.tensorboard:
        writers.append(TensorBoardWriter(run_dir, resumed_step))
    if cfg.log.wandb:
        writers.append(WandbWriter(cfg, run_dir, resumed_step, fallback_floor=logged_through))
    if cfg.log.plot:
        writers.append(CurvesWriter(run_dir))
    return MultiWriter(writers)


class EventLog:
    """RUN_DIR/events.jsonl: start, resume, signal, checkpoint, requeue, finish, error (DESIGN §3).

    Free text (an error message) can carry a credential; known secret values are masked first."""

    def __init__(self, run_dir: str, job_id: str = "", restart_count: int = 0, cfg: Config | None = None):
        self.path = RunDir(run_dir).events
        self.job_id = job_id
        self.restart_count = restart_count
        self.enabled = dist.is_main()
        self.secrets = secret_values(cfg) if self.enabled else []
        self._repaired = False
        self.failures = 0  # records storage refused: the run's exit is not recorded after one (run.execute)

    def writable_here(self, cfg: Config | None) -> EventLog:
        """This log, written from this rank rather than rank 0: for a record only a survivor can make
        after rank 0 died (nothing else is writing then)."""
        log = copy.copy(self)
        log.enabled, log.secrets = True, secret_values(cfg)
        return log

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "event": event, "job_id": self.job_id}
        record["restart_count"] = self.restart_count
        record.update(fields)
        line = redact_text(json.dumps(record, default=str), self.secrets) + "\n"
        try:
            if not self._repaired:  # a torn last line (kill -9, full disk) must not swallow this record
                repair_tail(self.path)
                self._repaired = True
            fs.append_text(self.path, line)
        except Exception as err:  # any storage failure: an event must never take the run down
            self.failures += 1
            if not isinstance(err, fs.LeaseLost):  # the lease said so once; the run ends at its next write
                print(f"disttrain: could not record the {event!r} event in {self.path}: {fs.first_line(err)}",
                      file=sys.stderr)  # fmt: skip
