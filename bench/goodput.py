"""Goodput on the real loopback SLURM cluster: `python -m bench.goodput` (root and SLURM's Debian
packages, as for tests/cluster: .ci/install_slurm.sh). Long: about (cycles + 1) x P per variant.

A run submitted with `launch/submit.py --nodes 2` (one CPU rank per node, gloo) on the two-node cluster
of tests/cluster/slurm_cluster.py is interrupted every P seconds of allocation (from the moment SLURM
shows it RUNNING) until it finishes, at least `--cycles` times:

- clean: a `high` partition job that needs both nodes preempts it (SIGTERM, GraceTime 30 s); disttrain
  saves, requeues itself and exits; once the preemptor is done the job is released with StartTime=now,
  so queue wait is excluded (it is reported apart);
- unclean: kill -9 of the job's rank processes (no grace, no save; the batch step fails), then
  `scontrol requeue` and StartTime=now, with a fixed and with the auto checkpoint interval;
- in-job: kill -9 of **one** rank every P seconds of a job submitted with `--in-job-restarts` and the
  local tier (checkpoint.local.every_steps); the harness does nothing else: each node's torch agent
  restarts its rank inside the allocation and the ranks resume from their local pieces (no requeue).

Per cycle (one segment): SLURM's held time (RUNNING/COMPLETING, polled every 0.25 s), the running time
events.jsonl shows (process start to exit), the time in steps kept, the lost time by cause, the steps
redone; goodput = kept-step time / running time, and against SLURM's held time too (which also counts
srun's launch before the process starts and the node clean-up after it exits). The final weights and
every logged number are compared with an uninterrupted `torchrun --nproc_per_node 2` run of the same
config, run alongside (its steps mostly sleep, like the job's).

The workload is the digits example with a sleep per step (tests.pipelines:ProbeDigits, step_delay) so
that two runs and other jobs share 2 cores without the steps themselves being the noise; start-up,
saves and stops are the real ones. Results: the `goodput` section of bench/RESULTS.md (bench/sections.py),
raw numbers in bench/RESULTS_goodput.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REPO, machine_info, median
from bench.sections import replace_section

sys.path.insert(0, str(REPO / "tests" / "cluster"))
from launch_support import WHOLE_CLUSTER, Reference, outcome, release, submit  # noqa: E402
from slurm_cluster import SlurmCluster, _pids_with_env  # noqa: E402

from disttrain import events as ev  # noqa: E402
from disttrain import goodput  # noqa: E402

STEP_DELAY = 0.1  # seconds of sleep per step; a step takes a little more
HELD = ("RUNNING", "COMPLETING", "CONFIGURING")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY")
GOALS = {120: 0.95, 60: 0.90}
IN_JOB_GOALS = {120: 0.96, 60: 0.93}  # issue 20: kill -9 of one rank every P s, restarted in the job
LOCAL_EVERY = 5  # in-job variant: a local piece every this many steps (about 0.5 s of training; was 20)


def run_args(steps: int, interval: tuple[str, ...]) -> tuple[str, ...]:
    return ("pipeline.target=tests.pipelines:ProbeDigits", f"pipeline.args.step_delay={STEP_DELAY}",
            f"trainer.max_steps={steps}", "trainer.log_every=50", "trainer.eval_every=0",
            "checkpoint.keep_last=2", *interval)  # fmt: skip


class Tracker(threading.Thread):
    """Polls `scontrol show job` and keeps (time, JobState, Restarts) at every change."""

    def __init__(self, cluster: SlurmCluster, job: int):
        super().__init__(daemon=True)
        self.cluster, self.job = cluster, job
        self.changes: list[tuple[float, str, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            info = self.cluster.scontrol_show_job(self.job)
            now, state, restarts = (
                time.time(),
                info.get("JobState", "GONE"),
                int(info.get("Restarts", "0") or 0),
            )
            if not self.changes or self.changes[-1][1:] != (state, restarts):
                self.changes.append((now, state, restarts))
            time.sleep(0.25)

    @property
    def state(self) -> str:
        return self.changes[-1][1] if self.changes else "UNKNOWN"

    def held(self) -> dict[int, float]:
        """Seconds SLURM held nodes for the job, per attempt (Restarts)."""
        out: dict[int, float] = {}
        for (t0, state, restarts), (t1, _, _) in zip(self.changes, self.changes[1:]):
            if state in HELD:
                out[restarts] = out.get(restarts, 0.0) + t1 - t0
        return out

    def running_since(self) -> float | None:
        """When the current attempt became RUNNING (None unless it is running now)."""
        if self.state not in HELD:
            return None
        start = len(self.changes) - 1
        while start > 0 and self.changes[start - 1][1] in HELD:
            start -= 1
        return self.changes[start][0]


@dataclass
class Variant:
    name: str
    unclean: bool
    period: float
    interval: tuple[str, ...]
    cycles: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)  # command, date, load, commit of the run that made it
    in_job: bool = False  # kill one rank; the job's own agents restart it (--in-job-restarts)


def wait(predicate: Any, timeout: float, what: str, poll: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def kill_ranks(job: int) -> int:
    """kill -9 every rank process of the job (the python processes srun started); returns how many."""
    pids = [p for p in _pids_with_env({f"SLURM_JOB_ID={job}".encode()}) if _is_rank(_cmdline(p))]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def _is_rank(cmdline: bytes) -> bool:
    """A rank: python running submitit's job entry point (srun's own command line names it too)."""
    argv = cmdline.split(b"\0")
    return os.path.basename(argv[0]).startswith(b"python") and b"submitit.core._submit" in argv


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def rank_pid(job: int, rank: int) -> int | None:
    """The training process of `rank` of an in-job-restarts job (torchrun's worker), if it runs now."""
    for pid in _pids_with_env({f"SLURM_JOB_ID={job}".encode()}):
        with contextlib.suppress(OSError):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ and b"disttrain.main" in _cmdline(pid).split(b"\0"):
                return pid
    return None


def kill_one_rank(job: int, run_dir: Path, tracker: Tracker) -> dict[str, Any]:
    """kill -9 rank 1 and wait until the ranks train again (a new `ready` event); what the harness saw."""
    pid = rank_pid(job, 1)
    if pid is None:
        return {}
    t0 = time.time()
    os.kill(pid, signal.SIGKILL)

    def training_again() -> bool:
        path = run_dir / "events.jsonl"
        records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        return any(e.get("event") == "ready" and e["time"] > t0 for e in records) or tracker.state not in HELD

    wait(training_again, 180, "the restarted ranks to train again")
    return {"killed_processes": 1, "kill_to_training_s": round(time.time() - t0, 2)}


def run_in_job(
    cluster: SlurmCluster, job: int, tracker: Tracker, v: Variant, run_dir: Path, cycles: int
) -> list:
    """Kill one rank every P seconds until the job ends; the job restarts it by itself."""
    seen: list[dict[str, Any]] = []
    wait(lambda: tracker.state in HELD or tracker.state in ENDED, 300, "the job to run")
    last = tracker.running_since() or time.time()
    while tracker.state in HELD:
        wait(lambda s=last: time.time() - s >= v.period or tracker.state not in HELD, v.period + 60, "P")
        if tracker.state not in HELD:
            break
        if len(seen) >= 3 * cycles:
            cluster.cancel(job)
            break
        last = time.time()
        got = kill_one_rank(job, run_dir, tracker)
        if got:
            seen.append(got)
            print(f"[goodput] {v.name}: kill {len(seen)} at {time.strftime('%H:%M:%S')}: {got}", flush=True)
    return seen


def interrupt(cluster: SlurmCluster, job: int, tracker: Tracker, v: Variant) -> dict[str, Any]:
    """One interruption of the running job, then its release; returns what the harness saw."""
    t0 = time.time()
    if v.unclean:
        killed = kill_ranks(job)
        wait(lambda: tracker.state in ENDED or tracker.state == "PENDING", 120, "the killed job to end")
        if tracker.state != "PENDING":
            cluster.requeue(job)
        # slurmd revokes an ended job's credential with a 1 s timestamp: an attempt of the same job
        # launched within that second is refused ("Job credential revoked") and the job ends FAILED.
        time.sleep(2)
        seen: dict[str, Any] = {"killed_processes": killed}
    else:
        high = cluster.sbatch("--partition=high", *WHOLE_CLUSTER, wrap="sleep 1")
        wait(lambda: tracker.state == "PENDING", 120, "the preempted job to requeue itself")
        seen = {"off_nodes_s": round(time.time() - t0, 2)}
        cluster.wait_state(high, "COMPLETED", timeout=120)
    wait(lambda: tracker.state == "PENDING", 60, "the job to be pending")
    release(cluster, job)
    return seen


def run_variant(cluster: SlurmCluster, v: Variant, cycles: int, root: Path) -> Variant:
    steps = int((cycles + 0.5) * v.period / STEP_DELAY)  # enough training for `cycles` interruptions
    args = run_args(steps, v.interval)
    base = root / v.name
    shutil.rmtree(base, ignore_errors=True)
    reference = Reference(base / "reference", args, steps)
    run_dir = base / "run"
    # --leave-out-after 0: the harness's kills are not the node's fault, and would get it left out
    in_job = ("--in-job-restarts", "1000", "--leave-out-after", "0", f"checkpoint.local.every_steps={LOCAL_EVERY}",
              f"checkpoint.local.dir={base / 'local'}") if v.in_job else ()  # fmt: skip
    job = submit(cluster, run_dir, "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "2",
                 "--time", "600", "--max-requeues", "1000", *in_job, *args)  # fmt: skip
    tracker = Tracker(cluster, job)
    tracker.start()
    seen: list[dict[str, Any]] = []
    try:
        if v.in_job:
            seen = run_in_job(cluster, job, tracker, v, run_dir, cycles)
        while not v.in_job:
            wait(lambda: tracker.state in HELD or tracker.state in ENDED, 300, "the job to run")
            if tracker.state in ENDED:
                break
            since = tracker.running_since() or time.time()
            wait(lambda s=since: time.time() - s >= v.period or tracker.state not in HELD, v.period + 60, "P")
            if tracker.state not in HELD:
                break  # finished within this cycle
            if len(seen) >= 3 * cycles:  # it does not get anywhere (a save interval longer than a cycle)
                cluster.cancel(job)
                break
            seen.append(interrupt(cluster, job, tracker, v))
            print(f"[goodput] {v.name}: interruption {len(seen)} at {time.strftime('%H:%M:%S')}", flush=True)
        wait(lambda: tracker.state in ENDED, 120, "the job to end")
        tracker.done.set()
        finished = (run_dir / "checkpoints" / f"step_{steps:08d}").exists()
        same = finished and outcome(run_dir, steps) == reference.outcome(timeout=3 * v.period * cycles)
    finally:
        tracker.done.set()
        reference.stop()
    return summarize(v, run_dir, tracker, seen, same, steps, finished)


def summarize(v: Variant, run_dir: Path, tracker: Tracker, seen: list[dict[str, Any]], same: bool,
              steps: int, finished: bool) -> Variant:  # fmt: skip
    events = [
        json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()
    ]
    g = goodput.compute(events)
    held = tracker.held()
    for i, (seg, evs) in enumerate(zip(g.segments, ev.split_segments(events))):
        restart = int(evs[0].get("restart_count", i))
        slurm = held.get(restart)
        v.cycles.append({
            "cycle": i + 1, "restart": restart, "ended": seg.ended, "slurm_held_s": slurm,
            "running_s": seg.running_s, "training_s": seg.training_s, "goodput": seg.training_s / seg.running_s,
            "goodput_vs_held": seg.training_s / slurm if slurm else None, "queued_before_s": seg.queued_before_s,
            "startup": seg.startup, "lost": seg.lost, "steps": seg.reached - seg.start_step,
            "redone_steps": seg.reached - seg.kept, "signal_to_exit_s": seg.signal_to_exit_s,
            **(seen[i] if i < len(seen) else {}),
        })  # fmt: skip
    total_held = sum(held.values())
    interrupted = [c for c in v.cycles if c["ended"] != "finish"]
    v.summary = {
        "steps": steps, "segments": len(g.segments), "interruptions": len(seen), "goodput": g.ratio,
        "goodput_vs_held": g.training_s / total_held if total_held else None, "running_s": g.running_s,
        "slurm_held_s": total_held, "queued_s": g.queued_s, "training_s": g.training_s, "lost": g.lost,
        "startup": g.startup, "bit_identical": same, "finished": finished,
        "redone_steps_per_interruption": (sum(c["redone_steps"] for c in interrupted) / len(interrupted)
                                          if interrupted else None),
        "committed_steps_lost": sum(c["redone_steps"] for c in interrupted if c["ended"] == "requeue"),
        "saves": sum(1 for e in events if ev.kind(e) == ev.CHECKPOINT and e.get("reason") == "periodic"),
        "last_interval": g.interval,
    }  # fmt: skip
    return v


# ---------------------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def report(variants: list[Variant]) -> str:
    info = variants[0].run
    lines = [
        "## Goodput on the loopback SLURM cluster (issue 13)", "",
        f"{info['nproc']} CPUs ({info['cpu_model']}), shared with other jobs. Two SLURM nodes on this one machine, "
        "one CPU rank each over gloo, submitted with `launch/submit.py --nodes 2`; digits with a 0.1 s sleep "
        "per step; interrupted every P seconds of allocation; requeued with StartTime=now (queue time "
        "excluded). How it works: `bench/goodput.py`. Each variant's run (from the repository root, as root):", "",
        "| variant | command | date | load average at start / end | commit |", "| --- | --- | --- | --- | --- |",
        *[_run_row(v) for v in variants], "",
        "Goodput = time in steps kept in the final result / running time. *events*: running time as "
        "events.jsonl shows it (process start to exit, what `disttrain status` reports); *SLURM*: the time SLURM "
        "held the nodes (polled), which also counts srun's launch and the clean-up around the processes.", "",
        "| variant | P | interruptions | goodput (events) | goodput (SLURM held) | goal | redone steps / interruption "
        "| final weights vs uninterrupted |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for v in variants:
        s = v.summary
        goal = (
            IN_JOB_GOALS.get(int(v.period))
            if v.in_job
            else GOALS.get(int(v.period))
            if not v.unclean
            else None
        )
        verdict = (
            "(context)"
            if goal is None
            else (f">= {goal:.0%}: **{'met' if (s['goodput_vs_held'] or 0) >= goal else 'missed'}**")
        )
        redone = s["redone_steps_per_interruption"]
        lines.append(f"| {v.name} | {v.period:.0f} s | {s['interruptions']} | {_pct(s['goodput'])} | "
                     f"{_pct(s['goodput_vs_held'])} | {verdict} | {'n/a' if redone is None else f'{redone:.1f}'} | "
                     f"{_same(s)} |")  # fmt: skip
    lines += ["", "Lost time by cause, whole run (seconds): start-up, checkpoint saves, eval, signal-to-exit, "
              "teardown, restart in place, redone, stragglers, unexplained; SLURM-held minus events running time.", "",
              "| variant | running | start-up | saves | eval | stop | teardown | restart | redone | stragglers | "
              "unexplained | outside the process | queued (excluded) |", "|" + " --- |" * 13]  # fmt: skip
    for v in variants:
        s, lost = v.summary, v.summary["lost"]
        outside = (s["slurm_held_s"] or 0) - s["running_s"]
        lines.append(f"| {v.name} | {s['running_s']:.0f} | " + " | ".join(_s(lost.get(c, 0.0)) for c in goodput.CAUSES)
                     + f" | {outside:.1f} | {s['queued_s']:.0f} |")  # fmt: skip
    for v in variants:
        lines += ["", f"### {v.name}: per cycle", "", _cycle_head(v), "| " + " | ".join(["---"] * 9) + " |"]
        lines += [_cycle_row(c) for c in v.cycles]
        st = v.summary["startup"]
        n = max(1, v.summary["segments"])
        lines += ["", "Start-up per segment, mean: " + ", ".join(f"{k} {x / n:.2f} s" for k, x in st.items())
                  + f". Periodic saves: {v.summary['saves']}."]  # fmt: skip
        if v.summary["last_interval"]:
            lines.append(
                f"Checkpoint interval at the end: {goodput.describe_interval(v.summary['last_interval'])}."
            )
        if v.in_job:
            lines += ["", *kill_split(v)]
    return "\n".join(lines)


SPLIT = (
    ("detection, teardown, agents' re-rendezvous", lambda after: after["lost"]["restart"]),
    ("interpreter and imports", lambda after: after["startup"]["imports"]),
    ("process group", lambda after: after["startup"]["process_group"]),
    ("build (model, data, optimizer)", lambda after: after["startup"]["build"]),
    ("load (the local tier's pieces)", lambda after: after["startup"]["checkpoint"]),
    ("other", lambda after: after["startup"]["other"]),
)


def kill_split(v: Variant) -> list[str]:
    """Where the time from a kill -9 to training again goes, per restart: the restarted segment's events
    (the `restart` cause: the killed segment's last record to the new processes' start, which takes in
    the failure's detection, the teardown of the surviving ranks and the agents' new rendezvous round;
    then the new processes' own `ready` split), against the harness's own clock."""
    pairs = [
        (c, after) for c, after in zip(v.cycles, v.cycles[1:]) if c.get("kill_to_training_s") is not None
    ]
    if not pairs:
        return []
    head = "| phase | " + " | ".join(f"restart {after['restart']}" for _, after in pairs) + " | median |"
    lines = [
        f"Kill -9 to training again, split (seconds; {v.name}):",
        "",
        head,
        "|" + " --- |" * (len(pairs) + 2),
    ]
    for name, part in SPLIT:
        values = [part(after) for _, after in pairs]
        lines.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in values) + f" | {median(values):.2f} |")
    total = [sum(part(after) for _, part in SPLIT) for _, after in pairs]
    harness = [c["kill_to_training_s"] for c, _ in pairs]
    lines.append("| sum | " + " | ".join(f"{x:.2f}" for x in total) + f" | {median(total):.2f} |")
    lines.append("| the harness's clock (kill to a new step seen, polled every 0.25 s) | "
                 + " | ".join(f"{x:.2f}" for x in harness) + f" | {median(harness):.2f} |")  # fmt: skip
    return lines


def _run_row(v: Variant) -> str:
    r = v.run
    load = " / ".join("/".join(f"{x:.2f}" for x in r[k]) for k in ("load_avg_at_start", "load_avg_at_end"))
    return f"| {v.name} | `{r['command']}` | {r['date']} | {load} | {r['git_commit']} |"


def _same(s: dict[str, Any]) -> str:
    if not s["finished"]:
        return f"did not finish ({s['interruptions']} interruptions)"
    return "bit-identical" if s["bit_identical"] else "**differ**"


def _cycle_head(v: Variant) -> str:
    last = (
        "kill -9 to training again s"
        if v.in_job
        else "kill -9: processes"
        if v.unclean
        else "signal to off the nodes"
    )
    return (
        f"| cycle | ended | SLURM held s | running s | start-up s | stop s | redone steps | goodput (events / "
        f"SLURM) | {last} |"
    )


def _cycle_row(c: dict[str, Any]) -> str:
    harness = c.get("off_nodes_s", c.get("kill_to_training_s", c.get("killed_processes", "")))
    return (
        f"| {c['cycle']} | {c['ended']} | {_s(c['slurm_held_s'])} | {c['running_s']:.2f} | "
        f"{sum(c['startup'].values()):.2f} | {c['lost']['stop']:.2f} | {c['redone_steps']} | "
        f"{_pct(c['goodput'])} / {_pct(c['goodput_vs_held'])} | {harness} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.goodput", description=__doc__.split("\n\n")[0])
    p.add_argument("--periods", default="120,60", help="clean variant: seconds between preemptions")
    p.add_argument(
        "--unclean-period", type=float, default=60.0, help="unclean variant: seconds between kills"
    )
    p.add_argument(
        "--fixed-steps", type=int, default=250, help="unclean variant: the fixed interval compared"
    )
    p.add_argument("--cycles", type=int, default=10, help="interruptions per variant (at least)")
    p.add_argument("--variants", default="clean,unclean", help="comma list of clean, unclean, in-job")
    p.add_argument("--in-job-periods", default="120,60", help="in-job variant: seconds between kills")
    p.add_argument("--workdir", default="/tmp/gpbench", help="cluster and runs (short: unix socket paths)")
    p.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    p.add_argument("--report-only", action="store_true", help="rewrite the section from RESULTS_goodput.json")
    args = p.parse_args(argv)
    if args.report_only:
        replace_section(
            args.out, "goodput", report(_merged(Path(args.out).with_name("RESULTS_goodput.json"), []))
        )
        return 0
    command = "python -m bench.goodput" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    plan: list[Variant] = []
    if "clean" in args.variants.split(","):
        plan += [Variant(f"clean P={int(x)}", False, float(x), ("checkpoint.interval=auto",))
                 for x in args.periods.split(",")]  # fmt: skip
    if "unclean" in args.variants.split(","):
        up = args.unclean_period
        fixed = f"checkpoint.every_steps={args.fixed_steps}"
        plan += [Variant(f"unclean P={up:.0f}, fixed every {args.fixed_steps} steps", True, up, (fixed,)),
                 Variant(f"unclean P={up:.0f}, auto interval", True, up, ("checkpoint.interval=auto",))]  # fmt: skip
    if "in-job" in args.variants.split(","):
        plan += [Variant(f"in-job P={int(x)}, local every {LOCAL_EVERY} steps", True, float(x),
                         ("checkpoint.interval=auto",), in_job=True) for x in args.in_job_periods.split(",")]  # fmt: skip
    signal.signal(signal.SIGTERM, _exit_cleanly)  # stop the cluster's daemons on the way out
    info = machine_info()
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    cluster = SlurmCluster(root / "slurm", grace_time_s=30)
    cluster.start()
    done: list[Variant] = []
    try:
        with cluster.activate():
            for v in plan:
                print(f"[goodput] {v.name} ...", flush=True)
                info["load_avg_at_start"], info["date"] = (
                    os.getloadavg(),
                    time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                )
                done.append(run_variant(cluster, v, args.cycles, root / "runs"))
                v.run = {**info, "command": command, "load_avg_at_end": os.getloadavg()}
                print(f"[goodput] {v.name}: {json.dumps(v.summary, default=str)}", flush=True)
                cluster.cancel_all()
    finally:
        cluster.stop()
        info["load_avg_at_end"] = os.getloadavg()
        if done:
            raw_path = Path(args.out).with_name("RESULTS_goodput.json")
            variants = _merged(raw_path, done)  # a rerun of some variants keeps the others' results
            replace_section(args.out, "goodput", report(variants))
            raw = {"variants": [v.__dict__ for v in variants]}
            raw_path.write_text(json.dumps(raw, indent=1, default=str))
    return 0


def _merged(raw_path: Path, done: list[Variant]) -> list[Variant]:
    """The variants recorded before, with those just run put in their place (or added)."""
    fresh = {v.name: v for v in done}
    saved = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    whole = {**saved.get("machine", {}), "command": saved.get("command", "")}  # a file one run wrote
    kept = [
        Variant(**{**d, "run": d.get("run") or whole})
        for d in saved.get("variants", [])
        if d["name"] not in fresh
    ]
    return sorted([*kept, *done], key=lambda v: (v.unclean, v.in_job, -v.period, v.name))


def _exit_cleanly(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    raise SystemExit(main())
