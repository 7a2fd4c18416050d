"""A slow save must not kill the job: while rank 0 writes a checkpoint, the other ranks wait up to
checkpoint.save_timeout_s, not trainer.collective_timeout_s; a save slower than that fails as a
checkpoint error on every rank, and the previous checkpoint stays intact.

The storage is tests/multiproc/slowfs.py's `slowfile://` filesystem (real writes to local disk, slowed
down for chosen steps), two ranks under torchrun over gloo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from disttrain import cli
from disttrain.rundir import RunDir
from tests.conftest import FAST, REPO, child_env, free_port

pytestmark = pytest.mark.multiproc

COLLECTIVE_TIMEOUT_S, SAVE_TIMEOUT_S = 4, 9


def test_a_save_slower_than_the_collective_timeout_survives_and_one_past_its_own_timeout_fails_cleanly(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = (
        f"run_dir=slowfile://{run_dir}", "pipeline.target=tests.pipelines:ProbeDigits", "pipeline.args.step_delay=0.02",
        "trainer.max_steps=12", "trainer.eval_every=0", "trainer.log_every=4", "checkpoint.every_steps=4",
        f"trainer.collective_timeout_s={COLLECTIVE_TIMEOUT_S}", f"checkpoint.save_timeout_s={SAVE_TIMEOUT_S}", *FAST,
    )  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tests.multiproc.slowfs", *args]  # fmt: skip
    # step 8: 6 s, past the collective timeout but inside the save timeout; step 12 (final): 40 s, past both
    env = child_env(SLOWFS_DELAYS=f"8:{COLLECTIVE_TIMEOUT_S + 2},12:40")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))

    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    saved = [(e["step"], e["seconds"]) for e in events if e["event"] == "checkpoint"]
    assert [step for step, _ in saved] == [4, 8] and saved[1][1] > COLLECTIVE_TIMEOUT_S, saved
    (error,) = [e for e in events if e["event"] == "error"]
    assert error["step"] == 12 and "CheckpointError" in error["error"], error
    assert f"checkpoint.save_timeout_s={SAVE_TIMEOUT_S:g}" in error["error"] and "step 8 is intact" in error["error"]
    for rank in (0, 1):  # every rank says why, and it is not a collective timeout
        assert f"rank {rank}: training failed: CheckpointError" in proc.stderr, proc.stderr[-4000:]
    assert "a collective failed" not in proc.stderr
    assert RunDir(str(run_dir)).committed_steps() == [8, 4]  # step 12's files, if any, were never published
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert cli.main(["ckpt", "verify", str(run_dir)]) == 0, capsys.readouterr()
