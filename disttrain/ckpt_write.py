"""Writing checkpoints (DESIGN.md section 4): the publish protocol, async saves and retention, in
`CheckpointManager`; reading them (discovery, verification, load with fallback, export) is
ckpt_read.CheckpointReader, which it extends. What a run puts into a checkpoint, and when, is
`checkpoint.Checkpointing`'s.

`RUN_DIR/checkpoints/step_%08d/` holds model.safetensors (rank 0's weights), state.pt (optimizer,
scheduler, scaler, trainer, hooks), ranks.pt (each rank's RNG states and data cursor) and, written last,
manifest.json (step, time, world size, config hash, versions, size and sha256 of every file). A directory
without a manifest does not exist for readers. `.pt` files are unpickled only after their bytes matched
the manifest, and only with `torch.load(weights_only=True)`: a replaced file is refused twice.
"""

from __future__ import annotations

import logging
import platform
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from disttrain import __version__, ckpt_sharded, dist, fs
from disttrain import ckpt_format as fmt
from disttrain.ckpt_read import CheckpointInfo, CheckpointReader, agreed, from_main
from disttrain.config import CheckpointConfig
from disttrain.errors import CheckpointError
from disttrain.interval import for_run
from disttrain.manifest import build as build_manifest
from disttrain.rundir import LATEST, MANIFEST, step_of

log = logging.getLogger(__name__)
State = dict[str, Any]
Make = Callable[[], State]
Shards = tuple[dict[str, torch.Tensor], State]  # this rank's rows of sharded tensors, and their layout


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


class CheckpointManager(CheckpointReader):
    """Saves (the publish protocol), and retention; listing, verifying and loading are CheckpointReader's."""

    def __init__(
        self,
        run_dir: str,
        cfg: CheckpointConfig,
        *,
        config_hash: str = "",
        fingerprint: State | None = None,
        versions: dict[str, str] | None = None,
    ) -> None:
        super().__init__(run_dir, cfg)
        own = {"torch": torch.__version__, "disttrain": __version__, "python": platform.python_version()}
        # num_threads: CPU float results depend on the intra-op thread count, so a resume can tell
        # whether it is still bit-exact (run.apply_threads sets it before anything runs).
        self._meta: State = {"config_hash": config_hash, "fingerprint": fingerprint or {}}
        self._meta["versions"] = {**own, **(versions or {})}
        self._meta["num_threads"] = torch.get_num_threads()
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None
        self._last_time = time.monotonic()
        self._bytes: int | None = None  # bytes of the last save this process committed
        self._group: Any = None  # a gloo group for async sharded saves, made at the first one
        self.auto = for_run(self.layout, cfg)  # None unless checkpoint.interval=auto

    @property
    def meta(self) -> State:
        """What every manifest of this run records besides its files (the local tier's too)."""
        return dict(self._meta)

    def maybe_save(
        self,
        step: int,
        app_state: Make,
        rank_state: Make,
        *,
        final: bool = False,
        shards: Callable[[], Shards | None] | None = None,
    ) -> SaveResult | None:
        """Save if due (every_steps, every_minutes, or final). Must be called on all ranks every step."""
        if final and (self.last_step == step or not self.cfg.save_final):
            self.wait()  # nothing new to save, but what is in flight must be committed before the end
            return None
        if not (final or self._due(step)):
            self.check()
            return None
        reason = "final" if final else "periodic"
        rows = shards() if shards is not None else None
        return self.save(step, app_state(), rank_state(), sync=final, reason=reason, shards=rows)

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
        self,
        step: int,
        app_state: State,
        rank_state: State,
        *,
        sync: bool = False,
        reason: str = "manual",
        shards: Shards | None = None,
    ) -> SaveResult:
        """Must be called on all ranks. Blocks for the host copy; writes in the background when
        `checkpoint.async_save` is on and not `sync`. `app_state` matters on rank 0 only. `shards`:
        this rank's rows of a sharded model and their layout (ckpt_sharded.split_state); then every
        rank writes its own shard file and rank 0 commits."""
        t0 = time.perf_counter()
        self._join()  # one save in flight: a new one waits for the previous
        background = self.cfg.async_save and not sync
        # A synchronous save writes before training moves on, so CPU tensors need no snapshot; an async
        # one must copy, since the next step changes them while the write is in progress.

        def prepare() -> tuple[Any, Any, Any]:
            self.check()  # a failed background save fails this save on every rank, not only on rank 0
            mine = fmt.host_copy(rank_state, "rank_state", background)
            rows = fmt.host_copy(shards[0], "shards", background) if shards is not None else None
            return (fmt.host_copy(app_state, "app_state", background) if dist.is_main() else None), mine, rows

        host, mine, rows = agreed(prepare)
        self.last_step, self._last_time, self._bytes = step, time.monotonic(), None
        if shards is not None:
            self._save_sharded(step, host, mine, (rows, shards[1]), background)
        elif not background:
            ranks = dist.gather_to_main(mine)
            agreed(lambda: self._write(step, host, ranks or []) if dist.is_main() else None)
        else:
            ranks = dist.gather_to_main(mine)
            if dist.is_main():
                self._start_background(self._write, step, host, ranks)
        if not background:
            self._last_time = time.monotonic()  # every_minutes counts training time, not time saving
        seconds = time.perf_counter() - t0
        if self.auto is None:
            return SaveResult(step, seconds, self._bytes, reason)
        self.auto.saved(seconds)
        current = self.auto.current.fields() if self.auto.current else None
        return SaveResult(step, seconds, self._bytes, reason, current)

    def _start_background(self, fn: Callable[..., None], step: int, *args: Any) -> None:
        # A daemon thread: after a failure (a peer died or froze) it may be blocked in a collective on
        # the save group, and the interpreter's exit must not wait for that. A save cut short at exit is
        # what a kill -9 leaves: no manifest, so no checkpoint; the next save cleans it up. A run that
        # ends normally waits for it first (`wait`, from fit).
        self._thread = threading.Thread(
            target=self._background, args=(fn, step, *args), name="disttrain-save", daemon=True
        )
        self._thread.start()

    def _save_sharded(self, step: int, host: Any, mine: State, shards: Shards, background: bool) -> None:
        """Every rank writes its shard into one work dir that rank 0 named; rank 0 commits."""
        work = from_main(lambda: self._work_dir(step))
        if not background:
            agreed(lambda: self._write_sharded(step, work, host, mine, shards, None))
            return
        if self._group is None:  # collectives from the save thread must not share the loop's group
            self._group = dist.new_gloo_group()
        self._start_background(self._write_sharded, step, work, host, mine, shards, self._group)

    def _write_sharded(
        self, step: int, work: str, host: Any, mine: State, shards: Shards, group: Any
    ) -> None:
        """All ranks (of `group`): write and hash this rank's shard, then rank 0 publishes the rest and
        the manifest; every rank learns the verdict, so a failure anywhere fails the save everywhere."""
        rows, layout = shards
        try:
            fs.makedirs(work)
            report: Any = (*ckpt_sharded.write_shard(work, dist.rank(), rows), layout, mine, None)
        except Exception as err:  # the verdict carries the cause's first line; this rank logs it whole
            log.error("rank %d: writing its shard of checkpoint step %d failed: %s", dist.rank(), step, err)
            report = (None, None, layout, mine, f"rank {dist.rank()}: {fs.first_line(err)}")
        reports = dist.all_gather_objects(report, group)
        errors = [r[4] for r in reports if r[4]]
        if dist.is_main() and not errors:
            try:
                self._commit_sharded(step, work, host, reports)
            except Exception as err:
                errors.append(str(err))
        errors = dist.all_gather_objects(errors, group)[0]  # rank 0's verdict, on every rank
        if errors:
            if dist.is_main():
                fs.remove(work, recursive=True)
            raise CheckpointError(
                f"writing checkpoint step {step} to {self.dir} failed: {errors[0]}; {self._intact()}"
            )

    def _commit_sharded(self, step: int, work: str, host: State, reports: list[Any]) -> None:
        files = fmt.write_files(work, host, [r[3] for r in reports], model=False)
        files.update({r[0]: r[1] for r in reports})
        layout = ckpt_sharded.merge_layouts([r[2] for r in reports])
        meta = {**self._meta, "format": ckpt_sharded.FORMAT, "strategy": "fsdp", "layout": layout}
        self._publish(step, work, build_manifest(step, len(reports), files, meta))

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
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _background(self, fn: Callable[..., None], step: int, *args: Any) -> None:
        try:
            fn(step, *args)
        except Exception as err:  # kept and raised at the next step: a background failure is never lost
            if not isinstance(err, CheckpointError):
                log.error("checkpoint step %d failed in the background: %s", step, err)  # the whole text
                err = CheckpointError(f"step {step}: {fs.first_line(err)}")
            self._error = err

    def _work_dir(self, step: int) -> str:
        """Rank 0: where a save of `step` writes before it is committed (stale leftovers removed first).
        Local disks: a temporary directory renamed into place. Object stores: in place, manifest last."""
        self._clean_stale()
        final = self._path(step)
        if not fs.is_local(final):
            fs.remove(fs.join(final, MANIFEST))  # re-saving a step in place: unpublish it first
            return final
        return f"{final}.tmp-{secrets.token_hex(4)}"

    def _write(self, step: int, host: State, ranks: list[Any]) -> None:
        """Rank 0: write the files, the manifest last, then `latest`, then apply retention."""
        work = None
        try:
            work = self._work_dir(step)
            files = fmt.write_files(work, host, ranks)
        except Exception as err:
            if work is not None:
                fs.remove(work, recursive=True)
            msg = f"writing checkpoint step {step} to {self.dir} failed: {err}; {self._intact()}"
            raise CheckpointError(msg) from err
        self._publish(step, work, build_manifest(step, len(ranks), files, self._meta))

    def _publish(self, step: int, work: str, manifest: State) -> None:
        """Rank 0: the manifest (the commit), then `latest`, then retention."""
        final = self._path(step)
        try:
            fmt.publish(work, final, manifest)
            self._bytes = sum(f["bytes"] for f in manifest["files"].values())
        except Exception as err:
            fs.remove(work, recursive=True)
            msg = f"writing checkpoint step {step} to {self.dir} failed: {err}; {self._intact()}"
            raise CheckpointError(msg) from err
        try:
            fs.atomic_write(fs.join(self.dir, LATEST), fs.basename(final))
            self._retain(step)
        except Exception as err:
            raise CheckpointError(f"checkpoint step {step} is committed, but then failed: {err}") from err

    def _intact(self) -> str:
        older = self.list()
        return f"previous checkpoint step {older[0].step} is intact" if older else "there is no earlier one"

    def _clean_stale(self) -> None:
        """Remove what a killed save or deletion left: `*.tmp-*` dirs, step dirs without a manifest, a
        `latest` being replaced; and stray `step_*` symlinks (the link only: a save of that step would
        fail on it)."""
        committed = set(self.layout.committed_steps())
        for name in fs.listdir(self.dir):
            leftover = name.startswith(f".{LATEST}.") and name.endswith(".tmp")
            if leftover or (name.startswith("step_") and step_of(name) not in committed):
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
