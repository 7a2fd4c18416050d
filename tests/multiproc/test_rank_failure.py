"""A rank that dies (kill -9) or hangs (SIGSTOP) must not leave the others waiting forever: every
collective is bounded by trainer.collective_timeout_s, and the survivor exits non-zero with a clear
message. Two ranks are started directly with RANK/WORLD_SIZE (no torchrun to clean up after them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST, child_env, free_port, read_jsonl
from tests.multiproc.test_exact_resume import logged_step

pytestmark = pytest.mark.multiproc

TIMEOUT_S = 20
MARGIN_S = 40  # process-group teardown, interpreter exit, a slow 2-core machine
ARGS = (
    "pipeline.target=tests.pipelines:ProbeDigits", "pipeline.args.step_delay=0.05", "trainer.max_steps=100000",
    "trainer.log_every=1", "checkpoint.every_steps=0", f"trainer.collective_timeout_s={TIMEOUT_S}", *FAST,
)  # fmt: skip


def start_ranks(run_dir: Path, logs: Path) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        out = open(logs / f"rank{rank}.log", "w")  # noqa: SIM115 - closed with the process below
        procs.append(subprocess.Popen([sys.executable, "-m", "disttrain.main", f"run_dir={run_dir}", *ARGS],
                                      env=env, stdout=out, stderr=subprocess.STDOUT))  # fmt: skip
    return procs


@pytest.mark.parametrize(
    "victim, how",
    [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)],
    ids=["kill-9-rank1", "kill-9-rank0", "sigstop-rank1"],
)
def test_survivor_exits_with_a_clear_error_within_the_collective_timeout(tmp_path, victim, how):
    run_dir = tmp_path / "run"
    procs = start_ranks(run_dir, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not logged_step(3)(run_dir):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, (
                "training never started"
            )
            time.sleep(0.05)
        survivor = procs[1 - victim]
        t0 = time.monotonic()
        os.kill(procs[victim].pid, how)
        code = survivor.wait(timeout=TIMEOUT_S + MARGIN_S)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    log = (tmp_path / f"rank{1 - victim}.log").read_text()
    assert code == 1, log[-3000:]
    line = next(x for x in log.splitlines() if x.startswith(f"disttrain: rank {1 - victim}: training failed"))
    assert "a collective failed" in line, log[-3000:]
    # A killed or stopped rank runs no Python: it leaves no stack, and the survivor says so.
    assert f"rank {victim} on " in line and "it died or is frozen" in line, line
    print(f"\n{how.name} rank {victim}: survivor exited {code} after {took:.1f}s")
    if victim == 1:  # rank 0 survived: it records the failure for `disttrain status`
        errors = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "error"]
        assert (
            len(errors) == 1
            and "rank 1 on" in errors[0]["error"]
            and "died or is frozen" in errors[0]["error"]
        )
        hang = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "hang"]
        assert hang and hang[0]["ranks"][0]["rank"] == 1 and hang[0]["ranks"][0]["frame"] == ""
