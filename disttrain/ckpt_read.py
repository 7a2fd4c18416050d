"""The reading side of checkpoints (DESIGN.md section 4, points 6-7): discovery of committed checkpoints,
verification against the manifest, loading the newest one that verifies (falling back with a warning),
export of the weights. Nothing is unpickled before its bytes matched the manifest (ckpt_format).
`CheckpointManager` (checkpoint.py) adds saving, publishing and retention on top.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import safetensors.torch

from disttrain import ckpt_format as fmt
from disttrain import ckpt_sharded, dist, fs, manifest
from disttrain.config import CheckpointConfig
from disttrain.errors import CheckpointError
from disttrain.rundir import MANIFEST, RunDir

log = logging.getLogger("disttrain.checkpoint")
State = dict[str, Any]


@dataclass(frozen=True)
class Loaded:
    """A checkpoint read and verified: where, its manifest, the shared state and this rank's."""

    path: str
    manifest: State
    app: State
    rank_state: State | None
    tier: str = "durable"  # local: this rank's own copy in checkpoint.local.dir (local_tier)
    # Why a faster tier did not serve: [{"tier", "step", "reason"}], recorded with the resume.
    fallbacks: tuple[State, ...] = ()

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def sharded(self) -> bool:
        return int(self.manifest.get("format", 1)) >= ckpt_sharded.FORMAT

    def saved(self, names: list[str] | None) -> ckpt_sharded.SavedState:
        """Rows of any saved tensor by name (for loading into another layout or strategy)."""
        return ckpt_sharded.SavedState(self.path, self.manifest, self.app, names)


@dataclass
class CheckpointInfo:
    """One committed checkpoint, as `list()` sees it."""

    step: int
    path: str
    time: float
    bytes: int
    verified: bool
    problem: str | None
    world_size: int
    strategy: str = "ddp"  # "fsdp": one shard file per rank of world_size


class CheckpointReader:
    """Lists, verifies, reads and exports the checkpoints under RUN_DIR/checkpoints."""

    def __init__(self, run_dir: str, cfg: CheckpointConfig) -> None:
        self.run_dir = run_dir[len("file://") :] if run_dir.startswith("file://") else run_dir
        self.layout = RunDir(self.run_dir)
        self.dir = self.layout.checkpoints
        self.cfg = cfg
        self.last_step: int | None = None  # the step this process last saved (or loaded)

    def list(self, full: bool = False) -> list[CheckpointInfo]:
        """Committed checkpoints, newest first, checked by file size (or by sha256 with `full`)."""
        infos = [self._info(step, full) for step in self.layout.committed_steps()]
        return [i for i in infos if i is not None]

    def _info(self, step: int, full: bool) -> CheckpointInfo | None:
        path = self._path(step)
        try:
            m = manifest.read(path)
        except CheckpointError as err:
            if not fs.exists(fs.join(path, MANIFEST)):
                return None  # deleted since it was listed: does not exist for readers
            return CheckpointInfo(step, path, 0.0, 0, False, str(err), 0)
        problem = fmt.files_problem(path, m, full)
        size = sum(f["bytes"] for f in m["files"].values())
        strategy = str(m.get("strategy", "ddp"))
        return CheckpointInfo(
            step, path, m["time"], size, problem is None, problem, m["world_size"], strategy
        )

    def verify(self, step: int | str) -> str | None:
        """None if every file matches the manifest (size and sha256), else what is wrong and where."""
        return fmt.problem(self._path(step) if isinstance(step, int) else step, full=True)

    def latest_verified(self) -> CheckpointInfo | None:
        """The newest checkpoint that fully verifies; each newer one skipped is logged as a warning."""
        for info in self.list():
            problem = info.problem or fmt.problem(info.path, full=True)
            if problem is None:
                return dataclasses.replace(info, verified=True)
            log.warning("skipping checkpoint step %d: %s; falling back to an older one", info.step, problem)
        return None

    def load_newest(self, apply: Callable[[Loaded], None] | None = None) -> Loaded | None:
        """Load the newest checkpoint whose files verify, falling back to older ones with a warning; None
        if there is none. `apply(loaded)` (on every rank) puts it into the live model: a shard file that
        fails verification there falls back too. Must be called on all ranks.

        Each file is hashed once, as it is read for loading; latest_verified() followed by load() reads
        and hashes the whole checkpoint twice (a third of a resume's time, bench/RESULTS.md section 4)."""
        infos = from_main(self.list)  # newest first; sizes checked, contents not yet
        for info in infos:
            try:
                if info.problem is not None:
                    raise CheckpointError(info.problem)
                loaded = self.read(info.path)
                if apply is not None:
                    agreed(lambda: apply(loaded))  # noqa: B023 - called at once
            except CheckpointError as err:  # raised on every rank alike (read agrees), so all fall back
                log.warning("skipping checkpoint step %d: %s; falling back to an older one", info.step, err)
                continue
            self.last_step = info.step  # saving this step again would write what is already there
            return loaded
        return None

    def saved_fingerprint(self, info: CheckpointInfo | str) -> State:
        """The resume fingerprint recorded in a checkpoint's manifest."""
        path = info.path if isinstance(info, CheckpointInfo) else info
        return manifest.fingerprint(manifest.read(path))

    def read(self, path_or_step: str | int | None = None) -> Loaded:
        """Read and verify a checkpoint. Must be called on all ranks.

        None: the newest verified checkpoint; an int: that step; a str: a checkpoint directory (or a run
        dir, meaning its newest verified checkpoint). Tensors load to CPU. `rank_state` is None when the
        world size changed (no per-rank stream to continue)."""
        path = from_main(lambda: self._resolve(path_or_step))
        if self.cfg.load_mode == "broadcast":  # one reader, for storage that suffers under many
            m, app, ranks = from_main(lambda: read_dir(path))
        else:
            m, app, ranks = agreed(lambda: read_dir(path))
        mine = ranks[dist.rank()] if len(ranks) == dist.world_size() else None
        return Loaded(path, m, app, mine)

    def load(self, path_or_step: str | int | None = None) -> tuple[State, State | None]:
        """(app_state, this rank's rank_state or None) of `read(path_or_step)`. Must be called on all ranks."""
        loaded = self.read(path_or_step)
        return loaded.app, loaded.rank_state

    def export(self, out: str, step: int | None = None) -> int:
        """Write the model weights alone (a verified safetensors file) to `out`; returns the step."""
        path = self._resolve(step)
        m = manifest.read(path)
        if int(m.get("format", 1)) >= ckpt_sharded.FORMAT:  # shards of any world size, put together
            tensors = ckpt_sharded.consolidate(path, m)
            fs.atomic_write(out, bytes(safetensors.torch.save(fmt.own_storage(tensors))))
        else:
            fs.atomic_write(out, fmt.read_verified(path, "model.safetensors", m))
        return int(m["step"])

    def read_weights(self, step: int | None = None) -> tuple[int, State]:
        """(step, the model's tensors) of a checkpoint (the newest verified by default), verified first."""
        path = self._resolve(step)
        m = manifest.read(path)
        if int(m.get("format", 1)) >= ckpt_sharded.FORMAT:  # shards of any world size, put together
            return int(m["step"]), ckpt_sharded.consolidate(path, m)
        return int(m["step"]), fmt.parse_weights(path, fmt.read_verified(path, "model.safetensors", m))

    def _resolve(self, path_or_step: str | int | None) -> str:
        if isinstance(path_or_step, int):
            return self._path(path_or_step)
        if path_or_step is not None:
            path = path_or_step.rstrip("/")
            if fs.exists(fs.join(path, MANIFEST)) or not fs.exists(RunDir(path).checkpoints):
                return path
            return CheckpointReader(path, self.cfg)._resolve(None)  # a run dir: its newest checkpoint
        info = self.latest_verified()
        if info is None:
            raise CheckpointError(f"no verified checkpoint under {self.dir}")
        return info.path

    def _path(self, step: int) -> str:
        return self.layout.step_dir(step)


def read_dir(path: str) -> tuple[State, State, list[Any]]:
    """(manifest, shared state, per-rank states) of either format, every file verified before use.
    Shard files of a sharded checkpoint are read later, by the rank that needs their rows."""
    m = manifest.read(path)
    if int(m.get("format", 1)) >= ckpt_sharded.FORMAT:
        return m, fmt.read_state(path, m), fmt.read_ranks(path, m)
    return (m, *fmt.read_checkpoint(path))


def agreed(fn: Callable[[], Any]) -> Any:
    """Run fn on every rank; if it raised CheckpointError on any rank, raise on all. All ranks."""
    out, err = None, None
    try:
        out = fn()
    except CheckpointError as caught:
        err = caught
    if dist.any_flag(err is not None):
        raise err or CheckpointError("checkpoint operation failed on another rank; see rank 0's log")
    return out


def from_main(fn: Callable[[], Any]) -> Any:
    """Rank 0 runs fn; every rank gets its result or raises its CheckpointError. All ranks."""
    out, err = None, None
    if dist.is_main():
        try:
            out = fn()
        except CheckpointError as caught:
            err = str(caught)
    out, err = dist.broadcast_from_main((out, err))
    if err is not None:
        raise CheckpointError(err)
    return out


_read = read_dir  # the name tests/multiproc/test_fsdp.py (and other branches) import
