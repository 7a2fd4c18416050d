"""Exact resume on a GPU (one device): a tiny_gpt run with bf16 autocast, dropout and fused AdamW,
stopped by SIGTERM mid-run and resumed, must log the same numbers and end with the same weights as a run
never stopped (DESIGN §6). With trainer.deterministic=true the kernels are pinned; the default run shows
whether the stock kernels happen to be run-to-run stable for this model. The local tier (issue 20) must
serve a restart on the GPU the same way. Skipped where there is no CUDA device."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import FAST, child_env, computed, free_port, main_cmd, read_jsonl, run_main

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine"),
]

STEPS = 40
BASE = [
    "--config", "configs/tiny_gpt.yaml", "pipeline.target=tests.pipelines:SlowTinyGPT",
    "pipeline.args.step_delay=0.05", "pipeline.args.dropout=0.1", "trainer.mixed_precision=bf16",
    "optim.fused=true", f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.eval_every=20",
    "checkpoint.every_steps=10", *FAST,
]  # fmt: skip


def outcome(run_dir: Path) -> dict:
    records = computed(read_jsonl(run_dir / "metrics.jsonl"))
    manifest = json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").read_text())
    return {"records": records, "weights": manifest["files"]["model.safetensors"]["sha256"]}


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    path, deadline = run_dir / "metrics.jsonl", time.monotonic() + 180
    while not (path.exists() and any(r.get("step", 0) >= step for r in read_jsonl(path))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.02)


def stopped_and_resumed(run_dir: Path, extra: list[str], at: int) -> None:
    proc = subprocess.Popen(main_cmd(f"run_dir={run_dir}", *BASE, *extra), env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for_step(proc, run_dir, at)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stopped = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "stopped"]
    assert stopped and at <= stopped[-1]["step"] < STEPS, out[-3000:]
    again = run_main(f"run_dir={run_dir}", *BASE, *extra)
    assert again.returncode == 0 and "resumed from step" in again.stdout, again.stderr[-3000:]


@pytest.mark.parametrize("mode", ["deterministic", "default"])
def test_gpu_run_stopped_and_resumed_is_bit_identical(tmp_path, mode):
    extra = ["trainer.deterministic=true"] if mode == "deterministic" else []
    ref = run_main(f"run_dir={tmp_path / 'ref'}", *BASE, *extra)
    assert ref.returncode == 0, ref.stderr[-3000:]
    stopped_and_resumed(tmp_path / "resumed", extra, at=13)
    expected, got = outcome(tmp_path / "ref"), outcome(tmp_path / "resumed")
    assert got["records"] == expected["records"]
    assert got["weights"] == expected["weights"]


def test_gpu_local_tier_serves_a_restart_bit_identical(tmp_path):
    """Local pieces every 4 steps, no durable checkpoint before the end: the worker is killed -9 under
    `torchrun --max-restarts 1`; the restarted worker resumes from its local piece (GPU tensors copied to
    host memory at the step) and still ends where a run never killed ends."""
    extra = ["trainer.deterministic=true", "checkpoint.every_steps=1000"]
    ref = run_main(f"run_dir={tmp_path / 'ref'}", *BASE, *extra)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run_dir, local = tmp_path / "killed", tmp_path / "local"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--max-restarts", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "disttrain.main",
           f"run_dir={run_dir}", *BASE, *extra, "checkpoint.local.every_steps=4",
           f"checkpoint.local.dir={local}", "resume=never"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=child_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_step(proc, run_dir, 14)
        [worker] = psutil.Process(proc.pid).children()
        worker.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    resumes = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert resumes and resumes[-1].get("tier") == "local", resumes
    expected, got = outcome(tmp_path / "ref"), outcome(run_dir)
    assert got["records"] == expected["records"]
    assert got["weights"] == expected["weights"]
