"""`profile.steps: [a, b]`: a torch.profiler trace of optimizer steps a..b on every rank, written as
RUN_DIR/profile/step_A-B/rank_R.pt.trace.json (Chrome trace format: open it in Perfetto or
chrome://tracing, or `tensorboard --logdir RUN_DIR/profile` with the torch-tb-profiler plugin).

Every rank traces itself and writes its own file (a rank's timeline is the point); rank 0 records a
`profile` event, which `disttrain status` shows. A segment that resumes past step a does not trace.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from disttrain import dist, fs
from disttrain import events as ev
from disttrain.hooks import Hook, Loop
from disttrain.rundir import RunDir
from disttrain.writers import EventLog, RunFiles


def trace_dir(run_dir: str, first: int, last: int) -> str:
    return fs.join(RunDir(run_dir).profile, f"step_{first}-{last}")


class ProfilerHook(Hook):
    def __init__(self, first: int, last: int, cuda: bool, events: EventLog, files: RunFiles):
        self.first, self.last, self.cuda = first, last, cuda
        self.events, self.files = events, files
        self.prof: Any = None

    def before_step(self, loop: Loop) -> None:
        if loop.step + 1 == self.first:  # the step about to run is the first traced
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
            self.prof.__enter__()

    def after_step(self, loop: Loop) -> None:
        if self.prof is not None and (loop.step >= self.last or loop.stopping):
            self._write(loop)

    def after_train(self, loop: Loop) -> None:
        if self.prof is not None:  # ended inside the window (max_steps, a stop)
            self._write(loop)

    def _write(self, loop: Loop) -> None:
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        target_dir = trace_dir(loop.run_dir, self.first, self.last)
        target = fs.join(target_dir, f"rank_{dist.rank()}.pt.trace.json")
        with tempfile.TemporaryDirectory(prefix="disttrain-trace-") as tmp:
            local = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(local)  # the profiler writes local files only; fs puts it anywhere
            fs.makedirs(target_dir)
            with open(local, "rb") as fh:
                fs.write_bytes(target, fh.read())
        self.events.emit(ev.PROFILE, step=loop.step, first=self.first, last=self.last, path=target_dir)
        self.files.say(f"profiler trace of steps {self.first}-{loop.step} in {target_dir}")
