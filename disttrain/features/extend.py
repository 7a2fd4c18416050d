"""Hooks named in the config by import path, and the hooks the config's features switch on.

    hooks:
      - target: mypkg.hooks:LogGradHistogram     # a disttrain.hooks.Hook subclass
        args: {every: 100}                       # keyword arguments of its constructor
      - mypkg.hooks:Notify                       # no arguments: the path alone

Config hooks run after the stock ones, in the order listed, on every rank; a stateful one
(`state_dict`/`load_state_dict`) is saved in checkpoints under its class name like any hook.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from disttrain import fs
from disttrain.config import Config, HookSpec
from disttrain.errors import ConfigError
from disttrain.features.early_stop import EarlyStopHook
from disttrain.features.ema import EMAHook
from disttrain.features.profiler import ProfilerHook
from disttrain.hooks import Hook
from disttrain.writers import EventLog, RunFiles


def feature_hooks(cfg: Config, cuda: bool, events: EventLog, files: RunFiles) -> list[Hook]:
    """The hooks of the features the config turns on. They run before the stock hooks: the EMA update
    belongs to the step it follows (eval and the checkpoint of that step must see it), and the profiler
    traces the steps, not the eval or save that may follow the last one."""
    hooks: list[Hook] = []
    if cfg.ema.decay > 0:
        hooks.append(EMAHook(cfg.ema.decay, cfg.ema.warmup_steps))
    if cfg.profile.steps:
        hooks.append(ProfilerHook(cfg.profile.steps[0], cfg.profile.steps[1], cuda, events, files))
    if cfg.early_stop.metric:
        hooks.append(EarlyStopHook(cfg.early_stop))
    return hooks


def config_hooks(cfg: Config) -> list[Hook]:
    """The config's `hooks:`, built in order; they run after the stock hooks."""
    return [build_hook(spec, f"hooks[{i}]") for i, spec in enumerate(cfg.hooks)]


def build_hook(spec: HookSpec, key: str) -> Hook:
    """Import and construct one config hook. Raises ConfigError naming the key and what to write."""
    cls = _import(spec.target, key)
    _check_args(cls, spec.args, key)
    try:
        return cls(**spec.args)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{key}: {spec.target}({spec.args}) failed: {fs.first_line(err)}; fix {key}.args"
        ) from None


def _import(target: str, key: str) -> type[Hook]:
    module_name, _, name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{key}.target: cannot import {module_name!r} ({fs.first_line(err)}); check the name and that the package is "
            "installed or on PYTHONPATH"
        ) from None
    cls = getattr(module, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Hook)):
        raise ConfigError(f"{key}.target: {module_name} has no disttrain.hooks.Hook subclass named {name!r}")
    return cls


def _check_args(cls: type, args: dict[str, Any], key: str) -> None:
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for name in args:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = (
                f"did you mean {key}.args.{close[0]}?"
                if close
                else f"it accepts: {', '.join(accepted) or 'none'}"
            )
            raise ConfigError(f"{key}.args.{name}: {cls.__name__} has no argument {name!r}; {hint}")


def check_features(cfg: Config, pipeline: Any) -> None:
    """Preflight: what the features need from the pipeline and the hooks, refused before anything is
    built (cheap: no model, no data). Raises ConfigError."""
    from disttrain.pipelines import Pipeline

    if cfg.trainer.activation_checkpointing and type(pipeline).blocks is Pipeline.blocks:
        raise ConfigError(
            f"trainer.activation_checkpointing=true but {cfg.pipeline.target} does not say which modules are "
            "its blocks: define blocks(self, model) returning them, or set trainer.activation_checkpointing=false"
        )
    for i, spec in enumerate(cfg.hooks):
        _check_args(_import(spec.target, f"hooks[{i}]"), spec.args, f"hooks[{i}]")
    if cfg.trainer.compile:
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if cfg.trainer.compile_backend not in known:
            raise ConfigError(
                f"trainer.compile_backend: {cfg.trainer.compile_backend!r} is not a torch.compile backend; "
                "use inductor (the default), aot_eager or cudagraphs"
            )
