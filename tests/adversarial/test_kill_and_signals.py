"""kill -9 and signals (issue 11, cases 1, 9, 10): the ranks of a torchrun agent killed with kill -9
stop at once without writing; Ctrl-C twice still records how the run ended; a rank hung under torchrun
ends at about the collective timeout, with the explanation, instead of 30 s later."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import FAST, child_env, main_cmd, read_jsonl, run_main


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def logged(run_dir: Path, step: int):
    def check() -> bool:
        path = run_dir / "metrics.jsonl"
        return path.exists() and any(r.get("step", 0) >= step for r in read_jsonl(path) if "train/loss" in r)

    return check


def snapshot(run_dir: Path) -> tuple:
    ckpts = (
        sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        if (run_dir / "checkpoints").exists()
        else []
    )
    return ckpts, (run_dir / "metrics.jsonl").read_bytes(), (run_dir / "events.jsonl").read_bytes()


def test_kill_9_of_the_torchrun_agent_takes_its_ranks_with_it(tmp_path):
    run_dir = tmp_path / "run"
    args = (f"run_dir={run_dir}", "pipeline.target=tests.adversarial.pipelines:Slow", "trainer.max_steps=100000",
            "trainer.log_every=1", "trainer.eval_every=0", "checkpoint.every_steps=2", *FAST)  # fmt: skip
    agent = subprocess.Popen(main_cmd(*args, nproc=2), env=child_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(logged(run_dir, 4), agent, "step 4")
        ranks = psutil.Process(agent.pid).children()
        assert len(ranks) == 2
        agent.kill()
        agent.wait()
        before = snapshot(run_dir)
        gone, alive = psutil.wait_procs(ranks, timeout=10)
        assert not alive, f"ranks outlived their torchrun agent: {[p.pid for p in alive]}"
        assert snapshot(run_dir) == before, "a rank wrote after its agent was killed"
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()
    again = run_main(*args[:2], "trainer.max_steps=8", *args[3:])  # relaunched: nothing competes with it
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3])
def test_an_agent_killed_as_it_spawns_its_ranks_leaves_no_orphan(tmp_path, delay):
    """Issue 19, adversarial 4: the agent kill -9'd within 0.3 s of spawning its workers, before they
    armed the parent-death signal (then in run.start, after the config and fsspec imports). They
    survived 4 times in 6, and some joined the relaunched agent's store and trained the run to its end."""
    run_dir = tmp_path / "run"
    args = (f"run_dir={run_dir}", "pipeline.target=tests.adversarial.pipelines:Slow", "trainer.max_steps=100000",
            "trainer.log_every=1", "trainer.eval_every=0", "checkpoint.every_steps=2", *FAST)  # fmt: skip
    agent = subprocess.Popen(main_cmd(*args, nproc=2), env=child_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: len(psutil.Process(agent.pid).children()) == 2, agent, "the ranks", timeout=60)
        time.sleep(delay)
        ranks = psutil.Process(agent.pid).children()
        agent.kill()
        agent.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=10)
        assert not alive, f"ranks outlived their torchrun agent killed {delay} s after it spawned them"
        assert not (run_dir / "metrics.jsonl").exists(), "an orphaned rank trained"
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()


def test_ctrl_c_twice_records_the_end_and_status_says_so(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        main_cmd(f"run_dir={run_dir}", "pipeline.target=tests.adversarial.pipelines:Slow",
                 "pipeline.args.step_delay=0.5", "trainer.max_steps=1000", "trainer.log_every=1", *FAST),
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(logged(run_dir, 1), proc, "step 1")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # the first only asks for a stop at the next step boundary (0.5 s away)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    last, exit_ = read_jsonl(run_dir / "events.jsonl")[-2:]  # the segment's end is recorded (goodput)
    assert last["event"] == "interrupted" and last["saved"] is False and exit_["event"] == "exit", last
    status = subprocess.run([sys.executable, "-m", "disttrain", "status", str(run_dir)], env=child_env(),
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert status.returncode == 0, status.stderr
    state = next(line for line in status.stdout.splitlines() if line.startswith("state"))
    assert state.startswith("state        interrupted") and "running" not in state, status.stdout


def test_a_rank_hung_in_eval_under_torchrun_ends_the_job_at_about_the_collective_timeout(tmp_path):
    """Before: the hung rank only noted torchrun's SIGTERM, and the agent waited 30 s more to SIGKILL
    it; an eval hang could also end without saying that another rank hangs."""
    timeout_s = 6
    run_dir = tmp_path / "run"
    args = (f"run_dir={run_dir}", "pipeline.target=tests.adversarial.pipelines:HangingRank", "trainer.max_steps=4",
            "trainer.eval_every=2", "trainer.log_every=1", f"trainer.collective_timeout_s={timeout_s}", *FAST)  # fmt: skip
    proc = subprocess.Popen(main_cmd(*args, nproc=2), env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wait_for(logged(run_dir, 1), proc, "step 1")  # eval starts at step 2; rank 1 hangs in its first batch
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    took = time.monotonic() - t0
    print(f"\nhung rank: job ended {took:.1f} s after step 1 (collective timeout {timeout_s} s)")
    assert proc.returncode != 0
    assert "rank 1 on" in out and "did not reach the eval" in out, out[-4000:]
    assert "rank 1 reached no step boundary" in out and "eval_step" in out, out[-4000:]
    assert took < timeout_s + 20, f"the job took {took:.1f} s; torchrun's 30 s SIGKILL wait was not avoided"
    errors = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "error"]
    assert errors and "did not reach the eval" in errors[-1]["error"] and "eval_step" in errors[-1]["error"]
