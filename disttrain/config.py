"""Typed configuration: nested dataclasses, YAML load with `base:` inheritance, dotted overrides,
validation that names the key and says what to write instead.

Everything here is pure data and stdlib + yaml: nothing touches the disk except reading config files,
so a bad config is refused before any run directory exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from disttrain.errors import ConfigError
from disttrain.secrets import redact_tree

DEFAULT_PIPELINE = "disttrain.pipelines.digits:DigitsPipeline"
_SCI_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _f(default: Any, doc: str, **checks: Any) -> Any:
    """A dataclass field carrying its one-line doc and validation rules (choices, min, max, secret)."""
    meta = {"doc": doc, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainerConfig:
    """The training loop."""

    max_steps: int = _f(300, "number of optimizer steps to train for", min=1)
    eval_every: int = _f(100, "evaluate every N optimizer steps (0: only at the end)", min=0)
    log_every: int = _f(10, "write train metrics every N optimizer steps", min=1)
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step", min=1)
    mixed_precision: str = _f("no", "autocast dtype", choices=("no", "bf16", "fp16"))
    grad_clip: float = _f(1.0, "max global gradient norm (0: no clipping)", min=0.0)
    progress: str = _f("auto", "progress output on rank 0", choices=("auto", "bar", "plain", "none"))
    collective_timeout_s: float = _f(
        600.0,
        "seconds before a stuck collective, or a rank reaching no step boundary, aborts the job",
        min=1.0,
    )
    cpu: bool = _f(False, "train on CPU even when a GPU is present")
    deterministic: bool = _f(
        False,
        "GPU: only deterministic kernels (torch.use_deterministic_algorithms, a fixed cuBLAS workspace, no "
        "cuDNN autotuning), so two runs and a resumed run are bit-identical; slower, and an op with no "
        "deterministic kernel fails the run",
    )
    strategy: str = _f(
        "ddp",
        "ddp: replicate the model; fsdp: shard params, grads and optimizer state",
        choices=("ddp", "fsdp"),
    )
    threads: int = _f(
        0,
        "intra-op CPU threads per rank (0: $OMP_NUM_THREADS, else SLURM's cpus-per-task, else torch's)",
        min=0,
    )
    nonfinite: str = _f(
        "stop",
        "a NaN/Inf loss or gradient norm: stop (exit 1, no save), skip the update, or off",
        choices=("stop", "skip", "off"),
    )
    max_skips: int = _f(10, "nonfinite=skip: stop after this many consecutive skipped steps", min=1)
    compile: bool = _f(False, "torch.compile the model (checkpoints keep the uncompiled names)")
    compile_mode: str = _f(
        "default",
        "torch.compile mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    compile_backend: str = _f("inductor", "torch.compile backend (aot_eager: trace only, for debugging)")
    activation_checkpointing: bool = _f(False, "recompute the pipeline's blocks() in backward to save memory")
    find_unused_parameters: bool = _f(False, "DDP: allow parameters that get no gradient in a step (slower)")
    straggler_ratio: float = _f(
        1.2,
        "a rank this many times slower than the others' median (busy time per log window) is slow",
        min=1.0,
    )
    straggler_windows: int = _f(
        3, "log windows in a row a rank must be slow before a straggler event names it", min=1
    )


@dataclass
class FSDPConfig:
    """Sharded training (trainer.strategy=fsdp): FSDP2 over all ranks; shard units from the pipeline."""

    reduce_dtype: str = _f(
        "fp32", "dtype gradients are reduced in under bf16 mixed precision", choices=("fp32", "bf16")
    )
    cpu_offload: bool = _f(False, "keep sharded params, grads and optimizer state in CPU memory (GPU runs)")


@dataclass
class ParallelConfig:
    """Tensor parallelism and hybrid sharding (with trainer.strategy=fsdp) over a (dp_replicate, dp_shard,
    tp) mesh: layers split over tp ranks, FSDP2 over dp_shard, replicas over dp_replicate."""

    tp: int = _f(
        1,
        "tensor-parallel degree: consecutive ranks that split each layer (divides the world size; "
        "1: no tensor parallelism)",
        min=1,
    )
    dp_replicate: int = _f(
        1,
        "hybrid sharding: replica groups (e.g. one per node) each sharding over world / (dp_replicate x tp) "
        "ranks; only gradients cross groups (1: shard over all)",
        min=1,
    )


@dataclass
class DataConfig:
    """Batching and loading. Batch sizes are global: summed over ranks and accumulation steps."""

    batch_size: int = _f(64, "global training batch per optimizer step", min=1, resume="refuse")
    eval_batch_size: int = _f(256, "global evaluation batch", min=1)
    num_workers: int = _f(0, "DataLoader worker processes per rank", min=0)
    shuffle: bool = _f(
        True, "reshuffle the training set every epoch (order fixed by seed and epoch)", resume="refuse"
    )


@dataclass
class OptimConfig:
    """The optimizer."""

    name: str = _f("adamw", "optimizer", choices=("sgd", "adam", "adamw"), resume="refuse")
    lr: float = _f(3e-3, "peak learning rate", min=0.0)
    weight_decay: float = _f(0.0, "decoupled weight decay (adamw) or L2 penalty (sgd, adam)", min=0.0)
    betas: list[float] = _f([0.9, 0.999], "Adam betas")
    momentum: float = _f(0.9, "SGD momentum", min=0.0)
    fused: bool = _f(False, "use the fused CUDA kernel (GPU only)")


@dataclass
class SchedulerConfig:
    """The learning-rate schedule, stepped once per optimizer step."""

    name: str = _f("cosine", "schedule after warmup", choices=("constant", "cosine", "linear"))
    warmup_steps: int = _f(0, "linear warmup from 0 to optim.lr over N steps", min=0)
    min_lr_ratio: float = _f(0.0, "final lr as a fraction of optim.lr (cosine, linear)", min=0.0, max=1.0)


@dataclass
class LocalTierConfig:
    """The local checkpoint tier: each rank's own copy in node-local storage, for a restart in place."""

    every_steps: int = _f(
        0, "write each rank's piece to node-local storage every N optimizer steps (0: off)", min=0
    )
    dir: str = _f(
        "",
        "node-local folder ('': /dev/shm/disttrain/RUN_ID/HOST, RUN_ID from run_dir's name and a hash of its path)",
    )
    keep_last: int = _f(2, "newest local copies each rank keeps", min=1, max=8)
    replicas: int = _f(
        1,
        "copies of each rank's piece kept on other nodes, sent over gloo (used when the job spans more nodes than this; 0: off)",
        min=0,
        max=3,
    )


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every_steps: int = _f(100, "save every N optimizer steps (0: never by step count)", min=0)
    every_minutes: float = _f(0.0, "also save every N minutes of wall clock (0: off)", min=0.0)
    interval: str = _f(
        "fixed",
        "fixed: every_steps / every_minutes; auto: sqrt(2 x MTBI x save time) from this run's own history",
        choices=("fixed", "auto"),
    )
    mtbi_prior_minutes: float = _f(
        60.0, "auto: mean time between unclean interruptions assumed until the run's history says", min=0.01
    )
    keep_last: int = _f(3, "number of newest checkpoints to keep", min=1)
    keep_every: int = _f(0, "also keep every checkpoint whose step is a multiple of N (0: off)", min=0)
    async_save: bool = _f(False, "write in a background thread; the step blocks only for the host copy")
    save_final: bool = _f(True, "save when training finishes")
    load_mode: str = _f("all", "who reads a checkpoint", choices=("all", "broadcast"))
    local: LocalTierConfig = field(default_factory=LocalTierConfig)


@dataclass
class LogConfig:
    """Writers. Only rank 0 writes; other ranks get a null writer."""

    jsonl: bool = _f(True, "write RUN_DIR/metrics.jsonl")
    console: bool = _f(True, "print metrics on rank 0")
    wandb: bool = _f(False, "log to Weights & Biases (respects WANDB_MODE; offline works without network)")
    wandb_project: str = _f("disttrain", "wandb project")
    wandb_entity: str | None = _f(None, "wandb entity (team or user)")
    wandb_tags: list[str] = _f([], "wandb run tags")
    tensorboard: bool = _f(False, "write TensorBoard events under RUN_DIR/tb/")
    plot: bool = _f(
        False,
        "redraw RUN_DIR/curves.png at every segment's end (needs matplotlib; `disttrain plot` draws on demand)",
    )


@dataclass
class EmaConfig:
    """An exponential moving average of the weights, kept in checkpoints."""

    decay: float = _f(0.0, "EMA decay per optimizer step, e.g. 0.999 (0: no EMA)", min=0.0, max=0.999999)
    warmup_steps: int = _f(0, "ramp the decay linearly from 0 over N steps (0: full decay at once)", min=0)
    eval: bool = _f(False, "evaluate (and --test) with the EMA weights instead of the trained ones")


@dataclass
class EarlyStopConfig:
    """End the run (as finished) when an eval metric stops improving."""

    metric: str = _f("", "eval metric to watch, e.g. eval/loss ('': no early stopping)")
    mode: str = _f("min", "whether lower or higher is better", choices=("min", "max"))
    patience: int = _f(3, "evaluations without improvement before the run ends", min=1)
    min_delta: float = _f(0.0, "smallest change that counts as an improvement", min=0.0)


@dataclass
class ProfileConfig:
    """torch.profiler traces of a few steps, one file per rank under RUN_DIR/profile/."""

    steps: list[int] = _f([], "[first, last] optimizer steps to trace, e.g. [20, 25] ([]: off)")


@dataclass
class HookSpec:
    """A hook named by import path, built with keyword arguments."""

    target: str = _f("", "import path `package.module:ClassName` of a Hook subclass")
    args: dict[str, Any] = _f({}, "keyword arguments passed to the hook's constructor")


@dataclass
class PipelineConfig:
    """The user's model, data and loss: a Pipeline subclass named by import path."""

    target: str = _f(
        DEFAULT_PIPELINE, "import path `package.module:ClassName` of a Pipeline subclass", resume="refuse"
    )
    args: dict[str, Any] = _f({}, "keyword arguments passed to the pipeline's constructor", resume="refuse")


@dataclass
class Config:
    """A whole run. Top-level keys describe the run itself; sections configure components."""

    run_dir: str = _f("runs/digits", "where config, metrics, events and checkpoints go (path or fsspec URL)")
    seed: int = _f(0, "seed for model init, data order and per-rank RNG", min=0, resume="refuse")
    resume: str = _f("auto", "auto: newest verified checkpoint in run_dir; never: refuse if any; or a path")
    init_from: str = _f(
        "",
        "a checkpoint (step dir or run dir) whose weights start a new run: fresh optimizer, step 0",
        resume="refuse",
    )
    name: str = _f("", "a human name for the run (wandb, status); defaults to the run_dir's last part")
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    hooks: list[HookSpec] = _f([], "extra hooks by import path: [{target: pkg.mod:Hook, args: {...}}]")


def _resume_refused(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    keys: list[str] = []
    for fld in dataclasses.fields(cls):
        if isinstance(fld.default_factory, type) and dataclasses.is_dataclass(fld.default_factory):
            keys += _resume_refused(fld.default_factory, prefix + fld.name + ".")
        elif fld.metadata.get("resume") == "refuse":
            keys.append(prefix + fld.name)
    return tuple(keys)


# The one rule for config changes on resume (README, "Reliability"). A key marked resume="refuse" would
# make the checkpoint's state meaningless or silently change the run (model and data identity, the data
# order of the epoch in progress, the optimizer state layout, where the weights came from): a change is
# refused, naming the key. Every other key is applied from the resumed step on, and the applied value is
# what the logs show: optimizer hyperparameters override the loaded param_groups and schedule
# (optim.reapply_hyperparameters), everything else is read from the config when the segment starts.
RESUME_CRITICAL_KEYS = _resume_refused()


# ---------------------------------------------------------------------------------------------- load


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read `path` (following `base:`), apply `key=value` overrides and validate. Raises ConfigError."""
    raw = _read_with_bases(path, seen=()) if path else {}
    overridden = []
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
        overridden.append(key)
    source = Source(path or "the built-in default", frozenset(overridden))
    cfg = _build(Config, raw, prefix="", source=source)
    validate(cfg, source)
    return cfg


@dataclass(frozen=True)
class Source:
    """Where a key's value came from, for the `[...]` an error ends with: the command line for a key an
    override set (or a section one replaced), else the file given to --config, or the built-in default."""

    base: str
    overridden: frozenset[str] = frozenset()

    def of(self, *keys: str) -> str:
        """The source of the first of `keys` an override set, else the base (a cross-field rule names
        every key it compares)."""
        for key in keys:
            parts = re.sub(r"\[\d+\]", "", key).split(".")  # optim.betas[0] was set as optim.betas
            if any(".".join(parts[:n]) in self.overridden for n in range(1, len(parts) + 1)):
                return "command line"
        return self.base


def parse_override(item: str) -> tuple[str, Any]:
    """`optim.lr=3e-4` -> ("optim.lr", 0.0003). Values are YAML, so `x=[1,2]` is a list."""
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r} has no '=': write it as key=value, e.g. trainer.max_steps=200")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: take it as the literal string the user typed
    return key.strip(), value


def plain_value(value: Any) -> Any:
    """A YAML value as config keys read it: YAML 1.1 leaves `1e-3` (no dot) a string, which a number
    key takes as the number (_as_float); so does this, in lists and mappings too."""
    if isinstance(value, str) and _SCI_NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    return value


def _read_with_bases(path: str, seen: tuple[str, ...]) -> dict[str, Any]:
    real = os.path.abspath(path)
    if real in seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself; remove one of the `base:` lines")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: `base:` must be a path to another YAML file, got {base!r}")
    base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(real), base)
    return _deep_merge(_read_with_bases(base_path, seen + (real,)), data)


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} not found: check the path given to --config")
    if os.path.isdir(path):
        raise ConfigError(f"config path {path!r} is a directory: pass a YAML file to --config")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    for line_no, line in enumerate(text.splitlines(), 1):
        if "\t" in line[: len(line) - len(line.lstrip())]:
            raise ConfigError(
                f"{path}:{line_no}: malformed YAML: tab used for indentation; indent with spaces"
            )
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = err.problem or err.context or "invalid syntax"
        raise ConfigError(f"{where}: malformed YAML: {problem}; fix the syntax at that line") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: malformed YAML: {err}; fix the file's syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: top level must be a mapping of keys (run_dir:, trainer:, ...), not {_tname(data)}"
        )
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "args":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section; drop the part after it")
        node = child
    node[parts[-1]] = value


# ----------------------------------------------------------------------------------------- build


def _build(cls: type, raw: Any, prefix: str, source: Source) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{prefix.rstrip('.')}: expected a section (mapping), got {_tname(raw)} [{source.of(prefix)}]"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(_unknown_key_message(prefix, str(key), names, source))
    kwargs = {}
    for fld in dataclasses.fields(cls):
        if fld.name not in raw:
            continue
        hint = hints[fld.name]
        key = prefix + fld.name
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[fld.name] = _build(hint, raw[fld.name], key + ".", source)
        else:
            kwargs[fld.name] = _coerce(
                _yaml_word(raw[fld.name], fld.metadata.get("choices")), hint, key, source
            )
    return cls(**kwargs)


def _yaml_word(value: Any, choices: tuple[Any, ...] | None) -> Any:
    """YAML 1.1 reads off/no as false and on/yes as true: for a key whose choices are words
    (trainer.nonfinite=off, trainer.mixed_precision=no), the boolean means the word."""
    if isinstance(value, bool) and choices:
        words = ("on", "yes", "true") if value else ("off", "no", "false")
        return next((w for w in words if w in choices), value)
    return value


def _unknown_key_message(prefix: str, key: str, names: list[str], source: Source) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys here: {', '.join(names)}"
    return f"unknown config key {prefix}{key}: {hint} [{source.of(prefix + key)}]"


def _coerce(value: Any, hint: Any, key: str, source: Source) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(key, value, "a list like [a, b]", source)
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if isinstance(hint, type) and dataclasses.is_dataclass(
        hint
    ):  # a list of sections (hooks); a string: its target
        return _build(hint, {"target": value} if isinstance(value, str) else value, key + ".", source)
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(key, value, "a mapping like {k: v}", source)
        return dict(value)
    coerce, expected = _SCALARS[hint]
    out = coerce(value)
    if out is None:
        raise _type_error(key, value, expected, source)
    return out


def _as_bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _as_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, float) and value.is_integer() else None


def _as_float(value: Any) -> float | None:
    # YAML 1.1 reads `3e-4` (no dot) as a string; a number in scientific notation is what users mean.
    if isinstance(value, str) and _SCI_NUMBER.fullmatch(value.strip()):
        return float(value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# Scalar config types: how a YAML value becomes one (None: it cannot), and what to say otherwise.
_SCALARS: dict[Any, tuple[Any, str]] = {
    bool: (_as_bool, "true or false"),
    int: (_as_int, "an integer"),
    float: (_as_float, "a number"),
    str: (_as_str, "a string"),
}


def _type_error(key: str, value: Any, expected: str, source: Source) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {value!r} ({_tname(value)}) [{source.of(key)}]")


def _tname(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


# ------------------------------------------------------------------------------------- validate


def validate(cfg: Config, source: Source | None = None) -> None:
    """Range and choice checks from field metadata, then cross-field rules. Raises ConfigError."""
    source = source or Source("config")
    for key, value, meta in _walk(cfg):
        _check_field(key, value, meta, source.of(key))
    if not cfg.run_dir.strip():
        raise ConfigError(f"run_dir: must not be empty; write run_dir=runs/my_run [{source.of('run_dir')}]")
    if not cfg.resume.strip():
        raise ConfigError(f"resume: must be auto, never or a checkpoint path [{source.of('resume')}]")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(
            f"optim.betas: expected two numbers in [0, 1), e.g. [0.9, 0.999] [{source.of('optim.betas')}]"
        )
    if cfg.scheduler.warmup_steps > cfg.trainer.max_steps:
        raise ConfigError(
            f"scheduler.warmup_steps: {cfg.scheduler.warmup_steps} exceeds trainer.max_steps "
            f"{cfg.trainer.max_steps}; lower the warmup [{source.of('scheduler.warmup_steps', 'trainer.max_steps')}]"
        )
    if ":" not in cfg.pipeline.target or cfg.pipeline.target.endswith(":"):
        raise ConfigError(
            f"pipeline.target: {cfg.pipeline.target!r} must look like package.module:ClassName "
            f"[{source.of('pipeline.target')}]"
        )
    _validate_features(cfg, source)
    _validate_fsdp(cfg, source)


def _validate_fsdp(cfg: Config, source: Source) -> None:
    """What sharded training does not combine with yet: each refused up front, with the way out."""
    for key in ("tp", "dp_replicate"):
        value = getattr(cfg.parallel, key)
        if value > 1 and cfg.trainer.strategy != "fsdp":
            raise ConfigError(
                f"parallel.{key}={value} needs trainer.strategy=fsdp (the model is sharded over a device mesh); "
                f"set it, or parallel.{key}=1 [{source.of(f'parallel.{key}', 'trainer.strategy')}]"
            )
    if cfg.trainer.strategy != "fsdp":
        return
    refused = {
        "trainer.mixed_precision=fp16": (
            cfg.trainer.mixed_precision == "fp16",
            "use trainer.mixed_precision=bf16",
        ),
        "ema.decay > 0": (
            cfg.ema.decay > 0,
            "the EMA of sharded weights is not supported yet; set ema.decay=0",
        ),
        "trainer.compile=true": (
            cfg.trainer.compile,
            "compile with sharding is untested; set trainer.compile=false",
        ),
    }
    for what, (bad, fix) in refused.items():
        if bad:
            where = source.of(what.split("=")[0].split(" ")[0], "trainer.strategy")
            raise ConfigError(
                f"{what} with trainer.strategy=fsdp: {fix}, or use trainer.strategy=ddp [{where}]"
            )


def _validate_features(cfg: Config, source: Source) -> None:
    """Cross-field rules of the training features (hooks, profile window, early stopping)."""
    for i, hook in enumerate(cfg.hooks):
        if ":" not in hook.target or hook.target.endswith(":"):
            raise ConfigError(
                f"hooks[{i}].target: {hook.target!r} must look like package.module:ClassName [{source.of('hooks')}]"
            )
    steps = cfg.profile.steps
    if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
        raise ConfigError(
            f"profile.steps: {steps} must be [first, last] with 1 <= first <= last, e.g. [20, 25] "
            f"[{source.of('profile.steps')}]"
        )
    metric = cfg.early_stop.metric
    if metric and not metric.startswith("eval/"):
        raise ConfigError(
            f"early_stop.metric: {metric!r} must be an eval metric such as eval/loss [{source.of('early_stop.metric')}]"
        )
    if metric and cfg.trainer.eval_every == 0:
        raise ConfigError(
            "early_stop.metric is set but trainer.eval_every=0 evaluates only at the end; set trainer.eval_every=N "
            f"[{source.of('early_stop.metric', 'trainer.eval_every')}]"
        )


def _check_field(key: str, value: Any, meta: dict[str, Any], where: str) -> None:
    # NaN passes every comparison and inf every minimum: a run would train to a NaN model and exit 0.
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value} is not a finite number; write a number like 3e-4 [{where}]")
    if "choices" in meta and value not in meta["choices"]:
        options = " | ".join(map(str, meta["choices"]))
        raise ConfigError(f"{key}: {value!r} is not one of {options} [{where}]")
    if "min" in meta and value is not None and value < meta["min"]:
        raise ConfigError(f"{key}: {value} is below the minimum {meta['min']} [{where}]")
    if "max" in meta and value is not None and value > meta["max"]:
        raise ConfigError(f"{key}: {value} is above the maximum {meta['max']} [{where}]")


def check_batch_divides(cfg: Config, world_size: int) -> None:
    """The global batch must split evenly into world_size ranks x grad_accum micro-batches."""
    parts = world_size * cfg.trainer.grad_accum
    if cfg.data.batch_size % parts:
        lower = (cfg.data.batch_size // parts) * parts or parts
        upper = lower + parts if lower < cfg.data.batch_size else lower
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} does not divide into {world_size} rank(s) x "
            f"trainer.grad_accum={cfg.trainer.grad_accum}; use a multiple of {parts}, e.g. "
            f"data.batch_size={upper}"
        )
    if cfg.data.eval_batch_size % world_size:
        fixed = -(-cfg.data.eval_batch_size // world_size) * world_size
        raise ConfigError(
            f"data.eval_batch_size: {cfg.data.eval_batch_size} does not divide into {world_size} rank(s); "
            f"use data.eval_batch_size={fixed}"
        )


def _walk(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, dict[str, Any]]]:
    for fld in dataclasses.fields(obj):
        value = getattr(obj, fld.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value, prefix + fld.name + ".")
        else:
            yield prefix + fld.name, value, dict(fld.metadata)


# ----------------------------------------------------------------------------------------- dump


def to_dict(cfg: Config, redact: bool = True) -> dict[str, Any]:
    """The config as plain data; with `redact`, values under secret-looking keys are replaced
    (disttrain.secrets)."""
    data = dataclasses.asdict(cfg)
    return redact_tree(data) if redact else data


def dump_yaml(cfg: Config) -> str:
    """The resolved, redacted config as YAML (what RUN_DIR/config.yaml holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def get_dotted(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def config_hash(cfg: Config) -> str:
    """sha256 of the resolved, redacted config; goes into checkpoint manifests."""
    text = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every leaf key: used for the README config reference and `disttrain config`."""
    rows: list[tuple[str, Any, str]] = []
    hints = typing.get_type_hints(cls)
    default = cls()
    for fld in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[fld.name]):
            rows += field_docs(hints[fld.name], prefix + fld.name + ".")
        else:
            rows.append((prefix + fld.name, getattr(default, fld.name), fld.metadata.get("doc", "")))
    return rows
