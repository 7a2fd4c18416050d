"""The shared run of the writer, plot, status and secrets tests (it holds no tests itself).

One real training run (`python -m disttrain.main`, wandb offline, TensorBoard, curves) with credentials
planted in the environment and in `pipeline.args.api_token`, taken through every way a segment ends:

1. kill -9 after the step-20 checkpoint, with steps up to >= 30 logged (they are redone);
2. resumed from 20, fails in the user's loss after step 50 (exit 1; the step-40 checkpoint survives);
3. resumed from 40, SIGTERM once step 60's train metrics are logged: it lands in the (slowed) eval
   of step 60, which is cut short; saves at 60, exit 143;
4. resumed from 60, redoes the eval of step 60, runs to step 80 (exit 0).

Built once per pytest session (about 25 s on two cores) and read by every test that needs it.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import child_env, main_cmd

MAX_STEPS = 80
ENV_SECRETS = {
    "WANDB_API_KEY": "wandbkey0123456789abcdef0123456789abcdef",
    "AWS_SECRET_ACCESS_KEY": "awsSECRETpl4nted/K7MDENG+bPxRfiCY",
    "HF_TOKEN": "hf_pl4ntedTOKENxyzzy0123456789",
}
CONFIG_SECRET = "cfgTOKENpl4nted-9f8e7d6c5b4a"
ARGS = (
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.log_every=5",
    "trainer.eval_every=20",
    "trainer.progress=plain",
    "checkpoint.every_steps=20",
    "log.wandb=true",
    "log.wandb_tags=[ci]",
    "log.tensorboard=true",
    "pipeline.target=tests.unit.secrets_pipeline:SecretDigits",
    "data.eval_batch_size=64",  # 5 eval batches: a stop is agreed between them
    "pipeline.args.step_delay=0.02",
    "pipeline.args.eval_delay=0.08",
    f"pipeline.args.api_token={CONFIG_SECRET}",
)


@dataclass
class SharedRun:
    run_dir: Path
    home: Path  # where wandb's own config and cache dirs were pointed
    codes: list[int] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # stdout + stderr of every segment
    status_while_running: dict[str, Any] = field(default_factory=dict)


def logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return max(json.loads(line)["step"] for line in lines if line.strip())
    except (OSError, ValueError):
        return -1


def wait_until(predicate: Any, proc: subprocess.Popen, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@functools.cache
def shared_run(base: Path) -> SharedRun:
    """The interrupted run described above, under `base` (pass tmp_path_factory.getbasetemp())."""
    run = SharedRun(run_dir=base / "shared_run", home=base / "shared_home")
    env = child_env(
        **ENV_SECRETS,
        WANDB_CONFIG_DIR=str(run.home / "wandb_config"),
        WANDB_CACHE_DIR=str(run.home / "wandb_cache"),
        WANDB_DATA_DIR=str(run.home / "wandb_data"),
    )
    ckpt20 = run.run_dir / "checkpoints" / "step_00000020" / "manifest.json"
    ckpt40 = run.run_dir / "checkpoints" / "step_00000040" / "manifest.json"

    def kill_at(predicate: Any, what: str, sig: int, **extra: str) -> None:
        proc = start(run, {**env, **extra})
        wait_until(predicate, proc, what)
        if sig == signal.SIGKILL:
            from disttrain.commands.run_status import collect

            run.status_while_running = collect(str(run.run_dir))
        proc.send_signal(sig)
        finish(run, proc)

    kill_at(lambda: ckpt20.exists() and logged_step(run.run_dir) >= 30, "step 30", signal.SIGKILL)
    finish(run, start(run, {**env, "DISTTRAIN_TEST_FAIL_AFTER": "30"}))  # 20 + 30: fails in step 51
    kill_at(lambda: ckpt40.exists() and logged_step(run.run_dir) >= 60, "step 60", signal.SIGTERM)
    finish(run, start(run, env, "log.plot=true"))  # curves cost ~1 s a segment: drawn by the last only
    return run


def start(run: SharedRun, env: dict[str, str], plot: str = "log.plot=false") -> subprocess.Popen:
    log = run.home / f"segment{len(run.codes) + 1}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(
            main_cmd(f"run_dir={run.run_dir}", *ARGS, plot),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )


def finish(run: SharedRun, proc: subprocess.Popen) -> None:
    proc.wait(timeout=120)
    run.codes.append(proc.returncode)
    run.outputs.append((run.home / f"segment{len(run.codes)}.log").read_text())
