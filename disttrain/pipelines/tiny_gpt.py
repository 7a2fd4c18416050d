"""A small decoder-only language model on a character-level corpus that ships with disttrain
(CPython standard-library docstrings). Sized by config; the GPU benchmark workload.

    pipeline.target: disttrain.pipelines.tiny_gpt:TinyGPTPipeline
    pipeline.args: {n_layer: 4, n_head: 4, d_model: 128, block_size: 128}
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from disttrain.pipelines.base import Batch, Pipeline

DEFAULT_CORPUS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "corpus.txt")


class CharWindows(Dataset):
    """Fixed windows of `block_size + 1` characters, `stride` apart: (input, next-char target)."""

    def __init__(self, tokens: torch.Tensor, block_size: int, stride: int):
        self.tokens = tokens
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - self.block_size - 1) // self.stride + 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.stride
        window = self.tokens[start : start + self.block_size + 1]
        return window[:-1], window[1:]


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.head_dim = d_model // n_head
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model, bias=False),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model, bias=False),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # Sizes from the tensors, not the config: under tensor parallelism this rank's qkv output is
        # [q_r | k_r | v_r], n_head / tp heads of each (tp_plan).
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=2)
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, -1)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, n_head: int, d_model: int, dropout: float):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))  # scaled residual init (GPT-2)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class TinyGPTPipeline(Pipeline):
    """Next-character prediction; splits are contiguous 90/5/5 slices of the corpus."""

    def __init__(
        self,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        block_size: int = 128,
        dropout: float = 0.0,
        stride: int | None = None,
        corpus: str | None = None,
    ):
        if d_model % n_head:
            from disttrain.errors import ConfigError

            raise ConfigError(f"pipeline.args.d_model: {d_model} must be a multiple of n_head={n_head}")
        self.dims: dict[str, Any] = dict(
            n_layer=n_layer, n_head=n_head, d_model=d_model, block_size=block_size, dropout=dropout
        )
        self.stride = stride or block_size
        self.corpus = corpus or DEFAULT_CORPUS
        self._text: str | None = None

    def _tokens(self) -> tuple[torch.Tensor, int]:
        if self._text is None:
            with open(self.corpus, encoding="utf-8") as fh:
                self._text = fh.read()
        chars = sorted(set(self._text))
        index = {ch: i for i, ch in enumerate(chars)}
        return torch.tensor([index[ch] for ch in self._text], dtype=torch.int64), len(chars)

    def build_model(self) -> nn.Module:
        _, vocab = self._tokens()
        return TinyGPT(vocab=vocab, **self.dims)

    def datasets(self) -> dict[str, Dataset]:
        tokens, _ = self._tokens()
        n = len(tokens)
        cut1, cut2 = int(0.9 * n), int(0.95 * n)
        block = self.dims["block_size"]
        return {
            "train": CharWindows(tokens[:cut1], block, self.stride),
            "eval": CharWindows(tokens[cut1:cut2], block, block),
            "test": CharWindows(tokens[cut2:], block, block),
        }

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    def eval_step(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = model(x).float()
        return {
            "loss": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"),
            "accuracy": (logits.argmax(-1) == y).sum(),
            "count": torch.tensor(y.numel()),
        }

    def num_tokens(self, batch: Batch) -> int:
        return int(batch[1].numel())  # every position of every window is a predicted token

    def flops_per_sample(self) -> float:
        """Training FLOPs per window: 6 per weight per token (forward 2, backward 4) for the matmul
        weights, plus attention's scores and weighted sum, 6 * 2 * n_layer * T * d_model per token
        (the PaLM paper's accounting, appendix B); embeddings' lookups are not FLOPs."""
        d, n, t = self.dims["d_model"], self.dims["n_layer"], self.dims["block_size"]
        _, vocab = self._tokens()
        weights = n * 12 * d * d + d * vocab  # qkv 3d², proj d², mlp 8d² per block; the output head
        return t * (6 * weights + 12 * n * t * d)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)  # type: ignore[arg-type]

    def tp_plan(self, model: nn.Module, mesh: Any) -> dict[str, Any]:
        """Megatron's split of each block: the fused qkv and the MLP's first layer cut by output
        columns (heads), the projections after them by input rows (one all-reduce each per direction);
        embeddings, norms and the head stay whole on every tp rank."""
        from disttrain.tensor_parallel import ColwiseParallel, FusedColwise, RowwiseParallel, check_divides

        check_divides("pipeline.args.n_head", self.dims["n_head"], mesh.size())
        plan: dict[str, Any] = {}
        for i in range(self.dims["n_layer"]):
            plan[f"blocks.{i}.qkv"] = FusedColwise(parts=3)  # rank r: [q_r; k_r; v_r]
            plan[f"blocks.{i}.proj"] = RowwiseParallel()
            plan[f"blocks.{i}.mlp.0"] = ColwiseParallel()
            plan[f"blocks.{i}.mlp.2"] = RowwiseParallel()
        return plan
