"""The run directory contract (DESIGN.md section 3) as code: every file name, the step-directory
pattern, what "committed" means, and how the JSONL logs are read.

Every reader and writer of a run dir (checkpoint manager, status, launch, writers) takes its names
from here, so the layout is spelled once. Torch-free: `disttrain status` imports it on a login node.

    RUN_DIR/
      config.yaml                 the resolved config, secrets redacted
      metrics.jsonl               {"step": N, "train/loss": ...} one object a line
      events.jsonl                lifecycle events
      test_metrics.json           from `--test`
      curves.png                  drawn at the end of a segment
      timeline.png                `disttrain plot --timeline`: where the time went
      checkpoints/step_00000120/  one committed checkpoint: manifest.json is written last
      checkpoints/latest          the newest committed step's directory name
      lease.json                  the run now holding the run dir (host, pid, job id); gone when it ends
      profile/step_A-B/           torch.profiler traces, one per rank (`profile.steps`)
      stacks/rank_R.json          where rank R was when it stalled (a hang, or waiting for a hung peer)
      wandb/ tb/ slurm/           writer and launcher output

A sweep dir (`disttrain submit --sweep`) holds `sweep.json` (its tasks, their overrides and job ids),
`slurm/` (the job array's files) and one run dir per task, named from the task's overrides (the
contract: disttrain.sweepdir). Event names and record shapes: disttrain.events; the manifest:
disttrain.manifest.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

from disttrain import fs

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
TEST_METRICS = "test_metrics.json"
CURVES = "curves.png"
TIMELINE = "timeline.png"  # `disttrain plot --timeline`
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
LEASE = "lease.json"
WANDB = "wandb"
WANDB_ID = "wandb_id.txt"
TENSORBOARD = "tb"
SLURM = "slurm"
SWEEP = "sweep.json"  # in a sweep dir, never in a run dir
PROFILE = "profile"
STACKS = "stacks"  # stacks/rank_R.json: where a rank was when it stalled (a hang, a peer that hangs)

# A committed step directory's name: `step_` and at least eight digits, nothing after. A save in
# progress writes to `step_N.tmp-XXXX` (local disks), which this pattern does not match.
STEP_DIR = re.compile(r"step_(\d{8,})")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The step a checkpoint directory name stands for, or None for anything else (a `.tmp-` dir)."""
    match = STEP_DIR.fullmatch(name)
    return int(match.group(1)) if match else None


def is_committed(step_dir: str) -> bool:
    """A step directory is a checkpoint once its manifest exists (written last, DESIGN §4)."""
    return fs.exists(fs.join(step_dir, MANIFEST))


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory (a local path or an fsspec URL)."""

    path: str

    def file(self, name: str) -> str:
        return fs.join(self.path, name)

    @property
    def config(self) -> str:
        return self.file(CONFIG)

    @property
    def metrics(self) -> str:
        return self.file(METRICS)

    @property
    def events(self) -> str:
        return self.file(EVENTS)

    @property
    def checkpoints(self) -> str:
        return self.file(CHECKPOINTS)

    @property
    def profile(self) -> str:
        return self.file(PROFILE)

    @property
    def stacks(self) -> str:
        return self.file(STACKS)

    def step_dir(self, step: int) -> str:
        return fs.join(self.checkpoints, step_name(step))

    def committed_steps(self) -> list[int]:
        """Steps of the committed checkpoints, newest first. The one definition every reader uses:
        a `step_N` directory (never a `step_N.tmp-*` one, never a symlink to somewhere else: retention
        would delete through it) holding a manifest."""
        steps = [s for s in map(step_of, fs.listdir(self.checkpoints)) if s is not None]
        own = (s for s in steps if not fs.islink(self.step_dir(s)) and is_committed(self.step_dir(s)))
        return sorted(own, reverse=True)


# The files disttrain writes at fixed names in a run dir (besides step directories and writer folders).
WRITTEN = (CONFIG, METRICS, EVENTS, TEST_METRICS, CURVES, LEASE, WANDB_ID, f"{CHECKPOINTS}/{LATEST}")


def linked_files(path: str) -> list[str]:
    """The files of WRITTEN in a local run dir that are symbolic links: a write through one would land
    outside the run dir (object stores have no links)."""
    return [fs.join(path, name) for name in WRITTEN if fs.islink(fs.join(path, name))]


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSONL file; [] when missing. A torn line (a kill -9 or a full disk during an
    append, or a line being written right now) is skipped."""
    if not fs.exists(path):
        return []
    rows = []
    for line in fs.read_text(path).splitlines():
        with contextlib.suppress(ValueError):
            if isinstance(record := json.loads(line), dict):
                rows.append(record)
    return rows
