"""Wiring: the parts of one training segment, built from a validated Config, in the order they depend on
each other. Nothing here runs a step; `trainer.Trainer` is the loop over what this returns.

Order matters in three places: the process group comes first (`start_strategy`; `run.py` takes the
run-dir lease right after it, before anything in the run dir is read); every rank builds identical
initial weights from the same seed before each switches to its own random stream; and the checkpoint
is loaded last, once every stateful part is registered (`state.StateRegistry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from disttrain import __version__, dist, hangs, phases
from disttrain import events as ev
from disttrain.checkpoint import CheckpointHook, Checkpointing
from disttrain.ckpt_write import CheckpointManager
from disttrain.cluster import ClusterEnv, host_name
from disttrain.config import Config, config_hash
from disttrain.data import StreamBatches, TrainData, TrainSpec, dataset_size
from disttrain.errors import ConfigError
from disttrain.evaluation import EvalHook, EvalSpec, Evaluator
from disttrain.features import guard as guard_feature
from disttrain.features.ema import EMAHook
from disttrain.features.extend import config_hooks, feature_hooks
from disttrain.features.guard import NonFiniteGuard
from disttrain.features.metrics import LogHook, StepMetrics, TrainLog
from disttrain.features.model import after_wrap, before_wrap
from disttrain.features.progress import ProgressHook
from disttrain.features.stragglers import Stragglers
from disttrain.hooks import Hook
from disttrain.optim import Schedule, build_optimizer, build_scheduler
from disttrain.parallel import Strategy, build_strategy
from disttrain.pipelines import Pipeline, load_pipeline
from disttrain.process import StopSignal
from disttrain.resume import fingerprint
from disttrain.sections import Sections
from disttrain.segment import Segment
from disttrain.state import Progress, RankRNG, StateRegistry, rank_seed, seed_all
from disttrain.stop import StopAgreement, StopHook, Stopping
from disttrain.stream import as_stream
from disttrain.writers import EventLog, build_run_files


@dataclass
class Parts:
    """Everything the loop drives, built and (when resuming) loaded."""

    cfg: Config
    strategy: Strategy
    pipeline: Pipeline
    model: torch.nn.Module  # what forward runs on: the wrapped model, compiled when asked
    data: TrainData
    schedule: Schedule
    progress: Progress
    guard: NonFiniteGuard
    log: TrainLog  # the train window and the writers
    checkpointing: Checkpointing
    stopping: Stopping
    evaluator: Evaluator
    segment: Segment
    hooks: list[Hook]


def start_strategy(cfg: Config) -> Strategy:
    """The process group and the strategy over it. Must be called on all ranks, first."""
    phases.CLOCK.begin_segment()
    strategy = build_strategy(cfg)
    phases.CLOCK.mark(phases.PROCESS_GROUP)
    return strategy


def build(
    cfg: Config,
    cluster: ClusterEnv,
    strategy: Strategy,
    *,
    stop: StopSignal | None = None,
    hooks: list[Hook] | None = None,
) -> Parts:
    """Every part of a segment, then the checkpoint `resume` names loaded into them. Must be called on
    all ranks (it builds a distributed model and may load a checkpoint). Raises ConfigError."""
    world = dist.world_size()
    dp_rank, dp_size = strategy.data_parallel()  # a tensor-parallel group reads one batch, draws one stream
    pipeline = load_pipeline(cfg.pipeline)
    splits = pipeline.datasets()
    data = _train_data(cfg, pipeline, splits, strategy.device, dp_rank, dp_size)
    model = _distributed_model(cfg, pipeline, strategy)
    schedule = Schedule(
        strategy.optimizer, build_scheduler(cfg.scheduler, strategy.optimizer, cfg.trainer.max_steps)
    )
    seed_all(rank_seed(cfg.seed, dp_rank))  # per-rank stream for dropout & co
    files, progress = build_run_files(cfg.run_dir), Progress(cfg.data.batch_size)
    events = EventLog(cfg.run_dir, cluster.job_id, cluster.restart_count, cfg=cfg)
    window = StepMetrics(cfg, strategy.device, pipeline)
    stopping = _stopping(cfg, stop, events, progress, window.sections, world)
    manager = _manager(cfg)
    cuda = strategy.device.type == "cuda"
    guard = NonFiniteGuard(
        cfg.trainer,
        strategy.device,
        strategy.scaler is not None,
        stopping.agreement,
        events,
        files,
        manager.wait,
    )
    hosts = dist.all_gather_objects(host_name())  # once: attribution names hosts, not only ranks
    stragglers = Stragglers(hosts, cfg.trainer.straggler_ratio, cfg.trainer.straggler_windows, events)
    log = TrainLog(cfg, window, schedule, data, guard, stragglers)
    features = feature_hooks(cfg, cuda, events, files)
    spec = EvalSpec(cfg.data.eval_batch_size, cfg.data.num_workers, cfg.ema.eval)
    ema = EMAHook.find(features, strategy.module)
    evaluator = Evaluator(spec, splits, pipeline, strategy, stopping, ema, events, files, guard.flush)
    registry = _registry(schedule, progress, data, guard, window)
    checkpointing = Checkpointing(
        cfg, manager, strategy, registry, progress, data, events, files, guard.check_weights,
        restart_count=cluster.restart_count,
    )  # fmt: skip
    bar = _use_bar(cfg) and dist.is_main()
    user = config_hooks(cfg) + list(hooks or [])
    stock = _stock_hooks(cfg, log, evaluator, checkpointing, stopping, guard, user, bar)
    all_hooks = features + stock
    for hook in all_hooks:  # stateful hooks are saved under their class name (empty state: no entry)
        registry.add(f"hooks/{type(hook).__name__}", hook, optional=True)
    segment = Segment(cfg, cluster, files, events, log, bar)
    phases.CLOCK.mark(phases.BUILD)
    checkpointing.restore()
    phases.CLOCK.mark(phases.CHECKPOINT)
    return Parts(
        cfg, strategy, pipeline, model, data, schedule, progress, guard, log, checkpointing, stopping,
        evaluator, segment, all_hooks,
    )  # fmt: skip


def _train_data(
    cfg: Config, pipeline: Pipeline, splits: dict[str, Any], device: torch.device, rank: int, world: int
) -> TrainData:
    """The train split (checked before anything big is built), and that the other splits can be eval'd.
    Eval and test splits are read whole at every eval, so they must be map-style. Raises ConfigError."""
    if "train" not in splits:
        raise ConfigError(f"{cfg.pipeline.target}.datasets() returned no 'train' split; add one")
    if cfg.early_stop.metric and "eval" not in splits:
        raise ConfigError(f"early_stop.metric is set but {cfg.pipeline.target} has no 'eval' split to watch")
    for split in ("eval", "test"):
        if split in splits:
            dataset_size(splits[split], split)
    micro = cfg.data.batch_size // (world * cfg.trainer.grad_accum)
    stream = as_stream(splits["train"], "train")
    batches = None
    if stream is not None:
        batches = StreamBatches(
            stream, rank=rank, world_size=world, micro=micro, num_workers=cfg.data.num_workers
        )
    spec = TrainSpec(
        cfg.data.batch_size, cfg.trainer.grad_accum, cfg.seed, cfg.data.shuffle, cfg.data.num_workers,
        pin=device.type == "cuda",
    )  # fmt: skip
    return TrainData(splits["train"], batches, spec, rank, world)


def _distributed_model(cfg: Config, pipeline: Pipeline, strategy: Strategy) -> torch.nn.Module:
    """The pipeline's model, distributed by the strategy with its optimizer; returns what forward runs
    on. Every rank builds identical initial weights from the same seed."""
    seed_all(cfg.seed)
    model = before_wrap(pipeline.build_model(), cfg.trainer, pipeline)
    on_cuda = strategy.device.type == "cuda"
    units = pipeline.shard_units(model) if cfg.trainer.strategy == "fsdp" else []
    strategy.setup(model, lambda m: build_optimizer(cfg.optim, m, on_cuda, pipeline), units, pipeline.tp_plan)
    return after_wrap(strategy.model, cfg.trainer)


def _stopping(
    cfg: Config, stop: StopSignal | None, events: EventLog, progress: Progress, sections: Sections, world: int
) -> Stopping:
    """The stop path, with the hang watch of a multi-rank run: a stalled rank writes where it is (its
    peers' line then names it), and a rank hung past the timeout records a `hang` and fails."""
    signal = stop or StopSignal()
    hang_after = cfg.trainer.collective_timeout_s if world > 1 else None
    rank = dist.rank()

    def on_stall(idle: float) -> None:
        hangs.write_stack(cfg.run_dir, rank, progress.step, sections.current, idle)

    def on_hang(why: str) -> None:
        stack = hangs.main_thread_stack()
        where = {"rank": rank, "host": host_name(), "frame": hangs.frame_of(stack)}
        events.emit(ev.HANG, step=progress.step, section=sections.current, **where, ranks=[where])
        events.emit(ev.ERROR, step=progress.step, error=why)

    channels = (guard_feature.CHANNEL,)
    agreement = StopAgreement(
        signal, hang_after=hang_after, on_hang=on_hang, channels=channels, on_stall=on_stall
    )
    return Stopping(signal, agreement, events)


def _manager(cfg: Config) -> CheckpointManager:
    return CheckpointManager(
        cfg.run_dir,
        cfg.checkpoint,
        config_hash=config_hash(cfg),
        fingerprint=fingerprint(cfg),
        versions={"disttrain": __version__, "torch": torch.__version__},
    )


def _registry(
    schedule: Schedule, progress: Progress, data: TrainData, guard: NonFiniteGuard, window: StepMetrics
) -> StateRegistry:
    """The stateful parts, under the paths the checkpoint format has always used; hooks are added later."""
    registry = StateRegistry()
    registry.add("scheduler", schedule)  # after the strategy's optimizer: it re-applies configured settings
    registry.add("trainer", progress)
    registry.add("trainer/cursor", data)
    registry.add("trainer/guard", guard, optional=True)
    registry.add("rng", RankRNG(), rank=True)
    registry.add("metrics", window, rank=True, optional=True)  # the log window in progress
    return registry


def _stock_hooks(
    cfg: Config,
    log: TrainLog,
    evaluator: Evaluator,
    checkpointing: Checkpointing,
    stopping: Stopping,
    guard: NonFiniteGuard,
    user: list[Hook],
    bar: bool,
) -> list[Hook]:
    """Order matters: log and eval see the finished step (the bar shows the window logged at it); the
    user's hooks come next, so that what they change at a step is in that step's checkpoint (a resumed run
    then continues them exactly); the checkpoint captures eval's and their state; the stop check comes
    last so a stop saves everything the step produced."""
    t = cfg.trainer
    return [
        LogHook(log, t.log_every, t.max_steps),
        ProgressHook(log, bar, t.max_steps),
        EvalHook(evaluator, log, t.eval_every, t.max_steps),
        *user,
        CheckpointHook(checkpointing, log.window.sections),
        StopHook(stopping, checkpointing, guard.late_check, log.window.sections),
    ]


def _use_bar(cfg: Config) -> bool:
    import sys

    return cfg.trainer.progress == "bar" or (cfg.trainer.progress == "auto" and sys.stdout.isatty())
