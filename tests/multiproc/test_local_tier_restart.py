"""Crash recovery inside one torchrun invocation (issue 20): kill -9 one of two workers under
`torchrun --max-restarts 1` with the local tier on and durable checkpoints rare. torchrun restarts both
workers; they resume from their own local pieces (the `resume` event says tier local), redo at most a
local interval, and finish with the weights and logged numbers of a run that was never interrupted. With
one rank's local folder gone, the restart falls back to the durable tier, and an event says why."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import child_env, free_port, read_jsonl
from tests.multiproc.test_exact_resume import BASE, STEPS, outcome, reference

pytestmark = pytest.mark.multiproc

LOCAL_EVERY = 4


def extra(local: Path, durable_every: int) -> list[str]:
    return [
        f"checkpoint.local.every_steps={LOCAL_EVERY}", f"checkpoint.local.dir={local}",
        f"checkpoint.every_steps={durable_every}",
    ]  # fmt: skip


def torchrun(run_dir: Path, args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "disttrain.main", f"run_dir={run_dir}", *BASE, *args, "resume=never",
    ]  # fmt: skip


def pieces(local: Path, rank: int) -> list[int]:
    """Steps of a rank's committed local pieces (a manifest makes one)."""
    folder = local / f"rank_{rank:05d}"
    return sorted(int(p.parent.name[5:]) for p in folder.glob("step_*/manifest.json") if ".tmp" not in str(p))


def kill_one_worker_after(proc: subprocess.Popen, local: Path, step: int, then=None) -> str:
    """Once both ranks hold a local piece of `step` or later, kill -9 rank 1's worker (right after a
    piece, so the next write is a whole interval away); `then()` runs at once after."""
    deadline = time.monotonic() + 120
    while not all(pieces(local, r) and pieces(local, r)[-1] >= step for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, "the local pieces never appeared"
        time.sleep(0.01)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    victim = next(w for w in workers if "LOCAL_RANK" in w.environ() and w.environ()["LOCAL_RANK"] == "1")
    victim.send_signal(signal.SIGKILL)
    if then is not None:
        then()
    out, _ = proc.communicate(timeout=180)
    return out


def run_and_kill(
    run_dir: Path, local: Path, args: list[str], then=None, at: int = 2 * LOCAL_EVERY
) -> tuple[str, int]:
    proc = subprocess.Popen(torchrun(run_dir, args), env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        out = kill_one_worker_after(proc, local, at, then)
    finally:
        proc.kill()
    return out, proc.returncode


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_kill_9_one_worker_resumes_from_the_local_tier_bit_identical(tmp_path, tmp_path_factory, strategy):
    local = tmp_path / "local"
    # No durable checkpoint before the final one: only the local tier can serve the restart.
    args = [*extra(local, durable_every=1000), f"trainer.strategy={strategy}"]
    run_dir = tmp_path / "run"
    out, code = run_and_kill(run_dir, local, args)
    assert code == 0, out[-4000:]

    events = read_jsonl(run_dir / "events.jsonl")
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["tier"] == "local" and resume["restart_count"] == 1, resume
    assert resume["step"] % LOCAL_EVERY == 0 and resume["step"] >= 2 * LOCAL_EVERY
    redone = resume["interrupted_at"] - resume["step"]
    assert 0 <= redone <= LOCAL_EVERY, resume
    assert not [e for e in events if e["event"] == "tier_fallback"]
    assert [e["event"] for e in events][-2:] == ["finish", "exit"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [f"step_{STEPS:08d}"]
    assert "(local tier)" in out
    # The same numbers and final weights as a run never interrupted, with no local tier at all.
    assert outcome(run_dir) == reference(tmp_path_factory, (f"trainer.strategy={strategy}",))
    assert not (local / "rank_00000").exists(), "a finished run leaves no local pieces"


def test_a_local_folder_gone_falls_back_to_the_durable_tier_and_says_why(tmp_path, tmp_path_factory):
    local = tmp_path / "local"
    # Durable every 8 steps, killed after the local piece of step 12: the local tier would have served.
    args = extra(local, durable_every=2 * LOCAL_EVERY)
    run_dir = tmp_path / "run"
    wipe = lambda: shutil.rmtree(local / "rank_00001")  # noqa: E731
    out, code = run_and_kill(run_dir, local, args, then=wipe, at=3 * LOCAL_EVERY)
    assert code == 0, out[-4000:]

    events = read_jsonl(run_dir / "events.jsonl")
    resume = next(e for e in events if e["event"] == "resume")
    fallback = next(e for e in events if e["event"] == "tier_fallback")
    assert resume["tier"] == "durable" and fallback["served"] == "durable" and fallback["tier"] == "local"
    assert "rank 1" in fallback["reason"] and "no verified local copy" in fallback["reason"]
    assert resume["step"] % (2 * LOCAL_EVERY) == 0 and resume["step"] < resume["interrupted_at"]
    assert events.index(fallback) < events.index(resume)
    assert outcome(run_dir) == reference(tmp_path_factory, ())
