"""Section 4: what resuming costs, and how fast a preempted run gets out.

Resume, as a user runs it: `python -m disttrain.main` (one process) timed from just before the process
starts to its first completed step's console line (log_every=1). Fresh (empty run_dir) and resumed
(from a checkpoint written once at the start of the section) runs alternate F R F R; after each resumed
run, CheckpointManager.load() of that checkpoint is timed in this process, the page cache dropped
first. The time a resume adds is set against that load time. Interpreter start-up on a shared machine
swings by seconds, so the same comparison is also made in one process (the worker below): Trainer
construction on an empty run_dir and on the checkpointed one, alternated, each followed by a load().

Preemption: the same job started with many steps to go; after a few steps, SIGTERM; timed until the
process has exited. The allowance is measured in the same run: its median step (from the console
lines' arrival times) plus the save it made (events.jsonl's checkpoint seconds) plus 1 s.

The model is tiny_gpt made big enough that its checkpoint (about 130 MB with AdamW state) takes
measurable time to load while a CPU step stays under a second.

Worker: python -m bench.resume SPEC.json OUT.json
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.ckpt import drop_cache, manager
from bench.common import REPO, Row, Section, child_env, median, ratio_row, run_worker, spread, worker_main
from disttrain import events as ev

MODEL = [
    "--config", "configs/tiny_gpt.yaml", "pipeline.args.n_layer=6", "pipeline.args.d_model=384",
    "pipeline.args.n_head=6", "pipeline.args.block_size=64", "data.batch_size=2", "scheduler.warmup_steps=0",
    "trainer.log_every=1", "trainer.eval_every=0", "trainer.progress=none", "log.plot=false",
    "checkpoint.every_steps=0",
]  # fmt: skip
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| train/loss")


def run(quick: bool) -> Section:
    sec = Section("resume", "4. Resume cost and preemption exit (python -m disttrain.main, one process, CPU)")
    reps = 2 if quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as root:
        src = os.path.join(root, "resume_src")
        _first_step_time(src, "trainer.max_steps=2", "checkpoint.save_final=true")  # the checkpoint at step 2
        r = measure_resume(reps, root, src)
        spec = {"src": src, "root": root, "reps": 2 * reps + 1, "step": 2, "config": MODEL[1],
                "overrides": [*MODEL[2:], "trainer.max_steps=3"]}  # fmt: skip
        [c] = run_worker("bench.resume", spec, threads=2)
        p = measure_preempt(reps, root)
    sec.extra.update(resume=r, construction=c, preempt=p)
    sec.rows.append(ratio_row("process start to first completed step: resumed vs fresh", r["resumed"], r["fresh"],
                              "s", "(context)", None))  # fmt: skip
    of = f"time a resume adds vs load() of its {r['ckpt_bytes'] / 1e6:.0f} MB checkpoint"
    sec.rows.append(_added_row(f"process start to first step: {of}", r, judged=False))
    sec.rows.append(_added_row(f"Trainer construction, in one process: {of}", c, judged=True))
    sec.rows.append(_preempt_row(p))
    return sec


def _added_row(figure: str, m: dict[str, list[float]], judged: bool) -> Row:
    """median(resumed) - median(fresh) against median(load); the goal is judged on the in-process
    figure only (the process-level one carries the start-up noise)."""
    added = median(m["resumed"]) - median(m["fresh"])
    lo, hi = spread([(a - b) / t for a, b, t in zip(m["resumed"], m["fresh"], m["load"])])
    ratio = added / median(m["load"])
    return Row(figure, added, median(m["load"]), "s", ratio, "<= 1.0" if judged else "(context: start-up noise)",
               (ratio <= 1.0) if judged else None, f"{lo:.2f}-{hi:.2f} (n={len(m['load'])}, pairwise)",
               note="added time = median(resumed) - median(fresh)")  # fmt: skip


def _start(run_dir: str, *extra: str) -> tuple[subprocess.Popen, float]:
    cmd = [sys.executable, "-m", "disttrain.main", *MODEL, f"run_dir={run_dir}", *extra]
    env = child_env(threads=2)  # one process: both cores
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, t0


def _first_step_time(run_dir: str, *extra: str) -> tuple[float, str]:
    """Seconds from process start to the first completed step's console line; waits for exit."""
    proc, t0 = _start(run_dir, *extra)
    first, lines = None, []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if first is None and STEP_LINE.match(line):
            first = time.perf_counter() - t0
    _, err = proc.communicate(timeout=300)
    if proc.returncode != 0 or first is None:
        out = "".join(lines)[-2000:]
        raise RuntimeError(f"disttrain.main exited {proc.returncode}:\n{out}\n{err[-3000:]}")
    return first, "".join(lines)


def measure_resume(reps: int, root: str, src: str) -> dict[str, Any]:
    out: dict[str, Any] = {"fresh": [], "resumed": [], "load": []}
    ckpts = os.path.join(src, "checkpoints")
    out["ckpt_bytes"] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ckpts) for f in fs)
    for i in range(reps):
        fresh = os.path.join(root, f"fresh{i}")
        out["fresh"].append(_first_step_time(fresh, "trainer.max_steps=1", "checkpoint.save_final=false")[0])
        shutil.rmtree(fresh)
        drop_cache(src)
        t, text = _first_step_time(src, "trainer.max_steps=3", "checkpoint.save_final=false")
        if "resumed from step 2" not in text:
            raise RuntimeError(f"the resumed run did not resume from step 2:\n{text[-2000:]}")
        out["resumed"].append(t)
        out["load"].append(_timed_load(src, 2))
    return out


def _timed_load(run_dir: str, step: int) -> float:
    drop_cache(run_dir)
    t0 = time.perf_counter()
    manager(run_dir).load(step)
    return time.perf_counter() - t0


def measure_preempt(reps: int, root: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"exit": [], "step": [], "save": [], "code": [], "agreed_after": []}
    for i in range(reps):
        for key, value in _preempt_once(os.path.join(root, f"preempt{i}")).items():
            out[key].append(value)
    return out


def _preempt_once(run_dir: str, wait_steps: int = 3) -> dict[str, float]:
    """SIGTERM once `wait_steps` steps are printed; then the facts from the run's events.jsonl."""
    proc, _ = _start(run_dir, "trainer.max_steps=100000", "checkpoint.save_final=true")
    stamps = []
    for line in proc.stdout:  # type: ignore[union-attr]
        if STEP_LINE.match(line):
            stamps.append(time.perf_counter())
            if len(stamps) >= wait_steps:
                break
    t0, wall0 = time.perf_counter(), time.time()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    out = {"exit": time.perf_counter() - t0, "code": float(proc.returncode),
           "step": median([b - a for a, b in zip(stamps, stamps[1:])])}  # fmt: skip
    with open(os.path.join(run_dir, "events.jsonl"), encoding="utf-8") as fh:
        events = [json.loads(line) for line in fh if line.strip()]
    saves = [e["seconds"] for e in events if ev.kind(e) == ev.CHECKPOINT]
    agreed = [e["time"] for e in events if ev.kind(e) == ev.SIGNAL]  # written before the save
    out["save"] = float(saves[-1]) if saves else float("nan")
    out["agreed_after"] = agreed[-1] - wall0 if agreed else float("nan")
    shutil.rmtree(run_dir)
    return out


def _preempt_row(p: dict[str, list[float]]) -> Row:
    allow = [s + v + 1.0 for s, v in zip(p["step"], p["save"])]
    return ratio_row("SIGTERM to process exit vs one step + one save + 1 s", p["exit"], allow, "s", "<= 1.0",
                     lambda x: x <= 1.0,
                     note=f"median step {median(p['step']):.2f} s, stop agreed {median(p['agreed_after']):.2f} s "
                          f"after SIGTERM, save {median(p['save']):.2f} s; exit codes {sorted({int(x) for x in p['code']})}")  # fmt: skip


# ------------------------------------------------------------------------------------ worker side


def worker(spec: dict[str, Any]) -> dict[str, list[float]]:
    """Trainer construction, fresh vs resumed, in one process (no interpreter start or imports in the
    figure). The first round warms up lazy initialisation and is dropped."""
    from disttrain.cluster import detect
    from disttrain.config import load_config
    from disttrain.trainer import build_trainer

    def construct(run_dir: str, expect_step: int) -> float:
        cfg = load_config(spec["config"], [*spec["overrides"], f"run_dir={run_dir}"])
        drop_cache(spec["src"])
        t0 = time.perf_counter()
        trainer = build_trainer(cfg, detect())
        seconds = time.perf_counter() - t0
        assert trainer.step == expect_step, "resumed from the wrong step"
        del trainer
        gc.collect()
        return seconds

    out: dict[str, list[float]] = {"fresh": [], "resumed": [], "load": []}
    for i in range(spec["reps"] + 1):
        fresh = os.path.join(spec["root"], f"ctor_fresh{i}")
        out["fresh"].append(construct(fresh, 0))
        shutil.rmtree(fresh, ignore_errors=True)
        out["resumed"].append(construct(spec["src"], spec["step"]))
        out["load"].append(_timed_load(spec["src"], spec["step"]))
    return {k: v[1:] for k, v in out.items()}


if __name__ == "__main__":
    worker_main(worker)
