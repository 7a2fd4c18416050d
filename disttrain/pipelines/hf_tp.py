"""Tensor-parallel plans for transformers causal LMs (parallel.tp > 1 with pipelines.hf:CausalLM).

- Llama-class models (Llama, Mistral, Qwen2, ... : any with `config.base_model_tp_plan`): transformers'
  own plan strings translated to torch's styles (`colwise` -> ColwiseParallel, `rowwise` ->
  RowwiseParallel) over the decoder layers. The embedding and the output head stay whole on every tp
  rank (one code path for tied and untied heads; a vocabulary-parallel head is a later optimisation).
- GPT-2: no plan in transformers, and its `Conv1D` layers (weight [in, out]) are refused by torch's
  styles: Conv1DColwise / Conv1DRowwise (disttrain.tensor_parallel), the fused c_attn cut per part, and
  `attn.split_size` set to the local width (GPT-2 splits the fused output by it).

Heads and key/value heads must divide by tp: each rank computes whole heads (`view(..., -1, head_dim)`).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from disttrain.errors import ConfigError
from disttrain.tensor_parallel import (
    ColwiseParallel,
    Conv1DColwise,
    Conv1DRowwise,
    RowwiseParallel,
    check_divides,
)

STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def causal_lm_plan(model: nn.Module, tp: int) -> dict[str, Any]:
    """The plan for a transformers causal LM; exit 2 (ConfigError) for a model it does not know."""
    config: Any = getattr(model, "config", None)
    kind = getattr(config, "model_type", type(model).__name__)
    if kind == "gpt2":
        return _gpt2(model, config, tp)
    base = getattr(config, "base_model_tp_plan", None)
    if base:
        return _from_hf_plan(model, config, base, tp)
    raise ConfigError(
        f"parallel.tp={tp}: disttrain has no tensor-parallel plan for model_type {kind!r} (transformers gives "
        "none either); subclass CausalLM and define tp_plan(model, mesh), or use parallel.tp=1"
    )


def _from_hf_plan(model: nn.Module, config: Any, base: dict[str, str], tp: int) -> dict[str, Any]:
    check_divides("num_attention_heads", config.num_attention_heads, tp)
    check_divides(
        "num_key_value_heads", getattr(config, "num_key_value_heads", config.num_attention_heads), tp
    )
    prefix = getattr(model, "base_model_prefix", "model")
    plan: dict[str, Any] = {}
    for pattern, style in base.items():
        if style not in STYLES:
            raise ConfigError(
                f"parallel.tp={tp}: transformers' plan entry {pattern}: {style!r} has no torch style in disttrain "
                "(known: colwise, rowwise); define CausalLM.tp_plan for this model, or use parallel.tp=1"
            )
        plan[f"{prefix}.{pattern}"] = STYLES[style]()
    _check_matches(model, plan)
    return plan


def _gpt2(model: nn.Module, config: Any, tp: int) -> dict[str, Any]:
    check_divides("n_head", config.n_head, tp)
    plan: dict[str, Any] = {}
    for i, block in enumerate(model.transformer.h):  # type: ignore[union-attr, arg-type]
        p = f"transformer.h.{i}"
        plan[f"{p}.attn.c_attn"] = Conv1DColwise(parts=3)  # [q | k | v], each cut over tp
        plan[f"{p}.attn.c_proj"] = Conv1DRowwise()
        plan[f"{p}.mlp.c_fc"] = Conv1DColwise()
        plan[f"{p}.mlp.c_proj"] = Conv1DRowwise()
        block.attn.split_size = config.n_embd // tp  # the local q / k / v width
    return plan


def _check_matches(model: nn.Module, plan: dict[str, Any]) -> None:
    """Every plan entry must name modules of the model (a renamed layer would silently go unsplit)."""
    names = [n for n, _ in model.named_modules()]
    for pattern in plan:
        regex = re.compile(re.escape(pattern).replace(r"\*", r"[^.]+"))
        if not any(regex.fullmatch(n) for n in names):
            raise ConfigError(f"the tensor-parallel plan entry {pattern!r} matches no module of the model")
