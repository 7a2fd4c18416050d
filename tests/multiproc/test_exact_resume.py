"""Exact resume: 2 ranks over gloo, interrupted by SIGTERM at different points, restarted, and compared
with a run that was never interrupted. The per-step losses, eval metrics and final weights must be
bitwise equal. The signal goes to one rank only: the other must still stop at the same step."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.conftest import FAST, child_env, computed, main_cmd, read_jsonl, run_main

pytestmark = pytest.mark.multiproc

STEPS = 24
BASE = [
    "pipeline.target=tests.pipelines:ProbeDigits", f"trainer.max_steps={STEPS}", "trainer.log_every=1",
    "trainer.eval_every=10", "checkpoint.every_steps=4", "checkpoint.keep_last=2", "data.eval_batch_size=32",
    "pipeline.args.step_delay=0.05", *FAST,
]  # fmt: skip


def outcome(run_dir: Path) -> dict:
    """What a user compares: every logged number except wall-clock throughput, and the final weights."""
    records = computed(read_jsonl(run_dir / "metrics.jsonl"))
    manifest = json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").read_text())
    # The weights' files: model.safetensors, or (sharded) every rank's shard file.
    weights = {k: v["sha256"] for k, v in manifest["files"].items() if k.endswith(".safetensors")}
    return {"records": records, "weights": weights}


_REFERENCES: dict[tuple[str, ...], dict] = {}


def reference(tmp_path_factory, extra: tuple[str, ...]) -> dict:
    if extra not in _REFERENCES:
        run_dir = tmp_path_factory.mktemp("reference")
        proc = run_main(f"run_dir={run_dir}", *BASE, *extra, nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _REFERENCES[extra] = outcome(run_dir)
    return _REFERENCES[extra]


def interrupt(run_dir: Path, extra: list[str], ready, timeout: float = 120) -> None:
    """Start a 2-rank run, wait until `ready(run_dir)`, SIGTERM one worker, wait for the job to end."""
    proc = subprocess.Popen(main_cmd(f"run_dir={run_dir}", *BASE, *extra, nproc=2), env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not ready(run_dir):
            assert proc.poll() is None, (
                "the run ended before the interruption point: " + proc.stdout.read()[-3000:]
            )
            assert time.monotonic() < deadline, "interruption point never reached"
            time.sleep(0.02)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        workers[-1].send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    events = read_jsonl(run_dir / "events.jsonl")
    stopped = [e for e in events if e["event"] == "stopped"]
    assert stopped and stopped[-1]["step"] < STEPS, out[-3000:]
    # Only one worker was signalled; the record still names the signal, whichever rank got it.
    assert stopped[-1]["signal"] == "SIGTERM"
    assert f"step_{stopped[-1]['step']:08d}" in (run_dir / "checkpoints" / "latest").read_text()


def resume(run_dir: Path, extra: list[str]) -> None:
    proc = run_main(f"run_dir={run_dir}", *BASE, *extra, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step" in proc.stdout


def logged_step(at_least: int):
    def ready(run_dir: Path) -> bool:
        path = run_dir / "metrics.jsonl"
        return path.exists() and any(r.get("step", 0) >= at_least for r in read_jsonl(path))

    return ready


def sigterm_worker_after(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 180) -> str:
    """Once `step` is logged, SIGTERM the newest worker of the torchrun `proc` (started with stdout piped)
    and return what the run printed; the run must still be going until then."""
    try:
        deadline = time.monotonic() + timeout
        while not logged_step(step)(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stdout.read()[-3000:] if proc.stdout else ""
            )
            time.sleep(0.02)
        psutil.Process(proc.pid).children()[-1].send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return out


def after_checkpoint(step: int):
    def ready(run_dir: Path) -> bool:
        path = run_dir / "events.jsonl"
        return path.exists() and any(
            e["event"] == "checkpoint" and e["step"] == step for e in read_jsonl(path)
        )

    return ready


def during_eval(marker_dir: Path):
    return lambda run_dir: any(marker_dir.glob("eval_*"))


@pytest.mark.parametrize(
    "case, extra, ready",
    [
        ("mid_epoch", [], logged_step(6)),
        ("right_after_save", [], after_checkpoint(8)),
        ("grad_accum", ["trainer.grad_accum=2"], logged_step(5)),
        ("async_save", ["checkpoint.async_save=true"], logged_step(14)),
    ],
)
def test_interrupted_run_is_bitwise_identical(tmp_path, tmp_path_factory, case, extra, ready):
    expected = reference(tmp_path_factory, tuple(e for e in extra if "grad_accum" in e))
    run_dir = tmp_path / case
    interrupt(run_dir, extra, ready)
    resume(run_dir, extra)
    got = outcome(run_dir)
    assert got["records"] == expected["records"]
    assert got["weights"] == expected["weights"]


def test_interrupted_during_eval_redoes_the_eval(tmp_path, tmp_path_factory):
    markers = tmp_path / "markers"
    markers.mkdir()
    slow_eval = [f"pipeline.args.marker_dir={markers}", "pipeline.args.eval_delay=0.3"]
    run_dir = tmp_path / "run"
    interrupt(run_dir, slow_eval, during_eval(markers))
    first = read_jsonl(run_dir / "metrics.jsonl")
    assert not any("eval/loss" in r for r in first), "the eval was cut short, so it was never logged"
    resume(run_dir, slow_eval)
    expected = reference(tmp_path_factory, ())
    got = outcome(run_dir)
    assert got["records"] == expected["records"] and got["weights"] == expected["weights"]


def test_resume_at_another_world_size_sees_every_sample_once(tmp_path):
    record = tmp_path / "samples"
    record.mkdir()
    from disttrain.pipelines.digits import DigitsPipeline

    steps_per_epoch = len(DigitsPipeline().datasets()["train"]) // 64  # one epoch of full global batches
    args = [
        f"pipeline.args.record_dir={record}",
        f"trainer.max_steps={steps_per_epoch}",
        "trainer.eval_every=0",
    ]
    run_dir = tmp_path / "run"
    interrupt(run_dir, args, logged_step(7))
    proc = run_main(f"run_dir={run_dir}", *BASE, *args, nproc=1)  # same global batch, one rank
    assert proc.returncode == 0 and "resumed from step" in proc.stdout, proc.stderr[-3000:]
    seen = Counter(
        int(i) for f in record.iterdir() for line in f.read_text().split("\n") for i in line.split()
    )
    assert set(seen.values()) == {1}, "no sample repeated"
    assert sum(seen.values()) == steps_per_epoch * 64, "no sample skipped"
