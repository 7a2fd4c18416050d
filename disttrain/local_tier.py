"""The local checkpoint tier (DESIGN.md section 7a): every rank keeps its own copy of its state in
node-local storage (`checkpoint.local.dir`, by default tmpfs under /dev/shm), so that a restart inside
the allocation (`torchrun --max-restarts`) resumes from a step at most `checkpoint.local.every_steps`
old instead of the last durable checkpoint.

    LOCAL_DIR/rank_00001/step_00000012/   one rank's piece of step 12; manifest.json written last

A piece is what that rank needs to continue exactly, and nothing another rank holds:
- ddp: the replicated weights, optimizer and scaler (identical on every rank: DDP keeps the replicas in
  step), this rank's copy of the shared state (schedule, progress, data cursor, hooks) and its own rank
  state (RNG streams, a stream's position, the log window) -- the durable format, with one rank in
  ranks.pt;
- fsdp: this rank's shard (rows of every sharded tensor, the same layout as a durable shard file), the
  unsharded rest and shared state, and its rank state.

On resume the shared state comes from rank 0's piece (one broadcast), as a durable resume takes it from
rank 0's files; each rank's weights, optimizer state and RNG come from its own. The same discipline as
durable checkpoints: each file's size and sha256 in a manifest written last, a temporary directory
renamed into place, the newest `keep_last` kept, every file hashed before it is parsed and `.pt` files
unpickled only after, with `weights_only=True`.

Writes happen in a background thread of each rank, from a host copy taken at the step (the step blocks
only for that copy); no collective is involved, so a rank that dies mid-write leaves only a `.tmp-`
directory, never a piece that looks whole. A write that fails (tmpfs full) warns once and training goes
on: the durable tier still covers. Ranks agree on the step to resume with one all-gather: the oldest of
the ranks' newest verified pieces; it is used only when newer than the newest durable checkpoint.

Only a restarted attempt (a torchrun restart, a SLURM requeue: restart count > 0) reads the tier; a
first attempt clears its rank's folder, so a run dir deleted and started again never picks up an old
run's state. A resume at another world size or strategy skips the tier (its pieces are per rank) and
uses the durable one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from disttrain import ckpt_format as fmt
from disttrain import ckpt_sharded, dist, fs
from disttrain.ckpt_read import Loaded, read_dir
from disttrain.config import LocalTierConfig
from disttrain.errors import CheckpointError
from disttrain.manifest import build as build_manifest
from disttrain.rundir import is_committed, step_name, step_of

log = logging.getLogger("disttrain.checkpoint")
State = dict[str, Any]
Shards = tuple[dict[str, Any], State]
TIER = "local"


def default_dir(run_dir: str) -> str:
    """/dev/shm/disttrain/<run id>/<host>: the run id is the run dir's name and a hash of its full path
    (or URL), so two runs never share a folder and the same run finds its own again after a restart."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    where = run_dir.rstrip("/")
    full = where if "://" in where else os.path.abspath(where)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(full)) or "run"
    digest = hashlib.sha256(full.encode()).hexdigest()[:12]
    return os.path.join(root, "disttrain", f"{name}-{digest}", socket.gethostname())


@dataclass(frozen=True)
class Found:
    """What this rank found in its folder: its newest verified piece, or why it has none."""

    loaded: Loaded | None
    problem: str | None


class LocalTier:
    """This rank's local pieces. `save` and `discard` involve no collective; `restore` must be called
    on all ranks."""

    def __init__(
        self, cfg: LocalTierConfig, run_dir: str, meta: State, strategy: str, *, first_attempt: bool
    ):
        self.cfg, self.meta, self.strategy = cfg, meta, strategy
        self.node_dir = cfg.dir or default_dir(run_dir)
        self.dir = os.path.join(self.node_dir, f"rank_{dist.rank():05d}")
        self.last_step: int | None = None  # the step this rank last wrote (or resumed from)
        self._thread: threading.Thread | None = None
        self._warned = False
        self.first_attempt = first_attempt
        if self.on and first_attempt:
            fs.remove(self.dir, recursive=True)  # another run's pieces, or a deleted run dir's: never ours

    @property
    def on(self) -> bool:
        return self.cfg.every_steps > 0

    def due(self, step: int) -> bool:
        return self.on and step % self.cfg.every_steps == 0 and step != self.last_step

    # -------------------------------------------------------------------------------------- write

    def save(self, step: int, shared: State, mine: State, shards: Shards | None) -> None:
        """Copy this rank's state to host memory now; write it in the background. No collective."""
        self._join()  # one write in flight per rank
        try:
            host = fmt.host_copy(shared, "app_state")
            own = fmt.host_copy(mine, "rank_state")
            rows = None if shards is None else (fmt.host_copy(shards[0], "shards"), shards[1])
        except CheckpointError as err:
            self._warn(step, err)
            return
        self.last_step = step
        self._thread = threading.Thread(
            target=self._write, args=(step, host, own, rows), name="disttrain-local-save", daemon=True
        )  # a daemon: a kill or an exit mid-write leaves a .tmp- dir, which is no piece
        self._thread.start()

    def _write(self, step: int, host: State, mine: State, rows: Shards | None) -> None:
        work = os.path.join(self.dir, f"{step_name(step)}.tmp-{secrets.token_hex(4)}")
        try:
            self._clean_stale()
            meta = self.meta
            if rows is None:
                files = fmt.write_files(work, host, [mine])
            else:  # one shard file: this rank's rows, under the same layout record a durable save keeps
                fs.makedirs(work)
                name, digest = ckpt_sharded.write_shard(work, 0, rows[0])
                files = {**fmt.write_files(work, host, [mine], model=False), name: digest}
                layout = ckpt_sharded.merge_layouts([rows[1]])
                meta = {**meta, "format": ckpt_sharded.FORMAT, "strategy": "fsdp", "layout": layout}
            meta = {**meta, "tier": TIER, "rank": dist.rank()}
            fmt.publish(work, self._path(step), build_manifest(step, dist.world_size(), files, meta))
            self._retain()
        except Exception as err:  # tmpfs full, a folder not writable: the durable tier still covers
            fs.remove(work, recursive=True)
            self._warn(step, err)

    def _warn(self, step: int, err: Exception) -> None:
        text = f"local checkpoint step {step} in {self.dir} failed: {fs.first_line(err)}"
        log.warning("%s", text)
        if not self._warned:  # one line per process, not one a save: training goes on without it
            self._warned = True
            print(
                f"disttrain: rank {dist.rank()}: warning: {text}; training goes on, the durable tier "
                "(checkpoint.every_steps) still covers a restart",
                file=sys.stderr,
                flush=True,
            )

    def wait(self) -> None:
        self._join()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def steps(self) -> list[int]:
        """This rank's committed pieces, newest first (a manifest makes a piece, as in the run dir)."""
        found = [s for s in map(step_of, fs.listdir(self.dir)) if s is not None]
        return sorted((s for s in found if is_committed(self._path(s))), reverse=True)

    def _path(self, step: int) -> str:
        return os.path.join(self.dir, step_name(step))

    def _clean_stale(self) -> None:
        """What a killed write left: `.tmp-` dirs (only this rank's thread writes here)."""
        for name in fs.listdir(self.dir):
            if step_of(name) is None and name.startswith("step_"):
                fs.remove(os.path.join(self.dir, name), recursive=True)

    def _retain(self) -> None:
        for step in self.steps()[self.cfg.keep_last :]:
            fs.remove(os.path.join(self._path(step), "manifest.json"))  # first: never half a piece
            fs.remove(self._path(step), recursive=True)

    def discard(self) -> None:
        """Remove this rank's pieces (the run finished and its final checkpoint is durable): tmpfs is
        memory. The node's folder goes too once its last rank left it."""
        self._join()
        fs.remove(self.dir, recursive=True)
        if self.cfg.dir:
            return  # the user's folder stays
        for folder in (self.node_dir, os.path.dirname(self.node_dir)):
            try:
                os.rmdir(folder)  # only when empty: another rank of this node may still be here
            except OSError:
                return

    # --------------------------------------------------------------------------------------- read

    def restore(self, durable_step: int | None) -> tuple[Loaded | None, list[State]]:
        """The pieces of the newest step every rank has verified, when it is newer than `durable_step`
        (the newest committed durable checkpoint); else None, with why the local tier did not serve.
        Must be called on all ranks (the tier being on is config: every rank sees the same)."""
        if not self.on:
            return None, []
        # Not gated on the restart count: a replacement node's torchrun counts no restart while the
        # others do, and every rank must reach the all-gather.
        found = Found(None, "a first attempt cleared its folder") if self.first_attempt else self._newest()
        newest = found.loaded.step if found.loaded is not None else None
        reports = dist.all_gather_objects((newest, found.problem, socket.gethostname(), self.first_attempt))
        step, notes = _agree(reports, durable_step)
        if step is None:
            return None, notes
        loaded, problem = found.loaded, None
        if loaded is None or loaded.step != step:  # another rank's newest is older: use this one's too
            loaded, problem = self._read(step)
        problems = dist.all_gather_objects(problem)
        bad = next(((r, p) for r, p in enumerate(problems) if p is not None), None)
        if bad is not None:
            return None, [_note(step, f"rank {bad[0]} ({reports[bad[0]][2]}): {bad[1]}")]
        self.last_step = step
        return loaded, []

    def _newest(self) -> Found:
        """This rank's newest piece that verifies (each newer one that does not is logged)."""
        problems = []
        for step in self.steps():
            loaded, problem = self._read(step)
            if loaded is not None:
                return Found(loaded, None)
            log.warning("local checkpoint step %d skipped: %s", step, problem)
            problems.append(f"step {step}: {problem}")
        return Found(None, "; ".join(problems) or f"none in {self.dir}")

    def _read(self, step: int) -> tuple[Loaded | None, str | None]:
        """This rank's piece of `step`, every file verified before it is parsed or unpickled."""
        path = self._path(step)
        if not is_committed(path):
            return None, f"no local copy of step {step} in {self.dir}"
        try:
            m, app, ranks = read_dir(path)
        except CheckpointError as err:
            return None, str(err)
        if int(m["world_size"]) != dist.world_size() or m.get("rank") != dist.rank() or len(ranks) != 1:
            return None, f"{path} is rank {m.get('rank')}'s of {m['world_size']}: the world size changed"
        if m.get("strategy", "ddp") != self.strategy:
            return None, f"{path} was written under trainer.strategy={m.get('strategy', 'ddp')}"
        return Loaded(path, m, app, ranks[0], tier=TIER), None


def _agree(reports: list[Any], durable_step: int | None) -> tuple[int | None, list[State]]:
    """From every rank's (newest verified step or None, why not, host, first attempt): the step all
    ranks can restore when it beats the durable tier, else None and why (nothing when nothing was
    lost: a fresh start, or a durable checkpoint at least as new as any rank's piece)."""
    present = [int(r[0]) for r in reports if r[0] is not None]
    beaten = bool(present) and durable_step is not None and durable_step >= max(present)
    if beaten or all(r[3] for r in reports):
        return None, []
    for rank, (step, why, host, _) in enumerate(reports):
        if step is None:
            return None, [_note(None, f"rank {rank} ({host}) has no verified local copy: {why}")]
    step = min(present)
    return (step, []) if durable_step is None or step > durable_step else (None, [])


def _note(step: int | None, reason: str) -> State:
    return {"tier": TIER, "step": step, "reason": reason}
