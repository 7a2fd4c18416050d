"""Shared helpers: run disttrain as a user would (a subprocess), one process or several under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# No network at test time: HuggingFace models are built from configs, data sets from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest_plugins = ["tests.stages"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # Two cores here: one thread per rank keeps multi-process runs from oversubscribing.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for key in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_JOB_ID",
        "SLURM_PROCID",
    ):
        env.pop(key, None)
    env.update(extra)
    return env


def main_cmd(*args: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "disttrain.main", *args]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "disttrain.main", *args,
    ]  # fmt: skip


def run_main(
    *args: str,
    nproc: int = 1,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
):
    """Run `python -m disttrain.main ARGS` (under torchrun when nproc > 1); returns CompletedProcess."""
    return subprocess.run(
        main_cmd(*args, nproc=nproc), capture_output=True, text=True, timeout=timeout,
        env=env or child_env(), cwd=cwd or str(REPO),
    )  # fmt: skip


def read_jsonl(path: Path | str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


FAST = ("trainer.progress=plain", "log.plot=false")
# Logged numbers that measure the machine (time, memory), not the computation: everything else a resumed
# run logs must equal what an uninterrupted run logs (DESIGN §6).
MEASURED = (
    "train/samples_per_sec", "train/tokens_per_sec", "train/mfu", "train/max_mem_mb",
    "train/slowest_rank", "train/slowest_ratio", "train/slowest_wait_s",
)  # fmt: skip


def computed(records: list[dict]) -> list[dict]:
    """metrics.jsonl records without the MEASURED numbers."""
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in records]


@pytest.fixture
def fast_args():
    return FAST
