"""A rank frozen outside Python (issue 19, adversarial 1 and 12): SIGSTOP, as a process stuck in the
kernel or a frozen container looks to its peers. Before: under fsdp with checkpoint.async_save the
survivor said "a collective failed" at the timeout and then hung for 30 minutes at exit, joining the
save thread blocked on a group made with torch's default timeout. Now every group has the run's
timeout and exit never waits for the save thread; the job ends at that timeout plus torchrun's 30 s
wait before it SIGKILLs the frozen rank (which cannot act on its SIGTERM), as README says."""

from __future__ import annotations

import datetime
import signal
import subprocess
import time

import psutil
import torch
import torch.distributed as tdist

from disttrain import dist
from tests.adversarial.test_kill_and_signals import logged, wait_for
from tests.conftest import FAST, child_env, main_cmd, run_main

TORCHRUN_KILL_WAIT_S = 30  # torchrun's pcontext.close timeout between its SIGTERM and SIGKILL


def test_a_frozen_rank_ends_the_job_at_the_timeout_even_with_a_save_in_flight(tmp_path):
    timeout_s = 6
    run_dir = tmp_path / "run"
    args = (f"run_dir={run_dir}", "pipeline.target=tests.adversarial.pipelines:Slow", "trainer.strategy=fsdp",
            "checkpoint.async_save=true", "checkpoint.every_steps=1", "trainer.max_steps=100000",
            "trainer.log_every=1", "trainer.eval_every=0", f"trainer.collective_timeout_s={timeout_s}", *FAST)  # fmt: skip
    agent = subprocess.Popen(main_cmd(*args, nproc=2), env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    frozen = None
    try:
        wait_for(lambda: logged(run_dir, 4)() and (run_dir / "checkpoints/latest").exists(), agent, "step 4")
        ranks = {p.environ()["RANK"]: p for p in psutil.Process(agent.pid).children()}
        frozen, survivor = ranks["0"], ranks["1"]
        frozen.send_signal(signal.SIGSTOP)  # every step saves, in the background: one is in flight
        t0 = time.monotonic()
        psutil.wait_procs([survivor], timeout=timeout_s + 60)
        survivor_s = time.monotonic() - t0
        out, _ = agent.communicate(timeout=TORCHRUN_KILL_WAIT_S + 60)
        job_s = time.monotonic() - t0
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()
    print(
        f"\nrank 0 frozen ({timeout_s} s timeout): survivor out after {survivor_s:.1f} s, job after {job_s:.1f} s"
    )
    assert survivor_s < timeout_s + 15, f"the survivor took {survivor_s:.1f} s to exit"
    assert "rank 1: training failed: a collective failed" in out, out[-3000:]
    assert job_s < timeout_s + TORCHRUN_KILL_WAIT_S + 15, f"the job took {job_s:.1f} s"
    assert agent.returncode != 0
    again = run_main(*args[:5], "trainer.max_steps=1", *args[6:], timeout=180)  # committed steps still verify
    assert again.returncode == 0 and "already reached step" in again.stdout, again.stderr[-3000:]


def test_a_group_for_background_work_gets_the_runs_timeout():
    """torch gives a new group its own default (30 minutes for gloo), not the default group's."""
    tdist.init_process_group(
        "gloo", store=tdist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=7)
    )
    try:
        group = dist.new_gloo_group()
        assert dist.group_timeout() == datetime.timedelta(seconds=7)
        assert group._get_backend(torch.device("cpu")).options._timeout == datetime.timedelta(seconds=7)
    finally:
        tdist.destroy_process_group()
