"""Observe submitit 1.5.x on the loopback cluster: env, time limit, preemption, requeue.

    python tests/cluster/experiments/submitit_probe.py env|timeout|preempt|preempt_usr [workdir]

Starts its own SlurmCluster (``preempt_usr`` adds PreemptParameters=send_user_signal), runs one
experiment and prints a timeline: every task logs the signals it receives (then hands them to
submitit's own handler), checkpoint() calls, SLURM_RESTART_COUNT, and scontrol's view of the job.
Facts found this way are in ../NOTES.md.
"""

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import submitit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slurm_cluster import SlurmCluster  # noqa: E402

ENV_PREFIXES = ("SLURM_", "SUBMITIT_")


class Probe(submitit.helpers.Checkpointable):
    """Counts `seconds` one by one; progress survives requeue only through checkpoint()."""

    def __init__(self, out: str, seconds: int):
        self.out, self.seconds, self.progress = out, seconds, 0

    def log(self, msg: str) -> None:
        rank = os.environ.get("SLURM_PROCID", "?")
        with open(Path(self.out) / f"rank{rank}.log", "a") as f:
            f.write(
                f"{time.strftime('%T')} rank={rank} restart="
                f"{os.environ.get('SLURM_RESTART_COUNT', '-')} {msg}\n"
            )

    def __call__(self):
        env = submitit.JobEnvironment()
        self.log(
            f"start progress={self.progress} job_id={env.job_id} "
            f"global_rank={env.global_rank} local_rank={env.local_rank} "
            f"num_tasks={env.num_tasks} num_nodes={env.num_nodes} node={env.node} "
            f"hostnames={env.hostnames}"
        )
        for sig in (signal.SIGTERM, signal.SIGCONT, signal.SIGUSR2):
            previous = signal.getsignal(sig)  # submitit's handler, installed before we run

            def handler(signum, frame, previous=previous):
                self.log(f"got {signal.Signals(signum).name} -> {getattr(previous, '__name__', previous)}")
                if callable(previous):
                    previous(signum, frame)

            signal.signal(sig, handler)
        while self.progress < self.seconds:
            time.sleep(1)
            self.progress += 1
        self.log(f"finished progress={self.progress}")
        return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}

    def checkpoint(self, *args, **kwargs):
        self.log(f"checkpoint() called at progress={self.progress}")
        return super().checkpoint(*args, **kwargs)


def show(cluster: SlurmCluster, job_id, t0: float, last: list) -> None:
    info = cluster.scontrol_show_job(job_id)
    keys = ("JobState", "Reason", "Restarts", "EligibleTime", "StartTime")
    line = " ".join(f"{k}={info.get(k)}" for k in keys)
    if not last or last[-1] != line:
        print(f"{time.time() - t0:6.1f}s {line}", flush=True)
        last.append(line)


def watch(cluster, job, t0, until, timeout=240, release=True):
    """Print state changes; release a requeued job at once; stop when until(info) holds."""
    last: list = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        show(cluster, job.job_id, t0, last)
        info = cluster.scontrol_show_job(job.job_id)
        if until(info):
            return info
        if release and info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            cluster.release_now(job.job_id)
            print(f"{time.time() - t0:6.1f}s release_now", flush=True)
        time.sleep(1)
    raise TimeoutError("experiment did not finish")


def executor(folder: Path, **params):
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    ex.update_parameters(
        **{
            "nodes": 2,
            "tasks_per_node": 1,
            "cpus_per_task": 2,
            "timeout_min": 10,
            "slurm_partition": "low",
            **params,
        }
    )
    return ex


def main(kind: str, workdir: str) -> None:
    work = Path(workdir)
    extra = ["SlurmctldParameters=preempt_send_user_signal"] if kind == "preempt_usr" else []
    cluster = SlurmCluster(work / "cluster", extra_conf=extra)
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    with cluster, cluster.activate():
        t0 = time.time()
        if kind == "env":
            job = executor(work / "jobs").submit(Probe(str(out), 1))
        elif kind == "timeout":  # USR2@30 on a 1 minute limit
            job = executor(work / "jobs", timeout_min=1, slurm_signal_delay_s=30).submit(Probe(str(out), 45))
        else:
            job = executor(work / "jobs").submit(Probe(str(out), 20 if kind == "preempt_usr" else 60))
        print(f"job {job.job_id}; sbatch script:\n{job.paths.submission_file.read_text()}")
        if kind.startswith("preempt"):
            watch(cluster, job, t0, lambda i: i.get("JobState") == "RUNNING")
            time.sleep(3)
            high = cluster.sbatch("--partition=high", "--nodes=2", "--cpus-per-task=2", wrap="sleep 2")
            print(f"{time.time() - t0:6.1f}s submitted high job {high}", flush=True)
        info = watch(
            cluster, job, t0, lambda i: i.get("JobState") in {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"}
        )
        print(
            f"final: {info.get('JobState')} Restarts={info.get('Restarts')} submitit state={job.state}",
            flush=True,
        )
        try:
            results = job.results()  # one per task; job.result() asserts on multi-task jobs
            print("task 1 env:", json.dumps(results[1], indent=1) if kind == "env" else "ok")
        except Exception as exc:  # report, the experiment is the output
            print(f"job.result() raised {type(exc).__name__}: {str(exc)[:500]}")
        for log in sorted(out.glob("rank*.log")):
            print(f"==> {log.name}\n{log.read_text()}")
        for log in sorted((work / "jobs").glob("*/*_log.*")):
            text = log.read_text()
            if text.strip():
                print(f"==> {log.relative_to(work)}\n{text[-3000:]}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="probe-"))
