"""Under plain torchrun, SIGTERM makes every rank save synchronously and exit 143, which lets
`torchrun --max-restarts` bring the job back: it resumes by itself and its final weights and logged
numbers equal those of a run that was never interrupted. (The run says `resume=never`: that guards the
first attempt against an old run dir; a restarted attempt continues from its own checkpoint.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import child_env, free_port, read_jsonl, run_main
from tests.multiproc.test_exact_resume import BASE, STEPS, logged_step, outcome

pytestmark = pytest.mark.multiproc


def torchrun_with_restarts(run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "disttrain.main", f"run_dir={run_dir}", *BASE, "resume=never",
    ]  # fmt: skip


def test_sigterm_to_one_worker_restarts_resumes_and_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    run_dir = tmp_path / "run"
    ref = run_main(f"run_dir={reference}", *BASE, nproc=2)
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = subprocess.Popen(torchrun_with_restarts(run_dir), env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not logged_step(6)(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, "never reached step 6"
            time.sleep(0.02)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        first_pids = {w.pid for w in workers}
        workers[-1].send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]

    events = read_jsonl(run_dir / "events.jsonl")
    names = [e["event"] for e in events]
    stopped = next(e for e in events if e["event"] == "stopped")  # its signal is rank 0's, maybe None
    assert 6 <= stopped["step"] < STEPS
    resume = next(e for e in events if e["event"] == "resume")
    assert (resume["step"], resume["restart_count"]) == (stopped["step"], 1), resume
    assert names.count("start") == 2 and names[-2:] == ["finish", "exit"]
    assert "resumed from step" in out
    assert first_pids.isdisjoint(p.pid for p in psutil.process_iter()), "first-attempt workers are gone"
    assert outcome(run_dir) == outcome(reference)
