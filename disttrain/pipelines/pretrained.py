"""Writing a checkpoint's weights as a transformers `save_pretrained` folder (`disttrain ckpt export
--hf`). Its own module so that the Pipeline base class can offer it without importing the HF
pipeline, which imports the base class."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from disttrain.errors import ConfigError


def save_pretrained(model: Any, weights: dict[str, torch.Tensor], out: str, owner: str) -> None:
    """A checkpoint's `weights` (every state_dict key, a tied one as a copy or the same tensor) into
    `model` (a transformers PreTrainedModel, built on the meta device or not), written as a folder
    `from_pretrained` loads. Assigning gives each key its own tensor, so the ties are made again
    before save_pretrained, which then writes each shared tensor once, as transformers expects.
    Raises ConfigError for a model that is not a PreTrainedModel, ValueError for tied tensors that
    differ in the checkpoint."""
    if not is_pretrained(model):
        raise ConfigError(
            f"the run's pipeline {owner} builds a {type(model).__name__}, not a transformers PreTrainedModel, "
            "and defines no export_pretrained; drop --hf to export safetensors (or define it: README, "
            "HuggingFace models)"
        )
    _check_ties(model, weights)
    model.load_state_dict(weights, assign=True)
    model.tie_weights()
    model.save_pretrained(out)


def is_pretrained(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ModuleNotFoundError:  # without transformers no model is one of its classes
        return False
    return isinstance(model, PreTrainedModel)


def _check_ties(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        for other in names[1:]:
            if (
                other in weights
                and names[0] in weights
                and not torch.equal(weights[other], weights[names[0]])
            ):
                raise ValueError(f"{other} and {names[0]} are tied in the model but differ in the checkpoint")
