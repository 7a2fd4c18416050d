"""A real two-node SLURM cluster on loopback, for tests (stdlib only).

Everything lives in one work directory: slurm.conf, a private munge key and socket, the
controller's state, the nodes' spool dirs and every daemon's log. The daemons run in the
foreground as children of this process, so ``stop()`` ends exactly what ``start()`` began.

Client commands (sbatch, squeue, scontrol, and submitit, which shells out to them) find this
cluster through ``SLURM_CONF``: use ``cluster.env`` for subprocesses, or ``cluster.activate()``
to export it into ``os.environ``. Jobs inherit it from the submitting environment, so a job can
call ``scontrol requeue $SLURM_JOB_ID`` on itself.

    cluster = SlurmCluster("/tmp/slurm")
    cluster.start()
    job = cluster.sbatch("--nodes=2", wrap="srun hostname")  # -> job id
    cluster.wait_state(job, {"COMPLETED"}, timeout=30)
    cluster.stop()
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel", "srun")
# A job that is no longer queued or running; the cluster forgets it after MinJobAge.
FINISHED = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)
MAX_WORKDIR_CHARS = 70
_MARKER = "DISTTRAIN_SLURM_CLUSTER"  # set in daemon env: finds leftover slurmstepd in stop()


class SlurmError(RuntimeError):
    """A SLURM command failed; the message carries its output."""


def is_available() -> tuple[bool, str]:
    """Whether this machine can run the cluster, and if not, why (for pytest.skip)."""
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b) is None]
    if missing:
        return False, f"SLURM binaries not found: {', '.join(missing)} (run .ci/install_slurm.sh)"
    if os.geteuid() != 0:
        return False, "starting slurmd/slurmctld needs root (uid 0)"
    return True, ""


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now (held open together so they are distinct)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """Controller + ``len(nodes)`` slurmd on 127.0.0.1, two partitions for preemption tests.

    Partitions (both over all nodes): ``low`` (default, PriorityTier=1, GraceTime=grace_time)
    and ``high`` (PriorityTier=10). A job in ``high`` that needs the nodes preempts ``low`` jobs
    with PreemptMode=REQUEUE.
    """

    def __init__(
        self,
        workdir,
        *,
        nodes=("node1", "node2"),
        cpus_per_node=2,
        real_memory_mb=1000,
        grace_time_s=30,
        min_job_age_s=60,
        kill_wait_s=5,
        ctld_port=None,
        node_ports=None,
        cluster_name="disttrain",
        debug="info",
        extra_conf=(),
    ):
        self.workdir = Path(workdir).resolve()
        if len(str(self.workdir)) > MAX_WORKDIR_CHARS:
            # munged's socket and slurmstepd's sockets (spool/<node>/<node>_<job>.<step>)
            # are AF_UNIX paths, limited to 108 bytes.
            raise ValueError(
                f"workdir path too long for unix sockets (> {MAX_WORKDIR_CHARS} chars): {self.workdir}"
            )
        self.nodes = tuple(nodes)
        self.cpus_per_node = cpus_per_node
        self.real_memory_mb = real_memory_mb
        self.grace_time_s = grace_time_s
        self.min_job_age_s = min_job_age_s
        self.kill_wait_s = kill_wait_s
        self.cluster_name = cluster_name
        self.debug = debug
        self.extra_conf = [extra_conf] if isinstance(extra_conf, str) else list(extra_conf)
        ports = free_ports(1 + len(self.nodes))
        self.ctld_port = ctld_port or ports[0]
        self.node_ports = list(node_ports or ports[1:])
        if len(self.node_ports) != len(self.nodes):
            raise ValueError("node_ports must give one port per node")
        self.conf_path = self.workdir / "slurm.conf"
        self.munge_socket = self.workdir / "munge" / "munge.socket"
        self.log_dir = self.workdir / "log"
        self._procs: dict[str, subprocess.Popen] = {}

    # -- environment -------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF for this cluster (for subprocesses and submitit)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf_path)
        for key in ("SLURM_JOB_ID", "SLURM_JOBID"):  # don't let an outer job leak in
            env.pop(key, None)
        return env

    @contextlib.contextmanager
    def activate(self):
        """Export SLURM_CONF into os.environ for the block (submitit reads os.environ)."""
        old = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf_path)
        try:
            yield self
        finally:
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Write config, start munged, slurmctld and every slurmd; wait until all nodes idle."""
        ok, reason = is_available()
        if not ok:
            raise SlurmError(reason)
        for sub in ("state", "spool", "run", "log", "munge"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir / "munge", 0o755)  # munged: not group/other-writable
        _ensure_hosts(self.nodes)
        self._write_munge_key()
        self.conf_path.write_text(self.slurm_conf())
        try:
            self._start_munged()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf_path)])
            self._wait(
                lambda: self._run(["scontrol", "ping"], check=False).returncode == 0,
                timeout,
                "slurmctld to answer ping",
            )
            for node in self.nodes:
                self._spawn(f"slurmd.{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf_path)])
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30) -> None:
        """Cancel all jobs, stop the daemons this object started, kill leftover job steps."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            with contextlib.suppress(SlurmError, subprocess.TimeoutExpired):
                self.cancel_all(timeout=min(timeout, 20))
        for name in [n for n in self._procs if n.startswith("slurmd.")] + ["slurmctld", "munged"]:
            proc = self._procs.pop(name, None)
            if proc is not None:
                _terminate(proc, timeout)
        self._kill_leftover_steps()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until every node reports idle (no jobs, not down/drained)."""

        def idle():
            out = self._run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout
            states = dict(line.split()[:2] for line in out.splitlines() if line.strip())
            return all(states.get(n, "").rstrip("*~#") == "idle" for n in self.nodes)

        self._wait(idle, timeout, "all nodes idle")

    # -- client helpers ----------------------------------------------------------------

    def sbatch(self, *args: str, script: str | None = None, wrap: str | None = None) -> int:
        """Submit a job; returns its id.

        ``script`` is the text of a batch script (passed on stdin), ``wrap`` a command line;
        ``args`` are sbatch options, e.g. ``"--partition=high", "--nodes=2"``. The job runs in
        the cluster's workdir unless ``--chdir`` is given; its environment is this process's
        plus SLURM_CONF (sbatch exports everything by default).
        """
        res = self._run(self._sbatch_cmd(args, wrap), input=script)
        return int(res.stdout.strip().split(";")[0])

    def sbatch_test_only(self, *args: str, script: str | None = None, wrap: str | None = None) -> str:
        """``sbatch --test-only``: validate and estimate without submitting (no job is queued,
        though a job id is used up). Returns sbatch's "Job N to start at ..." line; raises
        SlurmError with sbatch's reason ("Invalid partition name specified", ...) if refused."""
        res = self._run(self._sbatch_cmd((*args, "--test-only"), wrap), input=script)
        return (res.stderr.strip() or res.stdout.strip()).removeprefix("sbatch: ")

    def _sbatch_cmd(self, args, wrap) -> list[str]:
        cmd = ["sbatch", "--parsable", f"--chdir={self.workdir}", *args]
        return cmd + ([f"--wrap={wrap}"] if wrap is not None else [])

    def squeue(self, job_id) -> str | None:
        """The job's state as squeue reports it (PENDING, RUNNING, ...), None once gone."""
        res = self._run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], check=False)
        return res.stdout.strip() or None

    def scontrol_show_job(self, job_id) -> dict[str, str]:
        """``scontrol show job -o`` parsed to {Key: value} (empty dict once forgotten)."""
        res = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if res.returncode != 0 or not res.stdout.strip():
            return {}
        return parse_scontrol(res.stdout)

    def job_state(self, job_id) -> str | None:
        """JobState from scontrol (also sees finished jobs until MinJobAge), None if gone."""
        return self.scontrol_show_job(job_id).get("JobState")

    def wait_state(self, job_id, states, timeout: float = 60, poll: float = 0.5) -> str:
        """Wait until the job's JobState is one of ``states``; returns that state."""
        states = {states} if isinstance(states, str) else set(states)
        seen = []

        def reached():
            state = self.job_state(job_id)
            if not seen or seen[-1] != state:
                seen.append(state)
            return state in states

        self._wait(
            reached, timeout, f"job {job_id} to reach {sorted(states)} (states seen: {seen})", poll=poll
        )
        return seen[-1]

    def release_now(self, job_id) -> None:
        """Let a requeued job start at once instead of after its ~2 min BeginTime delay."""
        self._run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def requeue(self, job_id) -> None:
        self._run(["scontrol", "requeue", str(job_id)])

    def cancel(self, job_id) -> None:
        self._run(["scancel", str(job_id)], check=False)

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job and wait until the queue is empty (tests call it between).

        scancel is repeated: a job that requeues itself on SIGTERM (as disttrain's do) turns
        the first scancel into a requeue, and only a second one cancels it while pending.
        """

        def empty():
            if not self._run(["squeue", "-h"], check=False).stdout.strip():
                return True
            self._run(["scancel", "--user", "root"], check=False)
            return False

        self._wait(empty, timeout, "all jobs to leave the queue", poll=1)

    def logs(self, tail: int = 60) -> str:
        """The last lines of every daemon log, for a failing test's report."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"==> {path} <==\n" + "\n".join(lines))
        return "\n".join(parts)

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run a client command against this cluster (SLURM_CONF set)."""
        return self._run(cmd, check=check, **kw)

    # -- config ------------------------------------------------------------------------

    def slurm_conf(self) -> str:
        w = self.workdir
        lines = [
            f"ClusterName={self.cluster_name}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={w}/state",
            f"SlurmdSpoolDir={w}/spool/%n",
            f"SlurmctldPidFile={w}/run/slurmctld.pid",
            f"SlurmdPidFile={w}/run/slurmd.%n.pid",
            f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
            f"SlurmdLogFile={self.log_dir}/slurmd.%n.log",
            f"SlurmctldDebug={self.debug}",
            f"SlurmdDebug={self.debug}",
            # no cgroups in containers: track processes by parentage, no task binding
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            "JobRequeue=1",
            "ReturnToService=2",
            f"MinJobAge={self.min_job_age_s}",
            f"KillWait={self.kill_wait_s}",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "MessageTimeout=10",
        ]
        for node, port in zip(self.nodes, self.node_ports):
            lines.append(
                f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} "
                f"Port={port} CPUs={self.cpus_per_node} "
                f"RealMemory={self.real_memory_mb} State=UNKNOWN"
            )
        lines += self.extra_conf  # e.g. "SlurmctldParameters=preempt_send_user_signal"
        nodes = ",".join(self.nodes)
        lines += [
            f"PartitionName=low Nodes={nodes} Default=YES PriorityTier=1 "
            f"GraceTime={self.grace_time_s} PreemptMode=REQUEUE MaxTime=INFINITE State=UP",
            f"PartitionName=high Nodes={nodes} PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE State=UP",
        ]
        return "\n".join(lines) + "\n"

    # -- internals ---------------------------------------------------------------------

    def _write_munge_key(self) -> None:
        key = self.workdir / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)

    def _start_munged(self) -> None:
        m = self.workdir / "munge"
        self._spawn(
            "munged",
            [
                "munged",
                "-F",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={m / 'munge.key'}",
                f"--pid-file={m / 'munged.pid'}",
                f"--seed-file={m / 'munged.seed'}",
                f"--log-file={self.log_dir / 'munged.log'}",
            ],
        )
        self._wait(self.munge_socket.exists, 15, "munged socket")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        env = self.env
        env[_MARKER] = str(self.workdir)
        # the daemon keeps its own copy of the log fd; ours can close at once
        with open(self.log_dir / f"{name}.stdout.log", "ab") as out:
            self._procs[name] = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        time.sleep(0.2)
        if self._procs[name].poll() is not None:
            raise SlurmError(f"{name} exited at once (rc={self._procs[name].returncode})\n" + self.logs())

    def _run(self, cmd, check=True, input=None, timeout=30) -> subprocess.CompletedProcess:
        stdin = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, **stdin)
        if check and res.returncode != 0:
            raise SlurmError(
                f"{' '.join(cmd)} -> rc {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
            )
        return res

    def _wait(self, predicate, timeout: float, what: str, poll: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmError(
                        f"{name} died (rc={proc.returncode}) while waiting for {what}\n{self.logs()}"
                    )
            time.sleep(poll)
        raise SlurmError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")

    def _kill_leftover_steps(self) -> None:
        """Safety net after the daemons are gone: slurmstepd detaches from slurmd (it carries
        our marker) and job processes carry SLURM_CONF of this cluster; kill what is left."""
        markers = {f"{_MARKER}={self.workdir}".encode(), f"SLURM_CONF={self.conf_path}".encode()}
        for pid in _pids_with_env(markers):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def parse_scontrol(text: str) -> dict[str, str]:
    """Parse one-line ``scontrol show ... -o`` output: Key=value pairs, values may hold '='."""
    out: dict[str, str] = {}
    for m in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|\s*$)", text.strip()):
        out[m.group(1)] = m.group(2)
    return out


def _terminate(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _pids_with_env(markers: set[bytes]) -> list[int]:
    """Processes whose initial environment holds one of ``markers`` (never this process)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in (os.getpid(), os.getppid()):
            with contextlib.suppress(OSError):
                if markers & set((entry / "environ").read_bytes().split(b"\0")):
                    pids.append(int(entry.name))
    return pids


def _ensure_hosts(names) -> None:
    """slurmd resolves its own NodeHostname: map the node names to loopback."""
    hosts = Path("/etc/hosts")
    text = hosts.read_text() if hosts.exists() else ""
    known = {
        tok for line in text.splitlines() for tok in line.split()[1:] if not line.lstrip().startswith("#")
    }
    missing = [n for n in names if n not in known]
    if missing:
        sep = "" if text.endswith("\n") or not text else "\n"
        hosts.write_text(text + sep + "127.0.0.1 " + " ".join(missing) + "\n")
