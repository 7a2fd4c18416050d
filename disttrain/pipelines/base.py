"""The extension point: a Pipeline provides the model, the data splits and the per-batch math.

A user writes, in their own package::

    class MyPipeline(Pipeline):
        def __init__(self, hidden: int = 64):
            self.hidden = hidden
        def build_model(self): return MyNet(self.hidden)
        def datasets(self): return {"train": ..., "eval": ..., "test": ...}
        def loss(self, model, batch): x, y = batch; return F.cross_entropy(model(x), y)
        def eval_step(self, model, batch): ...  # sums over the batch plus "count"

and runs it with `pipeline.target=mypkg.pipes:MyPipeline pipeline.args.hidden=128`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from disttrain.config import ConfigError, PipelineConfig

Batch = Any  # whatever the datasets' default collate produces: tensors, tuples or dicts of tensors


class Pipeline:
    """Base class for the user's model, data and loss.

    disttrain owns distribution, precision, accumulation, the sampler and the loop; a pipeline never
    calls torch.distributed and never moves data between ranks.
    """

    def build_model(self) -> nn.Module:
        """Create the model. Called once per rank after seeding, so every rank builds the same weights."""
        raise NotImplementedError

    def datasets(self) -> dict[str, Dataset]:
        """Datasets by split: "train" (required), "eval" and "test" (optional, map-style). "train" may be
        a stream (disttrain.stream.Stream, or a HuggingFace datasets.IterableDataset) instead."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar training loss of one micro-batch (a mean over its samples)."""
        raise NotImplementedError

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """With trainer.strategy=fsdp, the submodules sharded as units of their own (each all-gathered
        just before it runs and freed after): a transformer's blocks. The default is every module held
        in an nn.ModuleList; none means only the whole model is one unit."""
        return [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Sums over the batch, plus "count". disttrain adds them over all batches and ranks, then reports
        each as sum / count: return {"loss": loss_sum, "accuracy": n_correct, "count": n} to get the mean
        loss and accuracy. Sums make distributed metrics exact: no sample is counted twice."""
        raise NotImplementedError


def load_pipeline(cfg: PipelineConfig) -> Pipeline:
    """Import `package.module:ClassName` and construct it with `cfg.args`. Raises ConfigError."""
    cls = pipeline_class(cfg.target)
    _check_args(cls, cfg.args)
    return cls(**cfg.args)


def pipeline_class(target: str) -> type[Pipeline]:
    """The Pipeline subclass `package.module:ClassName` names, imported, not constructed. Raises ConfigError."""
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"pipeline.target: cannot import module {module_name!r} ({err}); check the name and that the "
            "package is installed or on PYTHONPATH"
        ) from None
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Pipeline)):
        raise ConfigError(
            f"pipeline.target: {module_name} has no Pipeline subclass named {class_name!r}; "
            "write pipeline.target=package.module:ClassName"
        )
    return cls


def _check_args(cls: type, args: dict[str, Any]) -> None:
    params = inspect.signature(cls).parameters  # the constructor's, without self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [name for name in params if name != "self"]
    for key in args:
        if key not in accepted:
            import difflib

            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean pipeline.args.{close[0]}?" if close else f"it accepts: {', '.join(accepted)}"
            raise ConfigError(f"pipeline.args.{key}: {cls.__name__} has no argument {key!r}; {hint}")
