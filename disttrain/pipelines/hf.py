"""HuggingFace transformers causal language models, without glue (`pip install 'disttrain[hf]'`).

    pipeline.target: disttrain.pipelines.hf:CausalLM
    pipeline.args:
      model: {model_type: gpt2, n_layer: 2, n_head: 4, n_embd: 128, n_positions: 128, vocab_size: 256}
      train: data/train.jsonl          # tokenised: one {"input_ids": [...]} a line; streamed
      eval: data/eval.jsonl
      block_size: 128

The model is built from a transformers config (random init, seeded alike on every rank) or loaded from
a local `save_pretrained` folder (`pretrained: DIR`). Batches are dicts (input_ids, attention_mask,
labels) and the loss is the model output's own. Tied weights (GPT-2's lm_head and wte) stay one tensor
in training and resume; `disttrain ckpt export RUN --hf --out DIR` writes a folder `from_pretrained`
loads, with the tie restored (see `export_pretrained`).
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from disttrain.errors import ConfigError
from disttrain.pipelines.base import Batch, Pipeline
from disttrain.pipelines.pretrained import save_pretrained
from disttrain.stream import HFStream, JsonlStream, Stream

CORPUS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "corpus.txt")
IGNORE = -100  # label of padding: cross_entropy's ignore_index, and what transformers' losses skip


class CausalLM(Pipeline):
    """Next-token prediction with a transformers `AutoModelForCausalLM`.

    Data (tokenised already): `train`/`eval` is a JSON-lines file or folder of `{"input_ids": [...]}`
    records (the train split is streamed: O(1) resume, any size), or a `datasets.save_to_disk` folder
    (map-style, memory-mapped); `train_hf` streams any HuggingFace dataset (`datasets.load_dataset`
    arguments). Each record becomes one sample of `block_size` tokens: longer ones are truncated,
    shorter ones padded (masked out of attention and loss). Without data, the corpus shipped with
    disttrain is used, one byte per token (vocab_size >= 256).
    """

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        pretrained: str = "",
        train: str = "",
        eval: str = "",
        train_hf: dict[str, Any] | None = None,
        block_size: int = 128,
    ):
        self.config = hf_config(model, pretrained)
        self.pretrained, self.block_size = pretrained, block_size
        self.train, self.eval, self.train_hf = train, eval, train_hf
        _check_data(self.config, train, eval, train_hf, block_size)

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        if self.pretrained:
            model = AutoModelForCausalLM.from_pretrained(self.pretrained, local_files_only=True)
        else:
            model = AutoModelForCausalLM.from_config(self.config)  # random init from the seeded torch RNG
        return with_causal_lm_loss(model)

    def datasets(self) -> dict[str, Dataset]:
        if not (self.train or self.train_hf):
            return _corpus_splits(self.block_size)
        sample = Fixed(self.block_size)
        train: Dataset = (
            _split(self.train, sample, stream=True) if self.train else _hf_stream(self.train_hf, sample)
        )
        return {"train": train, **({"eval": _split(self.eval, sample, stream=False)} if self.eval else {})}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**batch).loss  # transformers shifts the labels and skips IGNORE

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        valid = labels != IGNORE
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        return {"loss": loss, "accuracy": ((logits.argmax(-1) == labels) & valid).sum(), "count": valid.sum()}

    def tp_plan(self, model: nn.Module, mesh: Any) -> dict[str, Any]:
        """Llama-class blocks from transformers' own plan, GPT-2's Conv1D blocks (pipelines/hf_tp.py)."""
        from disttrain.pipelines.hf_tp import causal_lm_plan

        return causal_lm_plan(model, mesh.size())

    def num_tokens(self, batch: Batch) -> torch.Tensor:
        """Tokens the model reads, padding excluded (train/tokens_per_sec); a tensor: no host sync."""
        return batch["attention_mask"].sum()

    def flops_per_sample(self) -> float | None:
        """Training FLOPs per sample of block_size tokens (train/mfu): 6 per matmul weight per token
        (forward 2, backward 4), the output head included, plus attention's scores and weighted sum,
        12 x layers x block_size x hidden per token (PaLM, appendix B; as tiny_gpt counts). Embedding
        lookups are no FLOPs; padding is computed, so it counts. Dense models: an MoE's experts all
        count. None when the config does not say its layers and width."""
        layers = getattr(self.config, "num_hidden_layers", None)
        hidden = getattr(self.config, "hidden_size", None)
        if not (isinstance(layers, int) and isinstance(hidden, int)):
            return None
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # shapes only: no memory, no init
            weights = matmul_weights(AutoModelForCausalLM.from_config(self.config))
        t = self.block_size
        return float(t * (6 * weights + 12 * layers * t * hidden))

    @classmethod
    def export_pretrained(cls, args: dict[str, Any], weights: dict[str, torch.Tensor], out: str) -> None:
        """Write a checkpoint's weights as a `from_pretrained` folder (config.json, model.safetensors),
        from the config alone (no data path needs to exist where the export runs)."""
        from transformers import AutoModelForCausalLM

        config = hf_config(args.get("model"), str(args.get("pretrained") or ""))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        save_pretrained(model, weights, out, cls.__name__)


def with_causal_lm_loss(model: Any) -> nn.Module:
    """transformers 5 picks a model's loss from its class name (`...ForCausalLM`); a class named
    otherwise (GPT2LMHeadModel) gets `loss_type=None`, warns on every rank at the first forward and
    falls back to the causal LM loss. Name that loss on the model: the same loss, no warning."""
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    return model


def matmul_weights(model: nn.Module) -> int:
    """Weights used in a matrix product per token: every module's own weights of 2+ dims except an
    embedding's (a lookup). A tied output head counts as the matmul it is."""
    return sum(
        p.numel()
        for m in model.modules()
        if not isinstance(m, nn.Embedding)
        for p in m.parameters(recurse=False)
        if p.dim() >= 2
    )


def hf_config(model: dict[str, Any] | None, pretrained: str) -> Any:
    """The transformers config of `model` (a dict with model_type) or of a local pretrained folder."""
    if bool(model) == bool(pretrained):
        raise ConfigError(
            "pipeline.args: give exactly one of model={model_type: gpt2, ...} (a transformers config, random "
            "init) and pretrained=DIR (a local save_pretrained folder)"
        )
    transformers = _transformers()
    config = (
        _pretrained_config(transformers, pretrained) if pretrained else _new_config(transformers, model or {})
    )
    return config


def _pretrained_config(transformers: Any, pretrained: str) -> Any:
    if not os.path.isfile(os.path.join(pretrained, "config.json")):
        raise ConfigError(
            f"pipeline.args.pretrained: {pretrained!r} has no config.json; give a save_pretrained folder"
        )
    return transformers.AutoConfig.from_pretrained(pretrained, local_files_only=True)


def _new_config(transformers: Any, model: dict[str, Any]) -> Any:
    kwargs = dict(model)
    kind = str(kwargs.pop("model_type", ""))
    known = sorted(transformers.CONFIG_MAPPING.keys())
    if kind not in known:
        close = difflib.get_close_matches(kind, known, n=1)
        hint = f"did you mean {close[0]}?" if close else "e.g. gpt2, llama, qwen2"
        raise ConfigError(
            f"pipeline.args.model.model_type: {kind!r} is not a transformers model type; {hint}"
        )
    _check_keys(transformers.CONFIG_MAPPING[kind], kind, kwargs)
    return transformers.AutoConfig.for_model(kind, **kwargs)


def _transformers() -> Any:
    try:
        import transformers
    except ModuleNotFoundError:
        raise ConfigError(
            "the HuggingFace pipelines need transformers: pip install 'disttrain[hf]'"
        ) from None
    return transformers


def _check_keys(config_cls: Any, kind: str, kwargs: dict[str, Any]) -> None:
    """transformers configs accept any key silently; a typo would train the default instead."""
    accepted = set(config_cls().to_dict()) | set(getattr(config_cls, "attribute_map", {}))
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=1)
            hint = f"did you mean {close[0]}?" if close else "see the model's config class"
            raise ConfigError(f"pipeline.args.model.{key}: {kind} configs have no key {key!r}; {hint}")


def _check_data(config: Any, train: str, eval: str, train_hf: Any, block_size: int) -> None:
    if train and train_hf:
        raise ConfigError(
            "pipeline.args: give train (a local path) or train_hf (load_dataset arguments), not both"
        )
    for key, path in (("train", train), ("eval", eval)):
        if path and not os.path.exists(path):
            raise ConfigError(
                f"pipeline.args.{key}: {path!r} does not exist; give a .jsonl file or folder, or a save_to_disk folder"
            )
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and block_size > limit:
        raise ConfigError(
            f"pipeline.args.block_size: {block_size} is more than the model's {limit} positions"
        )
    if not (train or train_hf) and getattr(config, "vocab_size", 256) < 256:
        raise ConfigError(
            "pipeline.args: the built-in corpus has 256 byte tokens; give the model vocab_size >= 256"
        )


class Fixed:
    """A tokenised record -> a sample of exactly `block` tokens: input_ids, attention_mask, labels."""

    def __init__(self, block: int):
        self.block = block

    def __call__(self, record: Any) -> dict[str, torch.Tensor]:
        ids = torch.as_tensor(record["input_ids"], dtype=torch.long)[: self.block]
        pad = self.block - len(ids)
        mask = torch.cat([torch.ones(len(ids), dtype=torch.long), torch.zeros(pad, dtype=torch.long)])
        return {
            "input_ids": F.pad(ids, (0, pad)),
            "attention_mask": mask,
            "labels": F.pad(ids, (0, pad), value=IGNORE),
        }


class Records(Dataset):
    """Map-style records (a list, or a HuggingFace datasets.Dataset) through a transform."""

    def __init__(self, records: Any, transform: Fixed):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.transform(self.records[i])


def _split(path: str, sample: Fixed, stream: bool) -> Dataset:
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json")):
        from datasets import load_from_disk

        return Records(load_from_disk(path), sample)  # memory-mapped Arrow: map-style at any size
    if stream:
        return JsonlStream(path, transform=sample)
    return Records([record for record, _ in JsonlStream(path).read(0, 1, 0, None)], sample)


def _hf_stream(kwargs: dict[str, Any] | None, sample: Fixed) -> Stream:
    from datasets import load_dataset

    return HFStream(load_dataset(**{"split": "train", **(kwargs or {})}, streaming=True), transform=sample)


class TokenWindows(Dataset):
    """Consecutive windows of `block` tokens from one long token sequence."""

    def __init__(self, tokens: torch.Tensor, block: int):
        self.tokens, self.block = tokens, block

    def __len__(self) -> int:
        return len(self.tokens) // self.block

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.tokens[i * self.block : (i + 1) * self.block]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _corpus_splits(block: int) -> dict[str, Dataset]:
    with open(CORPUS, "rb") as fh:
        tokens = torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8).long()
    cut = int(0.95 * len(tokens))
    return {"train": TokenWindows(tokens[:cut], block), "eval": TokenWindows(tokens[cut:], block)}
