"""Crash safety: a process that trains and saves every step is kill -9'd at random moments, over and
over in one run dir. After every kill, every committed checkpoint verifies, the newest verified one is
the newest committed one, `latest` names a committed checkpoint, and the next start resumes from it.

Each trial's process is forked from a helper ("zygote") that imported torch once, so a trial costs
milliseconds instead of a second of imports; the fork happens before the zygote runs any torch op.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

TRIALS = 20
MAX_SECONDS = 40


def _child(run_dir: str, async_save: bool) -> None:
    """Train a small MLP forever, saving every step; resume from the newest verified checkpoint."""
    import torch

    from disttrain.ckpt_write import CheckpointManager
    from disttrain.config import CheckpointConfig
    from disttrain.state import capture_rank_state

    torch.manual_seed(os.getpid())
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = CheckpointManager(run_dir, CheckpointConfig(every_steps=1, keep_last=3, async_save=async_save))
    step = 0
    if mgr.latest_verified() is not None:
        app, _ = mgr.load()
        model.load_state_dict(app["model"])
        opt.load_state_dict(app["optimizer"])
        step = app["trainer"]["step"]
        with open(os.path.join(run_dir, "resumed.log"), "a") as log:
            log.write(f"{os.getpid()} {step}\n")
    while True:
        step += 1
        loss = model(torch.randn(32, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "trainer": {"step": step}}
        mgr.maybe_save(step, lambda s=state: s, lambda: {"rng": capture_rank_state()})


def _zygote() -> None:
    """Read `RUN_DIR ASYNC` lines; fork a child for each, print its pid, then how it ended."""
    import torch

    import disttrain.checkpoint  # noqa: F401

    # Warm up (single-threaded, so fork-safe): the first module and optimizer construction pays about
    # a second of lazy imports, which every child would otherwise pay again.
    torch.set_num_threads(1)
    warm = torch.nn.Linear(2, 2)
    torch.optim.AdamW(warm.parameters()).step()
    for line in sys.stdin:
        run_dir, async_save = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                _child(run_dir, async_save == "1")
            finally:
                os._exit(3)  # only reached when the child failed by itself
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


def _check(run_dir: str) -> int | None:
    """Every committed checkpoint verifies; newest verified == newest committed; returns its step."""
    from disttrain.ckpt_write import CheckpointManager
    from disttrain.config import CheckpointConfig

    mgr = CheckpointManager(run_dir, CheckpointConfig())
    infos = mgr.list()
    for info in infos:
        assert mgr.verify(info.step) is None, mgr.verify(info.step)
    if not infos:
        return None
    assert mgr.latest_verified().step == infos[0].step
    latest = os.path.join(run_dir, "checkpoints", "latest")
    if os.path.exists(latest):
        with open(latest) as fh:
            assert fh.read() in {os.path.basename(i.path) for i in infos}
    return infos[0].step


def _resumed(run_dir: str) -> dict[int, int]:
    path = os.path.join(run_dir, "resumed.log")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return {int(p): int(s) for p, s in (line.split() for line in fh.read().splitlines())}


def _pythonpath() -> str:
    """This checkout first, so a child process runs the code under test even without an editable install."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture
def zygote(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": _pythonpath()}
    errors = open(tmp_path / "zygote.err", "w+")  # noqa: SIM115 - closed after the test
    proc = subprocess.Popen(
        [sys.executable, __file__, "zygote"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
        env=env,
    )
    yield proc, errors
    proc.stdin.close()
    proc.wait(10)
    errors.close()


def test_kill_9_at_random_moments_never_breaks_a_checkpoint(tmp_path, zygote):
    proc, errors = zygote
    run_dir, rng, start = str(tmp_path / "run"), random.Random(1234), time.monotonic()
    newest, mid_save_kills = None, 0
    for trial in range(TRIALS):
        proc.stdin.write(f"{run_dir} {trial % 2}\n")
        proc.stdin.flush()
        pid = int(proc.stdout.readline())
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(pid, signal.SIGKILL)
        code = int(proc.stdout.readline())
        errors.seek(0)
        assert code == -signal.SIGKILL, f"trial {trial}: the child exited by itself ({code}): {errors.read()}"
        ckpts = os.path.join(run_dir, "checkpoints")
        mid_save_kills += any(".tmp-" in name for name in os.listdir(ckpts)) if os.path.isdir(ckpts) else 0
        if pid in _resumed(run_dir):  # it got as far as loading: from the newest checkpoint there was
            assert _resumed(run_dir)[pid] == newest, f"trial {trial}: resumed from the wrong step"
        now = _check(run_dir)
        assert newest is None or (now is not None and now >= newest), (trial, newest, now)
        newest = now
    assert time.monotonic() - start < MAX_SECONDS
    assert newest is not None and newest > TRIALS, "the children barely trained: the test proves nothing"
    assert len(_resumed(run_dir)) >= TRIALS // 2, "too few trials got to resume"
    print(f"{TRIALS} kills, newest step {newest}, {mid_save_kills} kills left a half-written save")


if __name__ == "__main__" and sys.argv[1:] == ["zygote"]:
    _zygote()
