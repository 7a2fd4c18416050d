"""A run's checkpoints (DESIGN.md sections 4 and 6): what goes in, when, what is recorded, and what a
start loads back.

A checkpoint holds the strategy's model state (`parallel.Strategy.model_state`: replicated, or each
rank's rows) and every registered stateful part (`state.StateRegistry`: schedule, progress, data
cursor, guard, hooks; per rank: RNG, log window, a stream's position). `Checkpointing` puts them
together and hands them to the `CheckpointManager` (ckpt_write: the publish protocol, async saves,
retention), which decides when a periodic save is due; every save is one `checkpoint` event.

The local tier (`checkpoint.local`, local_tier.LocalTier) is each rank's own piece in node-local storage,
written every `checkpoint.local.every_steps` from a host copy in the background, with copies on other nodes
(`checkpoint.local.replicas`, local_peers).

Loading (`restore`) follows `resume` (auto: the newest step every rank can restore, from its own local
piece, a copy of it on another node, or else the durable checkpoints, falling back to older ones; a path; never) and, on a fresh run,
`init_from` (weights only). The model state loads first, so
that the schedule can re-apply the configured optimizer settings over the loaded ones.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from disttrain import dist
from disttrain import events as ev
from disttrain.ckpt_read import Loaded, agreed, from_main
from disttrain.ckpt_write import CheckpointManager, SaveResult, Shards
from disttrain.config import Config
from disttrain.data import TrainData
from disttrain.errors import CheckpointError
from disttrain.hooks import Hook, Loop
from disttrain.local_tier import LocalTier
from disttrain.parallel import ModelState, Strategy
from disttrain.resume import check_compatible
from disttrain.sections import CHECKPOINT, Sections
from disttrain.state import Progress, StateRegistry, rank_seed, seed_all
from disttrain.writers import EventLog, RunFiles

# Raises (on every rank alike) instead of letting non-finite weights be saved: the guard's check.
WeightsCheck = Callable[[nn.Module, int], None]


class Checkpointing:
    """Saving and loading this run's state. Every method runs collectives: call it on all ranks."""

    def __init__(
        self,
        cfg: Config,
        manager: CheckpointManager,
        strategy: Strategy,
        registry: StateRegistry,
        progress: Progress,
        data: TrainData,
        events: EventLog,
        files: RunFiles,
        check_weights: WeightsCheck,
        *,
        restart_count: int = 0,
    ):
        self.cfg, self.manager, self.strategy, self.registry = cfg, manager, strategy, registry
        self.progress, self.data, self.events, self.files = progress, data, events, files
        self.check_weights = check_weights
        self.resumed: Loaded | None = None  # what this segment started from
        # Only a restarted attempt reads the local tier; a first one clears this rank's folder.
        first = restart_count == 0
        self.local = LocalTier(
            cfg.checkpoint.local, cfg.run_dir, manager.meta, strategy.name, first_attempt=first
        )

    # ---------------------------------------------------------------------------------------- save

    def maybe_save(self, final: bool = False) -> None:
        """Save if the manager says this step is due (or at the end, `final`)."""
        model = functools.cache(self._model_state)  # captured once, only when a save is due
        step = self.progress.step
        result = self.manager.maybe_save(
            step,
            lambda: {**model().shared, **self.registry.shared_state()},
            self._rank_state,
            final=final,
            shards=lambda: model().shards,
        )
        self._record(result)
        if not final and self.local.due(step):  # every rank alike: the step decides, no collective
            state = model()
            self.local.save(
                step, {**state.shared, **self.registry.shared_state()}, self._rank_state(), state.shards
            )

    def finished(self) -> None:
        """The run finished: this rank's local pieces are dropped (tmpfs is memory, and nothing restarts a
        finished run; a later first attempt would clear them anyway). After a stop or a crash they stay."""
        if self.local.on:
            self.local.discard()

    def save(self, reason: str = "manual") -> None:
        """Save now, synchronously; a step already saved is not saved again."""
        step = self.progress.step
        if self.manager.last_step == step:
            self.manager.wait()
            return
        shared, mine, shards = self.capture()
        self._record(self.manager.save(step, shared, mine, sync=True, reason=reason, shards=shards))

    def capture(self) -> tuple[dict[str, Any], dict[str, Any], Shards | None]:
        """What a save of this step writes: the shared state, this rank's, and this rank's shards."""
        model = self._model_state()
        return {**model.shared, **self.registry.shared_state()}, self._rank_state(), model.shards

    def wait(self) -> None:
        """Block until no save is in flight (either tier); raise a durable save's failure. A local write
        still running at exit would be cut off by the interpreter's teardown mid-file."""
        self.local.wait()
        self.manager.wait()

    def _model_state(self) -> ModelState:
        self.check_weights(self.strategy.module, self.progress.step)  # a non-finite state is never saved
        return self.strategy.model_state()

    def _rank_state(self) -> dict[str, Any]:
        return {**self.registry.rank_state(), **self.data.position()}

    def _record(self, result: SaveResult | None) -> None:
        if result is not None:
            self.events.emit(ev.CHECKPOINT, **result.fields())

    # ---------------------------------------------------------------------------------------- load

    def restore(self) -> Loaded | None:
        """Load what `resume` (or, on a fresh run, `init_from`) names."""
        mode = self.cfg.resume
        loaded = None
        if mode == "auto":
            loaded = self._restore_newest()
        elif mode != "never":
            loaded = self.manager.read(mode)
            self._load(loaded)
        if loaded is None and self.cfg.init_from:
            self._init_weights(self.cfg.init_from)
        self.resumed = loaded
        return loaded

    def _restore_newest(self) -> Loaded | None:
        """The newest step every rank can restore: from the local tier (own node, else a peer's copy) when
        every rank has a piece newer than the newest durable checkpoint, else the durable tier (falling
        back to older ones)."""
        durable = from_main(lambda: next(iter(self.manager.layout.committed_steps()), None))
        local, fallbacks = self.local.restore(durable)
        if local is not None:
            if fallbacks:  # a faster source failed, and the local tier served from another
                self.files.warn(f"disttrain: {fallbacks[-1]['reason']}; resuming from the {local.tier} tier")
            try:
                return dataclasses.replace(self._load_local(local), fallbacks=tuple(fallbacks))
            except CheckpointError as err:  # on every rank alike (agreed): the durable tier loads over it
                fallbacks = [*fallbacks, {"tier": local.tier, "step": local.step, "reason": str(err)}]
        loaded = self.manager.load_newest(self._load)
        if fallbacks:
            self.files.warn(
                f"disttrain: local checkpoint tier not used: {fallbacks[-1]['reason']}; "
                + (f"resuming from durable step {loaded.step}" if loaded else "no durable checkpoint either")
            )
        return dataclasses.replace(loaded, fallbacks=tuple(fallbacks)) if loaded else None

    def _load_local(self, loaded: Loaded) -> Loaded:
        """Each rank's own piece into this run, with rank 0's shared state (schedule, progress, cursor,
        hooks), as a durable resume reads it from rank 0's files. The weights and optimizer state stay
        each rank's own: replicas are identical under ddp, and shards are each rank's under fsdp."""
        heavy = ("model", "optimizer")
        shared = dist.broadcast_from_main({k: v for k, v in loaded.app.items() if k not in heavy})
        loaded = dataclasses.replace(loaded, app={**loaded.app, **shared})
        agreed(lambda: self._load(loaded))
        return loaded

    def _init_weights(self, source: str) -> None:
        """Start from a checkpoint's weights only: fresh optimizer, schedule and step 0 (fine-tuning)."""
        loaded = CheckpointManager(self.cfg.run_dir, self.cfg.checkpoint).read(source)
        self.strategy.load_weights(loaded)
        self.files.say(f"initialised the weights from {source} (optimizer, schedule and step start fresh)")

    def _load(self, loaded: Loaded) -> None:
        """Everything a checkpoint holds into this run (its model, optimizer, progress, RNG, ...)."""
        check_compatible(self.cfg, loaded.path, loaded.manifest)
        self.strategy.load_model_state(loaded)
        self.registry.load_shared(loaded.app)
        self.data.restore_positions(loaded.rank_state, int(loaded.manifest["world_size"]))
        if loaded.rank_state is not None:  # same world size: continue this rank's exact random streams
            self.registry.load_rank(loaded.rank_state)
        else:  # another world size: no per-rank stream to continue; a fresh one for this segment
            seed_all(rank_seed(self.cfg.seed, self.strategy.data_parallel()[0], self.progress.step))


class CheckpointHook(Hook):
    """Periodic saves (the manager decides when), and the final save."""

    def __init__(self, checkpointing: Checkpointing, sections: Sections):
        self.checkpointing, self.sections = checkpointing, sections

    def after_step(self, loop: Loop) -> None:
        with self.sections.section(CHECKPOINT):
            self.checkpointing.maybe_save()

    def after_train(self, loop: Loop) -> None:
        if not loop.stopping:
            self.checkpointing.maybe_save(final=True)
            self.checkpointing.finished()
