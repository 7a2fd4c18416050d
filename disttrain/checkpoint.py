"""Checkpoints (DESIGN.md section 4): what is saved, the publish protocol, retention, verify, discovery.

`RUN_DIR/checkpoints/step_%08d/` holds model.safetensors (rank 0's weights), state.pt (optimizer,
scheduler, scaler, trainer, hooks), ranks.pt (each rank's RNG states and data cursor) and, written last,
manifest.json (step, time, world size, config hash, versions, size and sha256 of every file). A directory
without a manifest does not exist for readers. `.pt` files are unpickled only after their bytes matched
the manifest, and only with `torch.load(weights_only=True)`: a replaced file is refused twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import platform
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from disttrain import __version__, dist, fs
from disttrain import ckpt_format as fmt
from disttrain.ckpt_format import FILES, CheckpointError, read_checkpoint, read_manifest
from disttrain.config import CheckpointConfig
from disttrain.interval import for_run
from disttrain.rundir import LATEST, MANIFEST, RunDir, step_of
from disttrain.save_deadline import MARGIN_S, SaveDeadline

log = logging.getLogger(__name__)
State = dict[str, Any]
Make = Callable[[], State]

# What torch.load(weights_only=True) accepts besides tensors and containers. Anything else is refused
# at save time, so a checkpoint that saved is one that loads.
__all__ = [
    "FILES", "CheckpointError", "CheckpointInfo", "CheckpointManager", "Loaded", "SaveResult", "capture_rank_state",
    "read_checkpoint", "read_manifest", "restore_rank_state",
]  # fmt: skip
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


@dataclass(frozen=True)
class SaveResult:
    """What a save did, for the one place that records it (the trainer's `checkpoint` event)."""

    step: int
    seconds: float  # how long the caller was blocked
    bytes: int | None  # None while an async write is still in flight
    reason: str  # periodic | final | stop | manual
    interval: dict[str, Any] | None = None  # checkpoint.interval=auto: the interval in force and why

    def fields(self) -> dict[str, Any]:
        out = {"step": self.step, "seconds": round(self.seconds, 4), "reason": self.reason}
        out = out if self.bytes is None else {**out, "bytes": self.bytes}
        return out if self.interval is None else {**out, "interval": self.interval}


@dataclass(frozen=True)
class Loaded:
    """A checkpoint read and verified: where, its manifest, the shared state and this rank's."""

    path: str
    manifest: State
    app: State
    rank_state: State | None

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


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


def capture_rank_state() -> State:
    """This rank's RNG states (torch, CUDA, numpy, python) as data weights_only loading accepts."""
    name, keys, pos, has_gauss, gauss = cast(tuple, np.random.get_state(legacy=True))
    version, internal, gauss_next = random.getstate()
    state: State = {
        "torch": torch.get_rng_state(),
        "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": (version, list(internal), gauss_next),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rank_state(state: State) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda is not None:
        log.warning("checkpoint holds CUDA RNG states of %d device(s); not restored here", len(cuda))


class CheckpointManager:
    """Saves, lists, verifies and loads the checkpoints under RUN_DIR/checkpoints."""

    def __init__(
        self,
        run_dir: str,
        cfg: CheckpointConfig,
        *,
        config_hash: str = "",
        fingerprint: State | None = None,
        versions: dict[str, str] | None = None,
    ) -> None:
        self.run_dir = run_dir[len("file://") :] if run_dir.startswith("file://") else run_dir
        self.layout = RunDir(self.run_dir)
        self.dir = self.layout.checkpoints
        self.cfg = cfg
        own = {"torch": torch.__version__, "disttrain": __version__, "python": platform.python_version()}
        # num_threads: CPU float results depend on the intra-op thread count, so a resume can tell
        # whether it is still bit-exact (run.apply_threads sets it before anything runs).
        self._meta: State = {"config_hash": config_hash, "fingerprint": fingerprint or {}}
        self._meta["versions"] = {**own, **(versions or {})}
        self._meta["num_threads"] = torch.get_num_threads()
        self._pending: SaveDeadline | None = None  # rank 0's async write in flight
        self._group: Any = None  # the group save waits run on (save_timeout_s, not collective_timeout_s)
        self._error: Exception | None = None
        self._last_time = time.monotonic()
        self.last_step: int | None = None  # the step this process last saved (or loaded)
        self._bytes: int | None = None  # bytes of the last save this process committed
        self.auto = for_run(self.layout, cfg)  # None unless checkpoint.interval=auto

    def maybe_save(self, step: int, app_state: Make, rank_state: Make, *, final: bool = False) -> SaveResult | None:
        """Save if due (every_steps, every_minutes, or final). Must be called on all ranks every step."""
        if final and (self.last_step == step or not self.cfg.save_final):
            self.wait()  # nothing new to save, but what is in flight must be committed before the end
            return None
        if not (final or self._due(step)):
            self.check()
            return None
        reason = "final" if final else "periodic"
        return self.save(step, app_state(), rank_state(), sync=final, reason=reason)

    def _due(self, step: int) -> bool:
        if self.auto is not None:
            return self.auto.due(step)
        by_steps = self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0
        if by_steps or self.cfg.every_minutes <= 0:
            return by_steps  # every rank sees the same step: deciding needs no collective
        # Clocks differ between hosts, so rank 0's decides and one all-reduce tells every rank.
        late = dist.is_main() and time.monotonic() - self._last_time >= self.cfg.every_minutes * 60
        return dist.any_flag(late)

    def save(
        self, step: int, app_state: State, rank_state: State, *, sync: bool = False, reason: str = "manual"
    ) -> SaveResult:
        """Must be called on all ranks. Blocks for the host copy; writes in the background when
        `checkpoint.async_save` is on and not `sync`. `app_state` matters on rank 0 only."""
        t0 = time.perf_counter()
        background = self.cfg.async_save and not sync
        if self._group is None:  # the waits below may outlast collective_timeout_s (save_deadline)
            self._group = dist.side_group(self.cfg.save_timeout_s + MARGIN_S)
        # A synchronous save writes before training moves on, so CPU tensors need no snapshot; an async
        # one must copy, since the next step changes them while the write is in progress.

        def prepare() -> tuple[Any, Any]:
            self._join()  # one save in flight: a new one waits for the previous (at most save_timeout_s)
            self.check()  # a failed background save fails this save on every rank, not only on rank 0
            mine = _host_copy(rank_state, "rank_state", background)
            return (_host_copy(app_state, "app_state", background) if dist.is_main() else None), mine

        host, mine = _agreed(prepare, self._group)
        ranks = dist.gather_to_main(mine)
        self.last_step, self._last_time, self._bytes = step, time.monotonic(), None
        deadline = SaveDeadline(self.cfg.save_timeout_s, f"saving checkpoint step {step}")
        if not background:

            def write() -> None:  # rank 0 writes within the deadline; the others wait for its verdict
                if dist.is_main():
                    deadline.run(lambda: self._write(step, host, ranks or [], deadline), self._intact)

            _agreed(write, self._group)
            self._last_time = time.monotonic()  # every_minutes counts training time, not time saving
        elif dist.is_main():
            self._pending = deadline
            deadline.watch(lambda: self._background(step, host, ranks or [], deadline))
        seconds = time.perf_counter() - t0
        if self.auto is None:
            return SaveResult(step, seconds, self._bytes, reason)
        self.auto.saved(seconds)
        current = self.auto.current.fields() if self.auto.current else None
        return SaveResult(step, seconds, self._bytes, reason, current)

    def check(self) -> None:
        """Raise the failure of a background save, if one failed (rank 0). No collective, no I/O."""
        err, self._error = self._error, None
        if err is not None:
            raise err

    def wait(self) -> None:
        """Block until no save is in flight; raise its failure."""
        self._join()
        self.check()

    def _join(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.wait(self._intact)

    def _background(self, step: int, host: State, ranks: list[Any], deadline: SaveDeadline) -> None:
        try:
            self._write(step, host, ranks, deadline)
        except Exception as err:  # kept and raised at the next step: a background failure is never lost
            self._error = err if isinstance(err, CheckpointError) else CheckpointError(f"step {step}: {err}")

    def _write(self, step: int, host: State, ranks: list[Any], deadline: SaveDeadline | None = None) -> None:
        """Rank 0: write the files, the manifest last, then `latest`, then apply retention. The commit
        (manifest, `latest`, retention) happens only if the save's deadline has not given up on it."""
        commit = deadline.commit if deadline is not None else contextlib.nullcontext
        final = self._path(step)
        # Local disks: a temporary directory renamed into place. Object stores: in place, manifest last.
        work = f"{final}.tmp-{secrets.token_hex(4)}" if fs.is_local(final) else final
        try:
            self._clean_stale()
            if work == final:
                fs.remove(fs.join(final, MANIFEST))  # re-saving a step in place: unpublish it first
            files = fmt.write_files(work, host, ranks)
            with commit():
                fmt.publish(work, final, fmt.manifest(step, len(ranks), files, self._meta))
            self._bytes = sum(f["bytes"] for f in files.values())
        except Exception as err:
            fs.remove(work, recursive=True)
            msg = f"writing checkpoint step {step} to {self.dir} failed: {err}; {self._intact()}"
            raise CheckpointError(msg) from err
        try:
            with commit():
                fs.atomic_write(fs.join(self.dir, LATEST), fs.basename(final))
                self._retain(step)
        except Exception as err:
            raise CheckpointError(f"checkpoint step {step} is committed, but then failed: {err}") from err

    def _intact(self) -> str:
        older = self.list()
        return f"previous checkpoint step {older[0].step} is intact" if older else "there is no earlier one"

    def _clean_stale(self) -> None:
        """Remove what a killed save or deletion left: `*.tmp-*` dirs, step dirs without a manifest."""
        committed = set(self.layout.committed_steps())
        for name in fs.listdir(self.dir):
            if name.startswith("step_") and step_of(name) not in committed:
                fs.remove(fs.join(self.dir, name), recursive=True)

    def _retain(self, saved: int) -> None:
        """Keep keep_last newest, keep_every milestones, the one just saved and the newest verified."""
        infos = self.list()
        keep = {i.step for i in infos[: self.cfg.keep_last]} | {saved, self._newest_verified(infos, saved)}
        if self.cfg.keep_every:
            keep |= {i.step for i in infos if i.step % self.cfg.keep_every == 0}
        for info in infos:
            if info.step not in keep:
                fs.remove(fs.join(info.path, MANIFEST))  # first: a half-deleted dir is never "committed"
                fs.remove(info.path, recursive=True)

    def _newest_verified(self, infos: list[CheckpointInfo], saved: int) -> int:
        for info in infos:  # newest first; ones newer than `saved` exist only after a fallback
            if info.step <= saved:
                return saved  # hashed as it was written
            if fmt.problem(info.path, full=True) is None:
                return info.step
        return saved

    def list(self, full: bool = False) -> list[CheckpointInfo]:
        """Committed checkpoints, newest first, checked by file size (or by sha256 with `full`)."""
        infos = [self._info(step, full) for step in self.layout.committed_steps()]
        return [i for i in infos if i is not None]

    def _info(self, step: int, full: bool) -> CheckpointInfo | None:
        path = self._path(step)
        try:
            m = fmt.read_manifest(path)
        except CheckpointError as err:
            if not fs.exists(fs.join(path, MANIFEST)):
                return None  # deleted since it was listed: does not exist for readers
            return CheckpointInfo(step, path, 0.0, 0, False, str(err), 0)
        problem = fmt.files_problem(path, m, full)
        size = sum(f["bytes"] for f in m["files"].values())
        return CheckpointInfo(step, path, m["time"], size, problem is None, problem, m["world_size"])

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

    def load_newest(self) -> Loaded | None:
        """Load the newest checkpoint whose files verify, falling back to older ones with a warning; None
        if there is none. Must be called on all ranks.

        Each file is hashed once, as it is read for loading; latest_verified() followed by load() reads
        and hashes the whole checkpoint twice (a third of a resume's time, bench/RESULTS.md section 4)."""
        infos = _from_main(self.list)  # newest first; sizes checked, contents not yet
        for info in infos:
            try:
                if info.problem is not None:
                    raise CheckpointError(info.problem)
                loaded = self.read(info.path)
            except CheckpointError as err:  # raised on every rank alike (read agrees), so all fall back
                log.warning("skipping checkpoint step %d: %s; falling back to an older one", info.step, err)
                continue
            self.last_step = info.step  # saving this step again would write what is already there
            return loaded
        return None

    def saved_fingerprint(self, info: CheckpointInfo | str) -> State:
        """The resume fingerprint recorded in a checkpoint's manifest."""
        path = info.path if isinstance(info, CheckpointInfo) else info
        return dict(fmt.read_manifest(path).get("fingerprint") or {})

    def read(self, path_or_step: str | int | None = None) -> Loaded:
        """Read and verify a checkpoint. Must be called on all ranks.

        None: the newest verified checkpoint; an int: that step; a str: a checkpoint directory (or a run
        dir, meaning its newest verified checkpoint). Tensors load to CPU. `rank_state` is None when the
        world size changed (no per-rank stream to continue)."""
        path = _from_main(lambda: self._resolve(path_or_step))
        if self.cfg.load_mode == "broadcast":  # one reader, for storage that suffers under many
            m, app, ranks = _from_main(lambda: (fmt.read_manifest(path), *fmt.read_checkpoint(path)))
        else:
            m, app, ranks = _agreed(lambda: (fmt.read_manifest(path), *fmt.read_checkpoint(path)))
        mine = ranks[dist.rank()] if len(ranks) == dist.world_size() else None
        return Loaded(path, m, app, mine)

    def load(self, path_or_step: str | int | None = None) -> tuple[State, State | None]:
        """(app_state, this rank's rank_state or None) of `read(path_or_step)`. Must be called on all ranks."""
        loaded = self.read(path_or_step)
        return loaded.app, loaded.rank_state

    def export(self, out: str, step: int | None = None) -> int:
        """Write the model weights alone (a verified safetensors file) to `out`; returns the step."""
        path = self._resolve(step)
        m = fmt.read_manifest(path)
        fs.atomic_write(out, fmt.read_verified(path, "model.safetensors", m))
        return int(m["step"])

    def _resolve(self, path_or_step: str | int | None) -> str:
        if isinstance(path_or_step, int):
            return self._path(path_or_step)
        if path_or_step is not None:
            path = path_or_step.rstrip("/")
            if fs.exists(fs.join(path, MANIFEST)) or not fs.exists(RunDir(path).checkpoints):
                return path
            return CheckpointManager(path, self.cfg)._resolve(None)  # a run dir: its newest checkpoint
        info = self.latest_verified()
        if info is None:
            raise CheckpointError(f"no verified checkpoint under {self.dir}")
        return info.path

    def _path(self, step: int) -> str:
        return self.layout.step_dir(step)


def _agreed(fn: Callable[[], Any], group: Any = None) -> Any:
    """Run fn on every rank; if it raised CheckpointError on any rank, raise on all. All ranks (of
    `group`, default the process group; a save's waits run on its own, bounded by save_timeout_s)."""
    out, err = None, None
    try:
        out = fn()
    except CheckpointError as caught:
        err = caught
    if dist.any_flag(err is not None, group):
        raise err or CheckpointError("checkpoint operation failed on another rank; see rank 0's log")
    return out


def _from_main(fn: Callable[[], Any]) -> Any:
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


def _host_copy(obj: Any, where: str, snapshot: bool = True) -> Any:
    """The tensors of nested plain data on the CPU (copied when `snapshot`, or when they live on a GPU);
    refuses what weights_only loading would refuse."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=snapshot)
    if isinstance(obj, dict):
        return {k: _host_copy(v, f"{where}[{k!r}]", snapshot) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_host_copy(v, f"{where}[{i}]", snapshot) for i, v in enumerate(obj))
    if isinstance(obj, _PLAIN) and type(obj).__module__ in ("builtins", "torch"):
        return obj
    raise CheckpointError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: checkpoints hold only tensors and "
        "plain data (dict, list, tuple, str, int, float, bool, None); convert it in state_dict()"
    )
