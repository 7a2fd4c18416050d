"""Helpers for the tests that submit disttrain runs to the loopback cluster (no tests here).

`submit(...)` runs `python launch/submit.py` as a user would, with the cluster's SLURM_CONF and a
PYTHONPATH that lets the job import the test pipelines. `Reference` starts the uninterrupted 2-rank
torchrun run of a config at once, in the background (its steps mostly sleep, so it costs the cluster
job little CPU), and hands its outcome over when a test compares.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import FAST, REPO, child_env, computed, main_cmd, read_jsonl

HERE = Path(__file__).resolve().parent
SUBMIT = str(REPO / "launch" / "submit.py")
WHOLE_CLUSTER = (
    "--nodes=2",
    "--ntasks-per-node=1",
    "--cpus-per-task=2",
)  # a `high` job this size must preempt


def job_env(slurm, **extra: str) -> dict[str, str]:
    """What the submitting shell exports; sbatch hands all of it to the job."""
    env = child_env(**extra)
    env["SLURM_CONF"] = slurm.env["SLURM_CONF"] if slurm is not None else env.get("SLURM_CONF", "")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE)])
    return env


def run_submit(
    slurm, *args: str, timeout: float = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SUBMIT, *args], capture_output=True, text=True, timeout=timeout,
        env=env or job_env(slurm), cwd=str(REPO),
    )  # fmt: skip


def submit(slurm, run_dir: Path, *args: str, **kw) -> int:
    """Submit (it must succeed and return at once); returns the job id."""
    proc = run_submit(slurm, *args, f"run_dir={run_dir}", *FAST, **kw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match, proc.stdout
    return int(match.group(1))


def events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    return read_jsonl(path) if path.exists() else []


def wait_for_event(run_dir: Path, match, timeout: float, slurm=None, job=None) -> dict:
    """The first event for which `match(event)` holds; fails early if the job ended without one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in events(run_dir):
            if match(event):
                return event
        if slurm is not None and slurm.job_state(job) in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}:
            break
        time.sleep(0.3)
    raise AssertionError(
        f"no such event in {run_dir}/events.jsonl; events: {events(run_dir)}\n{job_logs(run_dir)}"
    )


def job_logs(run_dir: Path, tail: int = 40) -> str:
    parts = []
    for path in sorted((Path(run_dir) / "slurm").glob("*_log.*")):
        lines = path.read_text(errors="replace").splitlines()[-tail:]
        parts.append(f"==> {path.name} <==\n" + "\n".join(lines))
    return "\n".join(parts)


def wait_finished(slurm, job: int, run_dir: Path, timeout: float) -> None:
    state = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=timeout)
    assert state == "COMPLETED", f"job {job} ended {state}\n{job_logs(run_dir)}"


def release(slurm, job: int, timeout: float = 60) -> None:
    """Start a requeued job now rather than after its ~2 min BeginTime (NOTES §6)."""
    # The cluster fixture's module, as conftest imports it (tests/cluster on sys.path): the same module
    # under its package name would be another SlurmError class, and the race below would not be caught
    # (seen once in a full run: "Job is no longer pending execution").
    from slurm_cluster import SlurmError

    deadline = time.monotonic() + timeout
    # The previous attempt may still be completing on its nodes for a moment after the job shows
    # PENDING; started then, SLURM kills it ("Job credential revoked", FAILED; seen once in a full run).
    # SLURM itself would wait out BeginTime (~2 min): here, wait until no node is completing.
    while _completing(slurm) and time.monotonic() < deadline:
        time.sleep(0.5)
    while slurm.job_state(job) == "PENDING":
        assert time.monotonic() < deadline, f"job {job} stayed PENDING: {slurm.scontrol_show_job(job)}"
        try:
            slurm.release_now(job)
        except SlurmError as err:  # it started between the state query and the update: released
            if "no longer pending" not in str(err):
                raise
        time.sleep(1)


def _completing(slurm) -> bool:
    states = slurm.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.split()
    return any("comp" in state for state in states)


def outcome(run_dir: Path, steps: int) -> dict:
    """What must match an uninterrupted run: every logged number except throughput, and the weights."""
    records = computed(read_jsonl(Path(run_dir) / "metrics.jsonl"))
    manifest = json.loads((Path(run_dir) / "checkpoints" / f"step_{steps:08d}" / "manifest.json").read_text())
    weights = {
        k: v["sha256"] for k, v in manifest["files"].items() if k.endswith(".safetensors")
    }  # or shards
    return {"records": records, "weights": weights}


class Reference:
    """The same config run uninterrupted by `torchrun --nproc_per_node 2` on this machine."""

    def __init__(self, run_dir: Path, args: tuple[str, ...], steps: int):
        self.run_dir, self.steps = run_dir, steps
        self.proc = subprocess.Popen(
            main_cmd(f"run_dir={run_dir}", *args, *FAST, nproc=2), env=job_env(None), cwd=str(REPO),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def outcome(self, timeout: float = 180) -> dict:
        out, _ = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, out[-3000:]
        return outcome(self.run_dir, self.steps)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
