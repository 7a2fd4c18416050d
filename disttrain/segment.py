"""One segment of a run: from a start (the first, or after a requeue, a restart, a resubmission) to its
end. Beginning one creates the run dir and writes config.yaml (rank 0), opens the writers, and records
`start` and, when it continues a checkpoint, `resume` and any `config_changed`; the end is recorded by
the loop (`finish`, `stopped`) and by `run.py` (`exit`).
"""

from __future__ import annotations

from typing import Any

import torch

from disttrain import dist, phases
from disttrain import events as ev
from disttrain.ckpt_read import Loaded
from disttrain.cluster import ClusterEnv
from disttrain.features.metrics import TrainLog
from disttrain.writers import EventLog, RunFiles


class Segment:
    """This segment's records and lines (rank 0 writes them; the writers are null elsewhere)."""

    def __init__(
        self, cfg: Any, cluster: ClusterEnv, files: RunFiles, events: EventLog, log: TrainLog, bar: bool
    ):
        self.cfg, self.cluster, self.files, self.events, self.log = cfg, cluster, files, events, log
        self.bar = bar  # rank 0 shows a progress bar instead of log lines
        self.began = False  # whether this segment began training (recorded its start), for its end event

    def begin(self, step: int, resumed: Loaded | None) -> None:
        """Create the run dir, write config.yaml, open the writers and record the start (and resume).
        Must be called on all ranks."""
        self.files.create()
        changed = self.files.write_config(self.cfg)
        if resumed is None:
            changed = []  # a config.yaml without a checkpoint is from a run that never committed one
        dist.barrier()  # nobody writes into run_dir before it exists
        self.log.open(step, self.bar)
        self.events.emit(
            ev.START, step=step, world_size=dist.world_size(), max_steps=self.cfg.trainer.max_steps
        )
        self.began = True
        if changed:
            self.files.say(
                f"note: config changed since the checkpoint, applied from step {step}: {'; '.join(changed)}"
            )
            self.events.emit(ev.CONFIG_CHANGED, step=step, changes=changed)
        if resumed is not None:
            self._note_threads(resumed.manifest.get("num_threads"))
            for note in resumed.fallbacks:  # why a faster tier did not serve, before what did
                self.events.emit(ev.TIER_FALLBACK, **note, served=resumed.tier)
            # interrupted_at: the last step logged before the interruption, so `disttrain status` and the
            # curves can say exactly how many steps a kill -9 cost.
            self.events.emit(
                ev.RESUME,
                step=step,
                cause=self._cause(),
                interrupted_at=self.log.logged_through,
                tier=resumed.tier,
            )
            # The tier is news only when there are two: a run without checkpoint.local reads as before.
            local = resumed.tier != "durable" or resumed.fallbacks
            self.files.say(f"resumed from step {step}" + (f" ({resumed.tier} tier)" if local else ""))

    def ready(self, step: int) -> None:
        """Start-up ends here: the first step comes next."""
        self.events.emit(ev.READY, step=step, **phases.CLOCK.ready_fields())

    def finished(self, step: int, reason: str, skipped: int = 0) -> None:
        """The run is done: recorded, and one line that says where its results are. Steps skipped as
        non-finite (trainer.nonfinite=skip) are said loudly: a run that skipped most of its steps
        "finishes" with weights that barely trained."""
        extra = {"reason": reason} if reason else {}
        self.events.emit(ev.FINISH, step=step, **extra, **({"skipped": skipped} if skipped else {}))
        if skipped:
            share = skipped / max(1, step)
            loud = " THE WEIGHTS BARELY TRAINED;" if share >= 0.5 else ""
            self.files.warn(
                f"disttrain: warning: {skipped} of {step} steps ({share:.0%}) were skipped as non-finite "
                f"(trainer.nonfinite=skip);{loud} check the data and optim.lr"
            )
        why = f": {reason}" if reason else ""
        run_dir = self.cfg.run_dir
        self.files.say(
            f"finished at step {step}{why}; results in {run_dir} (metrics.jsonl, events.jsonl, checkpoints/); "
            f"`disttrain status {run_dir}` sums it up"
        )

    def stopped(self, step: int, signal: str | None) -> None:
        self.events.emit(ev.STOPPED, step=step, signal=signal)

    def exit(self, step: int) -> None:
        """The segment's end, for goodput; not after storage refused a record (another attempt at a dead
        endpoint costs its timeout and a line after the failure's own, for a record goodput can miss)."""
        if self.began and not self.events.failures:
            self.events.emit(ev.EXIT, step=step)

    def say(self, text: str) -> None:
        self.files.say(text)

    def _cause(self) -> str:
        if self.cluster.restart_count > 0:
            return f"{self.cluster.launcher} restart {self.cluster.restart_count}"
        return "restart"

    def _note_threads(self, saved: Any) -> None:
        now = torch.get_num_threads()
        if isinstance(saved, int) and saved != now:
            self.files.say(
                f"note: this segment computes with {now} intra-op thread(s), the checkpoint's with {saved}: "
                f"CPU float results are no longer bit-identical to an uninterrupted run "
                f"(trainer.threads={saved} would keep them)"
            )
