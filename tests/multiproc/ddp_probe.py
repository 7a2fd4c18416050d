"""Run under torchrun by test_ddp.py: one DDP optimizer step and one distributed eval, each compared on
rank 0 against the same computation done in a single process over the full global batch."""

from __future__ import annotations

import json
import sys

import torch
from torch.utils.data._utils.collate import default_collate

from disttrain import dist
from disttrain.cluster import detect
from disttrain.config import load_config
from disttrain.data import epoch_order
from disttrain.trainer import Trainer, build_trainer


def main(out: str, overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    trainer = build_trainer(cfg, detect())
    model = trainer.module
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.train_step(iter(trainer.data.loader(worker_seed=0)))
    after = {k: v.detach().clone() for k, v in model.state_dict().items()}
    distributed_eval = trainer.evaluator.evaluate("eval")
    if dist.is_main():
        report = {"world": dist.world_size(), **_reference_step(trainer, before, after)}
        report["eval_dist"], report["eval_single"] = distributed_eval, _reference_eval(trainer, model)
        with open(out, "w") as fh:
            json.dump(report, fh)
    trainer.close()
    dist.destroy()


def _reference_step(trainer: Trainer, before: dict, after: dict) -> dict:
    """Plain SGD on the whole global batch in one process: w1 = w0 - lr * grad."""
    cfg, ds = trainer.cfg, trainer.data.dataset
    ref = trainer.pipeline.build_model()
    ref.load_state_dict(before)
    ids = epoch_order(len(ds), cfg.seed, 0, cfg.data.shuffle)[: cfg.data.batch_size].tolist()
    trainer.pipeline.loss(ref, default_collate([ds[i] for i in ids])).backward()
    lr = cfg.optim.lr
    diffs = {}
    for name, p in ref.named_parameters():
        expected = before[name] - lr * p.grad
        diffs[name] = (expected - after[name]).abs().max().item()
    moved = max((after[n] - before[n]).abs().max().item() for n, _ in ref.named_parameters())
    return {"max_param_diff": max(diffs.values()), "moved": moved}


def _reference_eval(trainer: Trainer, model: torch.nn.Module) -> dict:
    ds = trainer.evaluator.splits["eval"]
    model.eval()
    with torch.no_grad():
        sums = trainer.pipeline.eval_step(model, default_collate([ds[i] for i in range(len(ds))]))
    count = float(sums.pop("count"))
    return {f"eval/{k}": float(v) / count for k, v in sums.items()}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
