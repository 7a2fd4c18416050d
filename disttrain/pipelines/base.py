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
import traceback
import types
import typing
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from disttrain import fs
from disttrain.config import PipelineConfig
from disttrain.errors import ConfigError

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

    def tp_plan(self, model: nn.Module, mesh: Any) -> dict[str, Any] | None:
        """With parallel.tp > 1, how the model's layers are split over the tp ranks: {module name: a
        torch.distributed.tensor.parallel style} for `parallelize_module` over `mesh` (the 1-D tp mesh),
        e.g. ColwiseParallel() then RowwiseParallel() for a block's attention and MLP. Modules left out
        are replicated on every tp rank. Raise disttrain.errors.ConfigError when a size does not divide
        by mesh.size(). None: the model has no plan (tp > 1 is refused)."""
        return None

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Sums over the batch, plus "count". disttrain adds them over all batches and ranks, then reports
        each as sum / count: return {"loss": loss_sum, "accuracy": n_correct, "count": n} to get the mean
        loss and accuracy. Sums make distributed metrics exact: no sample is counted twice."""
        raise NotImplementedError

    # ------------------------------------------------------------ optional: override what you need

    train_metrics: tuple[str, ...] = ()
    """Names the pipeline logs with `log_metric` (declared, so every rank reduces the same list)."""

    def log_metric(self, name: str, value: torch.Tensor | float) -> None:
        """Call from `loss()`: a training metric logged as train/NAME on the log cadence, averaged over
        micro-batches, steps and ranks like train/loss (no collective here; the value stays on its
        device until the log step). NAME must be listed in `train_metrics`."""
        if name not in self.train_metrics:
            raise ConfigError(
                f"{type(self).__name__}.log_metric({name!r}): declare it first, e.g. "
                f"train_metrics = {(*self.train_metrics, name)!r} in the class"
            )
        logged = self.__dict__.setdefault("_logged", {})  # subclasses need not call __init__
        value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
        total, count = logged.get(name, (0.0, 0))
        logged[name] = (total + value, count + 1)

    def take_logged(self) -> dict[str, tuple[Any, int]]:
        """What `log_metric` collected since the last call: {name: (sum, count)}. Used by the trainer."""
        return self.__dict__.pop("_logged", None) or {}

    def num_tokens(self, batch: Batch) -> int | torch.Tensor:
        """Tokens in a micro-batch (an int, or a tensor such as a mask's sum): gives train/tokens_per_sec.
        Not overridden: the pipeline's data is not counted in tokens."""
        raise NotImplementedError

    def flops_per_sample(self) -> float | None:
        """Training FLOPs (forward + backward) per sample, e.g. 6 x parameters x tokens for a
        transformer: gives train/mfu on GPUs whose peak disttrain knows. None: not reported."""
        return None

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The model's repeated blocks (transformer layers): what trainer.activation_checkpointing
        recomputes in backward instead of keeping their activations."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        """Parameter groups for the optimizer optim.name builds: a list of {"params": [...], ...} with
        per-group options (lr, weight_decay, ...); options left out take optim.*. None: weight decay
        on matrices and embeddings only, one learning rate."""
        return None

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer | None:
        """Your own optimizer over the model's parameters (the LR schedule then scales each group's
        lr). None: disttrain builds optim.name over param_groups()."""
        return None

    @classmethod
    def export_pretrained(cls, args: dict[str, Any], weights: dict[str, torch.Tensor], out: str) -> None:
        """`disttrain ckpt export RUN --hf --out DIR`: write a checkpoint's `weights` (every state_dict
        key) as a folder transformers' `from_pretrained` loads; `args` are the run's pipeline.args.

        The default builds this pipeline from `args` and its model on the meta device (no memory, no
        init; a normal build if the model refuses the meta device, as `from_pretrained` does). A model
        that is a transformers `PreTrainedModel` gets the weights, its ties made again, and is written
        with `save_pretrained`; any other model is refused (ConfigError: exit 2). Override it when the
        model wraps a transformers model (write the inner one's weights, without your prefix)."""
        from disttrain.pipelines.pretrained import save_pretrained

        pipeline = _construct(cls, args)
        try:
            with torch.device("meta"):
                model = pipeline.build_model()
        except Exception:  # e.g. from_pretrained refuses a meta device: build it for real instead
            model = _built(pipeline)
        save_pretrained(model, weights, out, cls.__name__)


def load_pipeline(cfg: PipelineConfig) -> Pipeline:
    """Import `package.module:ClassName` and construct it with `cfg.args`. Raises ConfigError, also for
    a module that does not import and a constructor that raises: both are input the run cannot start
    from, so they get one line naming the file and line, not a traceback."""
    return _construct(pipeline_class(cfg.target), cfg.args)


def _construct(cls: type[Pipeline], args: dict[str, Any]) -> Pipeline:
    """cls(**args), its arguments checked first; ConfigError for what the constructor refuses."""
    _check_args(cls, args)
    try:
        return cls(**args)
    except Exception as err:
        raise ConfigError(
            f"pipeline.args: {cls.__name__}({', '.join(args)}) raised {_described(err)}; fix the "
            "arguments or the constructor"
        ) from None


def pipeline_class(target: str) -> type[Pipeline]:
    """The Pipeline subclass `package.module:ClassName` names, imported, not constructed. Raises ConfigError."""
    module_name, _, class_name = target.partition(":")
    module = _import(module_name)
    cls = getattr(module, class_name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Pipeline)):
        raise ConfigError(
            f"pipeline.target: {module_name} has no Pipeline subclass named {class_name!r}; "
            "write pipeline.target=package.module:ClassName"
        )
    return cls


def _import(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"pipeline.target: cannot import module {module_name!r} ({fs.first_line(err)}); check the name and that the "
            "package is installed or on PYTHONPATH"
        ) from None
    except SyntaxError as err:
        raise ConfigError(
            f"pipeline.target: {module_name} has a syntax error at {err.filename}:{err.lineno}: {err.msg}; "
            "fix the module"
        ) from None
    except Exception as err:  # the module's own code raised while it was imported
        raise ConfigError(
            f"pipeline.target: importing {module_name} raised {_described(err)}; fix the module"
        ) from None


def _built(pipeline: Pipeline) -> nn.Module:
    try:
        return pipeline.build_model()
    except Exception as err:
        raise ConfigError(f"{type(pipeline).__name__}.build_model() raised {_described(err)}") from None


def _described(err: BaseException) -> str:
    """`ValueError: message (at path/file.py:12)`: where the innermost frame of the error was."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {fs.first_line(err)}{where}"


def _check_args(cls: type, args: dict[str, Any]) -> None:
    params = inspect.signature(cls).parameters  # the constructor's, without self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [name for name in params if name != "self"]
    for key in args:
        if key not in accepted:
            import difflib

            close = difflib.get_close_matches(key, accepted, n=1)
            hint = (
                f"did you mean pipeline.args.{close[0]}?" if close else f"it accepts: {', '.join(accepted)}"
            )
            raise ConfigError(f"pipeline.args.{key}: {cls.__name__} has no argument {key!r}; {hint}")
    _check_arg_types(cls, args)


# Constructor annotations disttrain can check before anything is built: a YAML value of the wrong type
# (`pipeline.args.width=abc`) would otherwise fail deep inside the model's code, after setup.
_ANNOTATED = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
              dict: "a mapping"}  # fmt: skip


def _check_arg_types(cls: type, args: dict[str, Any]) -> None:
    try:
        hints = typing.get_type_hints(cls.__init__)  # type: ignore[misc]
    except Exception:  # an annotation that does not resolve here: nothing to check against
        return
    for key, value in args.items():
        expected = _plain_type(hints.get(key))
        if expected is None or (value is None and _optional(hints.get(key))) or _fits(value, expected):
            continue
        raise ConfigError(
            f"pipeline.args.{key}: expected {_ANNOTATED[expected]} ({cls.__name__} declares "
            f"{key}: {expected.__name__}), got {value!r}"
        )


def _plain_type(hint: Any) -> type | None:
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _optional(hint) else [hint]
    base = (typing.get_origin(args[0]) or args[0]) if len(args) == 1 else None
    return base if base in _ANNOTATED else None


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _fits(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)
