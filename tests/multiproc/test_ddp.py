"""DDP correctness with 2 real processes over gloo on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from tests.conftest import FAST, REPO, child_env, free_port, read_jsonl, run_main

pytestmark = pytest.mark.multiproc

PROBE_ARGS = [
    "optim.name=sgd", "optim.momentum=0.0", "optim.lr=0.5", "trainer.grad_clip=0", "pipeline.args.dropout=0.0",
    "data.batch_size=64", "data.eval_batch_size=128",  # 269 eval samples: the last global batch is short
]  # fmt: skip


def run_probe(tmp_path, nproc: int, *extra: str) -> dict:
    out = tmp_path / f"probe_{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(REPO / "tests/multiproc/ddp_probe.py"), str(out),
           f"run_dir={tmp_path / 'unused'}", *PROBE_ARGS, *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_gradients_equal_single_process_full_batch(tmp_path, accum):
    report = run_probe(tmp_path, 2, f"trainer.grad_accum={accum}")
    assert report["world"] == 2
    assert report["moved"] > 1e-3, "the step must actually change the weights"
    # Same math, different summation order (per-rank means, then all-reduce): float32 round-off only.
    assert report["max_param_diff"] < 1e-6


def test_distributed_eval_equals_single_process_eval(tmp_path):
    report = run_probe(tmp_path, 2)
    single, distributed = report["eval_single"], report["eval_dist"]
    assert set(single) == set(distributed) == {"eval/loss", "eval/accuracy"}
    # Correct-prediction counts are integers: equal only if every sample was counted exactly once.
    assert distributed["eval/accuracy"] == single["eval/accuracy"]
    # Loss sums differ only by float32 summation order (slices of 64 vs one batch of 269).
    assert distributed["eval/loss"] == pytest.approx(single["eval/loss"], rel=1e-6)


def test_two_rank_run_logs_metrics_once_and_learns(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_main(f"run_dir={run_dir}", "trainer.max_steps=40", "trainer.log_every=5", "trainer.eval_every=20",
                    "checkpoint.every_steps=0", *FAST, nproc=2)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(run_dir / "metrics.jsonl")
    train_steps = Counter(r["step"] for r in records if "train/loss" in r)
    eval_steps = Counter(r["step"] for r in records if "eval/accuracy" in r)
    assert train_steps == Counter(range(5, 41, 5)), "each train record exactly once, not once per rank"
    assert eval_steps == Counter([20, 40])
    assert [e["event"] for e in read_jsonl(run_dir / "events.jsonl")].count("start") == 1
    assert records[-1]["eval/accuracy"] > 0.5, "it learns (chance is 0.1)"
    assert proc.stdout.count("step 40/40 | train/loss") == 1, "console lines from rank 0 only"


def test_two_rank_runs_are_bitwise_reproducible(tmp_path):
    digests = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        proc = run_main(f"run_dir={run_dir}", "trainer.max_steps=30", "trainer.log_every=1", "trainer.eval_every=0",
                        "checkpoint.every_steps=0", *FAST, nproc=2)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses = [r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
        manifest = json.loads((run_dir / "checkpoints" / "step_00000030" / "manifest.json").read_text())
        digests.append((losses, manifest["files"]["model.safetensors"]["sha256"]))
    assert len(digests[0][0]) == 30
    assert digests[0] == digests[1]
