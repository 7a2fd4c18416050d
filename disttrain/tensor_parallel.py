"""Tensor parallelism on torch's DTensor: the (dp, tp) mesh, the styles the built-in plans use, and
`parallelize` (the pipeline's plan over tp, then FSDP2 over dp).

Facts this module is built on (torch 2.13, checked on gloo/CPU; /work/research/tp in issue 22):

- Every parameter must end up a DTensor on the one 2-D mesh: clip_grad_norm_ refuses plain tensors mixed
  with DTensors, and FSDP over a mix gives 1-D and 2-D DTensors whose norms cannot be stacked. Modules the
  plan leaves alone (norms, embeddings) get `ReplicateParallel`: whole on every tp rank, no communication.
  Their inputs and output gradients are the same on every tp rank, so their gradients come out equal too.
- `parallelize_module` registers a new Parameter per module: a tied weight (an embedding shared with the
  output head) would become two and silently drift apart. The ties are re-made after the plan.
- A fused [q; k; v] weight cut row-wise would give rank 0 all of q and half of k. `FusedColwise` cuts each
  part (`_StridedShard(0, split_factor=3)`); FSDP then shards such a weight on dim 1, because its dim-0 cut
  of a strided tp shard is not expressible as placements (training is right, the metadata is not).
- tp is the inner mesh dim: a tp group is consecutive ranks, one node's fast links.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard

from disttrain.errors import ConfigError

# torch's styles, re-exported for pipelines' plans (a pipeline never imports torch.distributed itself).
__all__ = [
    "ColwiseParallel",
    "Conv1DColwise",
    "Conv1DRowwise",
    "FusedColwise",
    "ReplicateParallel",
    "RowwiseParallel",
]

Plan = dict[str, ParallelStyle]
PlanFn = Callable[[nn.Module, DeviceMesh], "Plan | None"]


DIMS = ("dp_replicate", "dp_shard", "tp")


def build_mesh(device_type: str, replicate: int, shard: int, tp: int) -> DeviceMesh:
    """The (dp_replicate, dp_shard, tp) mesh over all ranks, tp innermost. Must be called on all ranks."""
    logging.getLogger("torch.distributed.tensor._redistribute").addFilter(_quiet_norm_reduction)
    return init_device_mesh(device_type, (replicate, shard, tp), mesh_dim_names=DIMS)


def dp_rank_size(mesh: DeviceMesh) -> tuple[int, int]:
    """(data-parallel rank, size): replica-major over (dp_replicate, dp_shard); the tp ranks share one."""
    shard = mesh["dp_shard"].size()
    rank = mesh.get_local_rank("dp_replicate") * shard + mesh.get_local_rank("dp_shard")
    return rank, mesh["dp_replicate"].size() * shard


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """What FSDP shards over: dp_shard, or (dp_replicate, dp_shard) for hybrid sharding (HSDP: FSDP2
    replicates over the first dim, shards over the second)."""
    return mesh["dp_replicate", "dp_shard"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]


def _quiet_norm_reduction(record: logging.LogRecord) -> bool:
    """Drop DTensor's warning about the grad norm's two all-reduces (over dp, then tp) on every rank's
    first step: each hands every member of its group the same bits, so all ranks get one norm."""
    return "sequential all_reduce" not in record.getMessage()


def check_divides(what: str, size: int, tp: int) -> None:
    """A dimension a plan cuts over tp must divide evenly (local heads are `view(-1, head_dim)`)."""
    if size % tp:
        raise ConfigError(f"{what}={size} does not divide by parallel.tp={tp}; pick a tp that divides it")


# ------------------------------------------------------------------------------------------ styles


class ReplicateParallel(ParallelStyle):
    """A module whole on every tp rank: its parameters `Replicate()` DTensors, its inputs taken as the
    (identical) local tensors of every rank, its outputs handed back local."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, _replicate_params, _inputs_replicated, _outputs_local)


def _replicate_params(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for pname, p in list(module.named_parameters(recurse=False)):
        dt = distribute_tensor(p.data, mesh, [Replicate()], src_data_rank=None)  # each rank has the same init
        module.register_parameter(pname, nn.Parameter(dt, requires_grad=p.requires_grad))


def _inputs_replicated(module: nn.Module, inputs: Any, mesh: DeviceMesh) -> Any:
    return tuple(
        DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
        else x
        for x in inputs
    )


def _outputs_local(module: nn.Module, outputs: Any, mesh: DeviceMesh) -> Any:
    return outputs.to_local() if isinstance(outputs, DTensor) else outputs


class FusedColwise(ColwiseParallel):
    """ColwiseParallel for a fused weight of `parts` equal row blocks ([q; k; v]): each block is cut over
    tp, so rank r holds [q_r; k_r; v_r] and the local output splits into its parts with chunk(parts)."""

    def __init__(self, parts: int = 3):
        super().__init__()
        self.parts = parts

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        for pname, p in list(module.named_parameters(recurse=False)):
            # src_data_rank=None: every rank cuts its own identical copy (the scatter from rank 0 asserts
            # on an uneven _StridedShard in torch 2.13).
            dt = distribute_tensor(
                p, device_mesh, [_StridedShard(0, split_factor=self.parts)], src_data_rank=None
            )
            module.register_parameter(pname, nn.Parameter(dt, requires_grad=p.requires_grad))

    @staticmethod
    def _prepare_output_fn(output_layouts: Any, use_local_output: bool, mod: nn.Module, outputs: Any, device_mesh: DeviceMesh) -> Any:  # fmt: skip
        return outputs.to_local() if use_local_output else outputs  # locally [q_r | k_r | v_r]


def _copy_to_tp(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Identity forward; in backward the input gradient is summed over tp (Megatron's f)."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


class Conv1DColwise(ParallelStyle):
    """transformers' Conv1D (weight [in, out], y = x @ W + b, GPT-2) cut over its output columns; `parts`>1
    for a fused [q | k | v] (each part cut). The bias stays whole on tp and is sliced in forward (a 1-D
    strided bias under FSDP would get placements that do not describe it)."""

    def __init__(self, parts: int = 1):
        super().__init__()
        self.parts = parts

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        strided = self.parts > 1
        weight = _StridedShard(1, split_factor=self.parts) if strided else Shard(1)
        bias = _StridedShard(0, split_factor=self.parts) if strided else Shard(0)
        _register(module, "weight", device_mesh, weight)
        _register(module, "bias", device_mesh, Replicate())

        def forward(x: torch.Tensor) -> torch.Tensor:
            w: Any = module.weight
            b: Any = module.bias
            w, b = w.to_local(), b.redistribute(placements=[bias]).to_local()
            y = torch.addmm(b, _copy_to_tp(x, device_mesh).reshape(-1, x.shape[-1]), w)
            return y.view(*x.shape[:-1], -1)

        module.forward = forward
        return module


class Conv1DRowwise(ParallelStyle):
    """transformers' Conv1D cut over its input rows: the partial products are summed over tp."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _register(module, "weight", device_mesh, Shard(0))
        _register(module, "bias", device_mesh, Replicate())

        def forward(x: torch.Tensor) -> torch.Tensor:
            w: Any = module.weight
            b: Any = module.bias
            part = x.reshape(-1, x.shape[-1]) @ w.to_local()
            y = DTensor.from_local(part, device_mesh, [Partial()], run_check=False).redistribute(
                placements=[Replicate()]
            )
            out: Any = y + b
            return out.to_local().view(*x.shape[:-1], -1)

        module.forward = forward
        return module


def _register(module: nn.Module, name: str, mesh: DeviceMesh, placement: Any) -> None:
    p = getattr(module, name)
    dt = distribute_tensor(p.data, mesh, [placement], src_data_rank=None)
    module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))


# -------------------------------------------------------------------------------------- parallelize


def apply_plan(model: nn.Module, tp_mesh: DeviceMesh, plan: Plan) -> None:
    """The plan over tp, every other parameter replicated on tp, the ties made again. Must be called on all ranks."""
    ties = _ties(model)
    parallelize_module(model, tp_mesh, plan)
    rest = {name: ReplicateParallel() for name, m in model.named_modules() if _plain_params(m)}
    for name in rest:
        if any(True for child in model.get_submodule(name).children() for _ in child.parameters()):
            where = name or "the model"
            raise ConfigError(
                f"{where} holds parameters of its own besides sub-modules; give it an entry in the pipeline's "
                "tp_plan (e.g. ReplicateParallel())"
            )
    if rest:
        parallelize_module(model, tp_mesh, rest)  # type: ignore[arg-type]
    _retie(model, ties)
    _check_cuts(model, tp_mesh.size())


def _plain_params(module: nn.Module) -> bool:
    return any(not isinstance(p, DTensor) for p in module.parameters(recurse=False))


def _ties(model: nn.Module) -> list[tuple[str, str]]:
    """(alias, canonical) parameter names of shared Parameters, by full name."""
    first: dict[int, str] = {}
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(p), name)
        if canonical != name:
            out.append((name, canonical))
    return out


def _retie(model: nn.Module, ties: list[tuple[str, str]]) -> None:
    for alias, canonical in ties:
        keep = model.get_parameter(canonical)
        other = model.get_parameter(alias)
        if other is keep:
            continue
        if getattr(other, "placements", None) != getattr(keep, "placements", None):
            raise ConfigError(
                f"{alias} is tied to {canonical} but the tp_plan lays them out differently; give both the same "
                "style (or leave both out of the plan)"
            )
        owner, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(owner), leaf, keep)


def _check_cuts(model: nn.Module, tp: int) -> None:
    """Every dimension the plan cut must divide by tp (uneven tp shards would make heads straddle ranks)."""
    for name, p in model.named_parameters():
        for placement in getattr(p, "placements", ()):
            if isinstance(placement, (Shard, _StridedShard)):
                parts = tp * int(getattr(placement, "split_factor", 1))
                check_divides(f"{name} dim {placement.dim}", p.shape[placement.dim], parts)


def fsdp_over_dp(
    model: nn.Module, units: list[nn.Module], dp_mesh: DeviceMesh, policies: dict[str, Any]
) -> None:
    """FSDP2 over `dp_mesh` (fsdp_mesh): each unit, then the root. Must be called on all ranks."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=policies["param_dtype"], reduce_dtype=policies["reduce_dtype"])
    offload = CPUOffloadPolicy() if policies["cpu_offload"] else OffloadPolicy()
    for unit in [*units, model]:
        fully_shard(unit, mesh=dp_mesh, mp_policy=mp, offload_policy=offload, shard_placement_fn=_dp_dim)


def _dp_dim(param: nn.Parameter) -> Shard | None:
    """FSDP's dim: 1 for a 2-D weight whose tp cut is strided on dim 0 (see the module doc), else its default."""
    strided = any(isinstance(p, _StridedShard) and p.dim == 0 for p in getattr(param, "placements", ()))
    if strided and param.dim() == 1:
        raise ConfigError(
            f"a fused 1-D parameter of shape {tuple(param.shape)} cut with FusedColwise cannot be sharded by FSDP "
            "as well; drop the fused layer's bias or keep it out of the tp_plan"
        )
    return Shard(1) if strided else None
