"""The trainer on one process, driven as a user drives it: `python -m disttrain.main ...`."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from tests.conftest import FAST, child_env, read_jsonl, run_main


def test_default_example_reaches_095_and_fills_the_run_dir(tmp_path):
    run_dir = tmp_path / "digits"
    proc = run_main(f"run_dir={run_dir}", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    final_eval = [m for m in metrics if "eval/accuracy" in m][-1]
    assert final_eval["step"] == 300 and final_eval["eval/accuracy"] >= 0.95
    train = [m for m in metrics if "train/loss" in m]
    assert {"train/loss", "train/lr", "train/samples_per_sec"} <= set(train[-1])
    assert train[-1]["train/loss"] < train[0]["train/loss"] / 5
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run_dir"] == str(run_dir)
    events = [e["event"] for e in read_jsonl(run_dir / "events.jsonl")]
    assert events[0] == "start" and events[-2:] == ["finish", "exit"]  # exit: the segment's end
    assert "step 300/300 | train/loss" in proc.stdout, "plain log lines when stdout is not a terminal"

    again = run_main(f"run_dir={run_dir}", *FAST)
    assert again.returncode == 0 and "already reached step 300" in again.stdout

    tested = run_main(f"run_dir={run_dir}", "--test", *FAST)
    assert tested.returncode == 0, tested.stderr[-2000:]
    result = json.loads((run_dir / "test_metrics.json").read_text())
    assert result["step"] == 300 and result["split"] == "test" and result["test/accuracy"] >= 0.9


USER_PIPELINE = """
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from disttrain.pipelines import Pipeline

class Regression(Pipeline):
    def __init__(self, hidden: int = 32):
        self.hidden = hidden

    def build_model(self):
        return torch.nn.Sequential(torch.nn.Linear(4, self.hidden), torch.nn.ReLU(), torch.nn.Linear(self.hidden, 1))

    def datasets(self):
        x = torch.randn(1024, 4, generator=torch.Generator().manual_seed(0))
        y = x.sum(1, keepdim=True)
        return {"train": TensorDataset(x[:896], y[:896]), "eval": TensorDataset(x[896:], y[896:])}

    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x), y)

    def eval_step(self, model, batch):
        x, y = batch
        return {"loss": F.mse_loss(model(x), y, reduction="sum"), "count": torch.tensor(len(x))}
"""


def test_user_pipeline_outside_the_package_trains(tmp_path):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "pipes.py").write_text(textwrap.dedent(USER_PIPELINE))
    run_dir = tmp_path / "run"
    env = child_env()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    proc = run_main(f"run_dir={run_dir}", "pipeline.target=userpkg.pipes:Regression", "pipeline.args.hidden=64",
                    "trainer.max_steps=150", "trainer.eval_every=50", "data.batch_size=32", *FAST, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [m["eval/loss"] for m in read_jsonl(run_dir / "metrics.jsonl") if "eval/loss" in m]
    assert len(evals) == 3 and evals[-1] < evals[0] / 4, evals


def test_accumulation_and_bf16_autocast_on_cpu(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_main(f"run_dir={run_dir}", "trainer.grad_accum=4", "trainer.mixed_precision=bf16",
                    "trainer.max_steps=60", "trainer.eval_every=0", "scheduler.warmup_steps=10", *FAST)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    lrs = [m["train/lr"] for m in metrics if "train/lr" in m]
    assert lrs[0] == pytest.approx(3e-3) and lrs[-1] < 1e-4, "warmup then cosine decay"
    assert [m for m in metrics if "eval/accuracy" in m][-1]["eval/accuracy"] > 0.8


def test_tiny_gpt_learns_characters(tmp_path):
    run_dir = tmp_path / "gpt"
    proc = run_main("--config", "configs/tiny_gpt.yaml", f"run_dir={run_dir}", "trainer.max_steps=60",
                    "trainer.eval_every=60", "pipeline.args.d_model=64", "pipeline.args.block_size=32", *FAST)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    # ln(96) = 4.56 is a uniform guess over the corpus' characters; 60 steps learn character statistics.
    assert losses[0] > 4.0 and losses[-1] < losses[0] - 1.0, losses
    assert [m for m in metrics if "eval/accuracy" in m][-1]["eval/accuracy"] > 0.1
