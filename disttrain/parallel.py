"""How the model is distributed: `ddp` (replicated, through HuggingFace accelerate), `fsdp` (sharded
with PyTorch's FSDP2 `fully_shard`) or tp x fsdp (`parallel.tp` > 1: layers split over tp ranks with the
pipeline's plan, FSDP2 across the groups; disttrain.tensor_parallel), behind one small interface the
trainer uses for every step.

Why fsdp does not go through accelerate: accelerate 1.15 ignores its FSDP plugin on CPU (it silently
gives DDP), so CPU tests and GPU runs would not share a code path. `fully_shard` runs the same on gloo
(CPU) and NCCL (GPU); accelerate keeps what it does well for ddp (device placement, DDP, autocast, the
fp16 grad scaler).

The checkpoint layer (ckpt_sharded, ckpt_boxes) reads each sharded tensor's layout off its DTensor
placements (every rank's boxes of the whole tensor), so it saves and reshards any of these layouts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from disttrain import dist
from disttrain.ckpt_read import Loaded
from disttrain.ckpt_sharded import load_model, load_optimizer, parameter_names, split_state
from disttrain.config import Config
from disttrain.errors import ConfigError

MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]
State = dict[str, Any]
COMPILED_PREFIX = "_orig_mod."


@dataclass(frozen=True)
class ModelState:
    """What a checkpoint holds of the model and optimizer, in the strategy's layout: `shared` is saved
    once by rank 0 (whole tensors, or the unsharded rest); `shards` is this rank's rows of every sharded
    tensor and their layout (`ckpt_sharded`), None when nothing is sharded."""

    shared: State
    shards: tuple[dict[str, torch.Tensor], State] | None = None


class Strategy:
    """The trainer's view of a distributed model: forward on `model`, state under `module`'s names."""

    name = ""
    sharded = False
    device: torch.device
    model: nn.Module  # what forward is called on
    module: nn.Module  # the pipeline's own module: state_dict names, eval, export
    optimizer: torch.optim.Optimizer  # the torch optimizer
    stepper: Any  # what `step` goes through: the optimizer, or a wrapper holding the fp16 grad scaler
    scaler: Any = None  # fp16 grad scaler (ddp only)

    def setup(
        self,
        model: nn.Module,
        make_optimizer: MakeOptimizer,
        shard_units: list[nn.Module],
        tp_plan: Any = None,
    ) -> None:
        """Distribute `model` and build its optimizer; `tp_plan` is the pipeline's `tp_plan` method (tp only)."""
        raise NotImplementedError

    def data_parallel(self) -> tuple[int, int]:
        """(this rank's data-parallel rank, the data-parallel size): how the data is split. Every rank
        is its own data-parallel rank, except under tensor parallelism (a tp group reads one batch)."""
        return dist.rank(), dist.world_size()

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager[None]:
        """Context of one micro-batch; gradients are reduced across ranks on the `last` one only."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global norm of the reduced gradients (the same on every rank), clipped to max_norm when
        max_norm > 0. On the micro-batch that ends an optimizer step, before `step`."""
        raise NotImplementedError

    def step(self) -> None:
        """Apply the update (`grad_norm` first when clipping) and zero the gradients."""
        self.stepper.step()
        self.stepper.zero_grad(set_to_none=True)

    def drop_step(self) -> None:
        """Skip this update: drop the gradients."""
        self.stepper.zero_grad(set_to_none=True)

    def step_was_skipped(self) -> bool:
        """Whether the last `step` left the weights alone (an fp16 overflow)."""
        return False

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def to_device(self, batch: Any) -> Any:
        """A batch on this rank's device (non-blocking from pinned memory); a CPU batch as it is."""
        if self.device.type == "cpu":
            return batch
        from accelerate.utils import send_to_device

        return send_to_device(batch, self.device, non_blocking=True)

    def eval_needs_every_rank(self) -> bool:
        """Whether a forward is a collective (every rank must run one, even without data)."""
        return self.sharded

    def close(self) -> None:
        """Drop the references that keep communication state alive. Before the process group goes."""

    # The checkpoint layout is the strategy's: replicated here, row-sharded under fsdp.

    def model_state(self) -> ModelState:
        """The model, optimizer and grad scaler as a checkpoint holds them (one capture per save)."""
        return ModelState(
            {
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            }
        )

    def load_weights(self, loaded: Loaded) -> None:
        """The checkpoint's weights into the model (init_from, and the first part of every resume)."""
        if loaded.sharded:  # another layout: rows by name
            load_rows(self.module, loaded)
        else:
            load_whole(self.module, loaded.app["model"], loaded.path)

    def load_model_state(self, loaded: Loaded) -> None:
        """Weights, optimizer state and grad scaler from any checkpoint, into this layout."""
        self.load_weights(loaded)
        if loaded.sharded:
            names = parameter_names(self.module, self.optimizer)
            load_optimizer(self.optimizer, self.module, loaded.saved(names))
        else:
            self.optimizer.load_state_dict(loaded.app["optimizer"])
        if loaded.app.get("scaler") is not None and self.scaler is not None:
            self.scaler.load_state_dict(loaded.app["scaler"])


def build_strategy(cfg: Config) -> Strategy:
    """The strategy `trainer.strategy` names (tp x fsdp when parallel.tp > 1); initialises the process
    group. Must be called on all ranks."""
    if cfg.trainer.strategy == "fsdp":
        mesh = cfg.parallel.tp > 1 or cfg.parallel.dp_replicate > 1
        return MeshStrategy(cfg) if mesh else FSDPStrategy(cfg)
    return DDPStrategy(cfg)


# ------------------------------------------------------------------------------------------ ddp


class DDPStrategy(Strategy):
    """Replicated weights, gradients all-reduced by DDP, all through accelerate."""

    name = "ddp"

    def __init__(self, cfg: Config):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        self.cfg = cfg
        handlers: list[Any] = [
            # A rank that dies or hangs must not leave the others blocked forever in a collective.
            InitProcessGroupKwargs(timeout=dist.timeout(cfg.trainer.collective_timeout_s))
        ]
        if cfg.trainer.find_unused_parameters:  # a model trained on part of its heads: DDP must look for them
            handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
        self.accelerator = Accelerator(
            mixed_precision=cfg.trainer.mixed_precision,
            gradient_accumulation_steps=cfg.trainer.grad_accum,
            # accelerate only sets up CPU DDP (gloo) when told cpu=True; without a GPU, say so.
            cpu=cfg.trainer.cpu or not torch.cuda.is_available(),
            kwargs_handlers=handlers,
            step_scheduler_with_optimizer=False,
        )
        self.device = self.accelerator.device

    def setup(
        self,
        model: nn.Module,
        make_optimizer: MakeOptimizer,
        shard_units: list[nn.Module],
        tp_plan: Any = None,
    ) -> None:
        self.model, wrapped = self.accelerator.prepare(model, make_optimizer(model))
        self.module = uncompiled(self.accelerator.unwrap_model(self.model))
        self._wrapped = wrapped  # accelerate's optimizer: the fp16 scaler steps through it
        self.optimizer = wrapped.optimizer
        self.scaler = self.accelerator.scaler
        # accelerate's optimizer wrapper asks importlib on every call whether an optional package is
        # installed and inspects a signature (~0.12 ms a step); without a grad scaler (fp16) it only
        # forwards the call, so step the torch optimizer directly.
        self.stepper = wrapped if self.scaler is not None else self.optimizer

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager[None]:
        # accelerate counts micro-batches itself (gradient_accumulation_steps) and skips DDP's
        # all-reduce on all but the last; `last` agrees with its count by construction. With one
        # micro-batch there is nothing to skip (and its bookkeeping is a cost of every step).
        if self.cfg.trainer.grad_accum == 1:
            return contextlib.nullcontext()
        return self.accelerator.accumulate(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        # accelerate's backward divides by grad_accum (and scales for fp16); a division by one is an
        # autograd node every step for nothing (x / 1 is exact: the gradients are the same).
        if self.cfg.trainer.grad_accum == 1 and self.scaler is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def grad_norm(self, max_norm: float) -> torch.Tensor:
        if self.scaler is not None:
            self.accelerator.unscale_gradients()  # fp16: the norm of the true gradients
        # torch's clip directly: accelerate's wrapper adds a torch-version parse and a DTensor scan per call.
        return _clip_or_norm(list(self.module.parameters()), max_norm)

    def step_was_skipped(self) -> bool:
        return self.scaler is not None and bool(self.accelerator.optimizer_step_was_skipped)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.accelerator.autocast()

    def close(self) -> None:
        # DDP's reducer keeps its last gloo work objects, which hold tensors; freed at interpreter
        # shutdown they abort the process ("terminate called without an active exception").
        self.accelerator.free_memory()
        del self.model, self._wrapped, self.optimizer, self.stepper


# ----------------------------------------------------------------------------------------- fsdp


class FSDPStrategy(Strategy):
    """Parameters, gradients and optimizer state sharded over all ranks (FSDP2 `fully_shard`): each
    shard unit (a transformer block) is all-gathered just before its forward and backward and freed
    after, gradients are reduce-scattered."""

    name = "fsdp"
    sharded = True

    def __init__(self, cfg: Config):
        if cfg.trainer.mixed_precision == "fp16":
            raise ConfigError(
                "trainer.mixed_precision=fp16 with trainer.strategy=fsdp: fp16 needs a sharded grad scaler "
                "disttrain does not provide; use trainer.mixed_precision=bf16"
            )
        self.cfg = cfg
        cuda = torch.cuda.is_available() and not cfg.trainer.cpu
        self.device = dist.init_for_sharding(cuda, cfg.trainer.collective_timeout_s)

    def setup(
        self,
        model: nn.Module,
        make_optimizer: MakeOptimizer,
        shard_units: list[nn.Module],
        tp_plan: Any = None,
    ) -> None:
        # No model.to(device) first: fully_shard moves one unit at a time and keeps only its shard, so a
        # model that does not fit on one GPU whole never has to.
        dist.fully_shard(model, shard_units, device=self.device, **self._policies())
        self.model, self.module = model, uncompiled(model)
        self.optimizer = self.stepper = make_optimizer(model)  # over the sharded parameters (DTensors)

    def _policies(self) -> dict[str, Any]:
        mp = self.cfg.trainer.mixed_precision
        # bf16 compute; gradients reduced in fp32 unless told otherwise (fsdp.reduce_dtype).
        param = torch.bfloat16 if mp == "bf16" else None
        reduce = {"fp32": torch.float32, "bf16": torch.bfloat16}[self.cfg.fsdp.reduce_dtype]
        return {
            "param_dtype": param,
            "reduce_dtype": reduce if param is not None else None,
            "cpu_offload": self.cfg.fsdp.cpu_offload,
        }

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        # Reduce-scatter gradients only on the micro-batch that ends the optimizer step.
        self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
        yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.trainer.grad_accum).backward()  # the mean over the step's micro-batches

    def grad_norm(self, max_norm: float) -> torch.Tensor:
        # The norm of DTensor gradients is the true global norm: each rank's share of the sum of squares
        # is all-reduced inside; full_tensor() hands every rank the plain value.
        norm = _clip_or_norm(list(self.model.parameters()), max_norm)
        full = getattr(norm, "full_tensor", None)
        return full() if callable(full) else norm

    def close(self) -> None:
        del self.model, self.module, self.optimizer, self.stepper

    def model_state(self) -> ModelState:
        rows, layout, rest = split_state(self.module, self.optimizer)
        return ModelState({**rest, "scaler": None}, (rows, layout))

    def load_weights(self, loaded: Loaded) -> None:
        load_rows(self.module, loaded)  # every checkpoint is "another layout" to a sharded model

    def load_model_state(self, loaded: Loaded) -> None:
        self.load_weights(loaded)
        load_optimizer(
            self.optimizer, self.module, loaded.saved(parameter_names(self.module, self.optimizer))
        )


# ----------------------------------------------------------------------------------------- tp x fsdp


class MeshStrategy(FSDPStrategy):
    """FSDP2 on a (dp_replicate, dp_shard, tp) mesh, tp innermost: tensor parallel inside groups of
    `parallel.tp` consecutive ranks (the pipeline's `tp_plan`), FSDP2 over dp_shard, and with
    `parallel.dp_replicate` > 1 hybrid sharding (HSDP: each replica group holds the whole model sharded,
    gradients are all-reduced across groups). Every parameter is a DTensor on the mesh. The ranks of a tp
    group read one batch, so the data is split by the data-parallel rank (replica x shard). The step, the
    grad norm (DTensor norms count each shard once, replicas not at all) and the checkpoint (pieces with
    their boxes, ckpt_sharded) are fsdp's."""

    name = "mesh"

    def __init__(self, cfg: Config):
        import os

        world, p = int(os.environ.get("WORLD_SIZE", "1")), cfg.parallel
        if world % (p.dp_replicate * p.tp):  # before the process group: every rank refuses alike
            raise ConfigError(
                f"parallel.dp_replicate={p.dp_replicate} x parallel.tp={p.tp} does not divide the world size "
                f"{world}; pick sizes whose product divides it"
            )
        super().__init__(cfg)
        from disttrain import tensor_parallel

        shard = world // (p.dp_replicate * p.tp)
        self.mesh = tensor_parallel.build_mesh(self.device.type, p.dp_replicate, shard, p.tp)

    def data_parallel(self) -> tuple[int, int]:
        from disttrain import tensor_parallel

        return tensor_parallel.dp_rank_size(self.mesh)

    def setup(
        self,
        model: nn.Module,
        make_optimizer: MakeOptimizer,
        shard_units: list[nn.Module],
        tp_plan: Any = None,
    ) -> None:
        from disttrain import tensor_parallel

        tp = self.cfg.parallel.tp
        if tp > 1:
            plan = tp_plan(model, self.mesh["tp"]) if tp_plan is not None else None
            if not plan:
                raise ConfigError(
                    f"parallel.tp={tp}: the pipeline {self.cfg.pipeline.target} has no tensor-parallel plan for "
                    "its model; define Pipeline.tp_plan(model, mesh), or use parallel.tp=1"
                )
            tensor_parallel.apply_plan(model, self.mesh["tp"], plan)
        tensor_parallel.fsdp_over_dp(
            model, shard_units, tensor_parallel.fsdp_mesh(self.mesh), self._policies()
        )
        self.model, self.module = model, uncompiled(model)
        self.optimizer = self.stepper = make_optimizer(model)


def _clip_or_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The total norm of the parameters' gradients, clipping them to max_norm when max_norm > 0."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


# ------------------------------------------------------------------------------ loading weights


def load_rows(module: nn.Module, loaded: Loaded) -> None:
    """Weights by name and rows, from a checkpoint of any layout and world size, into this rank's."""
    saved = loaded.saved(None)
    check_shapes(module.state_dict(), saved.shapes("model/"), loaded.path)
    load_model(module, saved, loaded.path)


def load_whole(module: nn.Module, saved: dict[str, torch.Tensor], source: str) -> None:
    """Whole weights into a replicated model, refusing (as bad input, one line) tensors that do not fit."""
    saved = strip_compiled_names(saved)
    check_shapes(module.state_dict(), {k: tuple(v.shape) for k, v in saved.items()}, source)
    module.load_state_dict(saved)


def check_shapes(current: dict[str, torch.Tensor], saved: dict[str, tuple[int, ...]], source: str) -> None:
    hint = "restore the config or code the checkpoint was made with, or start a new run_dir"
    for name, tensor in current.items():
        if name not in saved:
            raise ConfigError(f"the checkpoint {source} has no tensor {name!r} that the model has; {hint}")
        if tuple(saved[name]) != tuple(tensor.shape):
            raise ConfigError(
                f"the checkpoint {source} does not fit the model: {name} is {tuple(saved[name])} there "
                f"but {tuple(tensor.shape)} now; {hint}"
            )
    extra = sorted(set(saved) - set(current))
    if extra:
        raise ConfigError(f"the checkpoint {source} has a tensor {extra[0]!r} the model lacks; {hint}")


def uncompiled(model: nn.Module) -> nn.Module:
    """The module under any torch.compile wrapper (a pipeline may compile inside build_model)."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod  # type: ignore[assignment]
    return model


def strip_compiled_names(state: dict[str, Any]) -> dict[str, Any]:
    """Weights saved under a compiled wrapper's names (`_orig_mod.x`, by disttrain before it kept the
    module's own names) under the module's names, so such checkpoints still load."""
    if not any(COMPILED_PREFIX in k for k in state):
        return state
    return {k.replace(COMPILED_PREFIX, ""): v for k, v in state.items()}
