"""Which process gets which signal, without submitit: preemption, time limit, scancel.

    python tests/cluster/experiments/raw_signals.py preempt|timelimit|scancel [workdir]

The batch script is Python (so it can log its own signals); it runs one 2-task srun step. Every
process logs each signal with the time since the experiment began, and on SIGTERM also what
`scontrol show job` says at that moment (how a handler tells preemption from scancel).
Facts found this way are in ../NOTES.md.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slurm_cluster import SlurmCluster  # noqa: E402

LOGGER = r"""
import os, signal, subprocess, sys, time
who = sys.argv[1] + (os.environ["SLURM_PROCID"] if sys.argv[1] == "task" else "")
log = open(os.environ["PROBE_LOG"], "a", buffering=1)
t0 = float(os.environ["PROBE_T0"])

def note(msg):
    log.write(f"{time.time() - t0:6.1f}s {who:<6} {msg}\n")

def handler(signum, frame):
    extra = ""
    if signum == signal.SIGTERM:
        out = subprocess.run(["scontrol", "show", "job", "-o", os.environ["SLURM_JOB_ID"]],
                             capture_output=True, text=True).stdout.split()
        extra = " | " + " ".join(w for w in out if w.split("=")[0] in
                                 ("JobState", "PreemptTime", "Restarts"))
    note(f"got {signal.Signals(signum).name}{extra}")

for s in (signal.SIGTERM, signal.SIGCONT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
    signal.signal(s, handler)
note(f"start restart={os.environ.get('SLURM_RESTART_COUNT', 'unset')}")
if who == "batch":
    subprocess.Popen(["srun", sys.executable, __file__, "task"])
while True:
    time.sleep(0.2)
"""


def main(kind: str, workdir: str) -> None:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    logger, log = work / "logger.py", work / "signals.log"
    logger.write_text(LOGGER)
    # The batch script is the Python logger itself (a bash trap would run only between commands).
    script = (
        f"#!{sys.executable}\nimport runpy, sys\nsys.argv[1:] = ['batch']\n"
        f"runpy.run_path({str(logger)!r}, run_name='__main__')\n"
    )
    t0 = time.time()
    os.environ.update(PROBE_LOG=str(log), PROBE_T0=str(t0))  # jobs inherit the submit env
    whole = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2"]
    limits = ["--time=1", "--signal=USR2@30"] if kind == "timelimit" else []
    with SlurmCluster(work / "cluster") as cluster, cluster.activate():
        job = cluster.sbatch(*whole, *limits, f"--output={work}/job.out", script=script)
        cluster.wait_state(job, "RUNNING")
        time.sleep(3)
        if kind == "preempt":
            cluster.sbatch("--partition=high", *whole, wrap="sleep 1")
            print(f"{time.time() - t0:6.1f}s submitted high job", flush=True)
            cluster.wait_state(job, "PENDING", timeout=120)
        elif kind == "scancel":
            cluster.cancel(job)
            print(f"{time.time() - t0:6.1f}s scancel", flush=True)
            cluster.wait_state(job, "CANCELLED", timeout=60)
        else:
            cluster.wait_state(job, "TIMEOUT", timeout=150)
        info = cluster.scontrol_show_job(job)
        print(
            f"{time.time() - t0:6.1f}s job state {info['JobState']} Reason={info['Reason']} "
            f"Restarts={info['Restarts']} EligibleTime={info['EligibleTime']}"
        )
        print(log.read_text())
        print((work / "job.out").read_text())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="signals-"))
