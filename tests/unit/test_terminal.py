"""What a user sees on a terminal: one progress bar whose figures are the window logged at that step, no
train log lines beside it, eval lines above it, and a last line that says where the results are. Run
under a real pseudo-terminal, as a person at a shell would."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

from tests.conftest import REPO, child_env, read_jsonl


def _run_on_a_terminal(*args: str, columns: int = 120) -> str:
    leader, follower = pty.openpty()
    # A terminal has a size (a bare pty has none, and tqdm then draws nothing): 40 rows x `columns`.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = child_env(COLUMNS=str(columns), LINES="40", TERM="xterm")
    proc = subprocess.Popen(
        [sys.executable, "-m", "disttrain.main", *args],
        stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env, cwd=str(REPO),
    )  # fmt: skip
    os.close(follower)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], 120)
            if not ready:
                break
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed its side
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(leader)
        proc.wait(timeout=60)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_gets_one_bar_with_the_logged_figures_and_no_train_lines(tmp_path):
    run_dir = tmp_path / "run"
    out = _run_on_a_terminal(
        f"run_dir={run_dir}", "trainer.max_steps=60", "trainer.log_every=10", "trainer.eval_every=30",
        "log.plot=false",
    )  # fmt: skip
    assert "train/loss" not in out, "the bar shows the train window: no log line repeats it"
    assert re.search(r"step 30/60 \| eval/", out) and re.search(r"step 60/60 \| eval/", out), out
    bars = re.findall(r"loss=([0-9.]+)", out)
    assert bars, out
    last_logged = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r][-1]
    assert last_logged["step"] == 60
    assert bars[-1] == f"{last_logged['train/loss']:.4f}", (
        "the final bar shows the last window, not an older one"
    )
    assert f"finished at step 60; results in {run_dir}" in out
    # Every redraw of the bar fits the terminal: nothing wraps.
    frames = [f for line in out.split("\n") for f in line.split("\r") if "step/s" in f or "it/s" in f]
    assert frames and max(len(f.strip()) for f in frames) <= 120, max(frames, key=len)
