"""Stop requests from signals, agreement between ranks on when to stop, and the requeue that follows.

Handlers only set a flag (DESIGN §5): nothing else is safe in a signal handler, and a rank that saved
or exited on its own would leave the others blocked in a collective. The trainer polls the flag at
every step boundary and between eval batches; ranks agree with one all-reduce, so every rank stops
after the same step, saves, and exits.

Why these signals: SLURM sends `--signal=USR2@N` before the time limit (USR1 is claimed by NCCL), and
SIGTERM on preemption or `scancel`; torchrun forwards SIGTERM to its workers; SIGINT is Ctrl-C.

Requeue (tests/cluster/NOTES.md has the experiments behind each rule): a job that exits cleanly inside
its preemption grace time is COMPLETED, not requeued, so a stopped SLURM job requeues itself. USR2 is the
time-limit warning: requeue. SIGTERM is either preemption (`scontrol show job` then shows PreemptTime)
or a user's `scancel` / the time limit itself (PreemptTime=None): only the first is requeued, so that
scancel still cancels. Rank 0 alone runs `scontrol requeue`, once, after the checkpoint is committed.

`disttrain.dist` (torch) is imported only where a collective runs, so that a SLURM task can install
its handlers before any heavy import: USR2's default action would kill the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

from disttrain.cluster import ClusterEnv, parse_scontrol

if TYPE_CHECKING:
    from disttrain import dist

STOP_SIGNALS = ("SIGTERM", "SIGUSR2", "SIGINT")
MAX_REQUEUES_ENV = "DISTTRAIN_MAX_REQUEUES"
DEFAULT_MAX_REQUEUES = 10
SCONTROL_TIMEOUT_S = 30
AGREE_EVERY_S = 0.1  # how often ranks exchange their flags when steps are shorter than this
MAX_SKIP = 256  # boundaries between two exchanges, at most


class StopSignal:
    """Records the stop signals this process receives. Installed once, at the entry point (before any
    heavy import under SLURM: USR2's default action kills the process), and handed to the trainer.

    The handler only appends to a list; a second SIGINT raises KeyboardInterrupt (Ctrl-C twice: the
    user wants out now, not after a save).
    """

    def __init__(self, names: tuple[str, ...] = STOP_SIGNALS):
        self.names = names
        self.received: list[str] = []  # every distinct stop signal, in order (scancel after USR2 counts)
        self.first_at: float | None = None  # wall-clock time of the first one
        self._previous: dict[int, object] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> StopSignal:
        for name in self.names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and "SIGINT" in self.received:
            raise KeyboardInterrupt
        if self.first_at is None:
            self.first_at = time.time()
        if name not in self.received:
            self.received.append(name)

    @property
    def requested(self) -> bool:
        return bool(self.received)


@dataclass(frozen=True)
class StopRequest:
    """A stop every rank agreed on, with the union of the signals the ranks received."""

    signals: tuple[str, ...]

    @property
    def signal(self) -> str | None:
        return self.signals[0] if self.signals else None


class StopAgreement:
    """Turns per-rank flags into decisions all ranks share. `poll` must be called on all ranks, at the
    same boundaries; the first poll that returns a StopRequest returns it on every rank.

    Every exchange is one all-reduce (MAX) of a few ints: one flag per stop signal (so every rank learns
    the union, whichever rank was signalled), the non-finite-loss flag of the guard
    (`features.guard`), and rank 0's proposal of how many boundaries to pass before the next exchange.
    It is started at one boundary and read at a later one: the loop never waits for a network round
    trip, and all ranks still act after the same step.

    Exchanges come about every `interval_s` of training rather than at every boundary: on short steps
    even an overlapped all-reduce per step is a measurable share (bench/RESULTS.md, section 1). Rank 0
    proposes the number of boundaries that fit in `interval_s` at the rate it measured, and the proposal
    travels in the exchange itself, so every rank passes the same boundaries. Steps longer than
    `interval_s` exchange at every boundary; a stop is acted on at most about two intervals plus one
    step after the signal (MAX_SKIP bounds it if steps suddenly slow down). `interval_s=0`: every boundary.

    With `hang_after` (multi-rank runs), a HangWatch notices a rank that reaches no boundary for that
    long once `arm`ed; `drain` and `close` disarm it.
    """

    def __init__(
        self,
        local: StopSignal,
        interval_s: float = AGREE_EVERY_S,
        hang_after: float | None = None,
        on_hang: Callable[[str], None] | None = None,
    ):
        self.local, self.interval_s = local, interval_s
        self.watch = HangWatch(hang_after, on_hang) if hang_after else None
        self.nonfinite = False  # set by the guard: this rank saw a non-finite loss since its last exchange
        self.nonfinite_agreed = False  # the latest exchange said some rank did; whoever acts on it clears it
        self.exchanges = 0  # exchanges read so far: the same count on every rank
        self.agreed: StopRequest | None = None
        self._pending: dist.PendingMax | None = None
        self._skip = 0  # boundaries to pass before reading the exchange in flight: the same on every rank
        self._kind = "step"
        self._since: float | None = None  # rank 0's clock when the exchange in flight started
        self._boundaries = 0  # boundaries polled since then

    def arm(self) -> None:
        """Start watching for a hang (the training loop begins)."""
        if self.watch is not None:
            self.watch.start()

    def close(self) -> None:
        if self.watch is not None:
            self.watch.stop()

    def poll(self, kind: str = "step") -> StopRequest | None:
        """A boundary of `kind` ("step", "eval"). Boundaries of another kind come at another rate, so a
        change of kind starts the count over (every rank polls the same kinds in the same order)."""
        if self.watch is not None:
            self.watch.beat()
        switched = kind != self._kind
        if switched:
            self._kind, self._skip, self._since = kind, 0, None
        self._boundaries += 1
        if self.agreed is not None:
            return self.agreed
        if self._skip > 0:
            self._skip -= 1
            return None
        if self._pending is not None:
            proposal = self._take(self._pending.result())
            self._skip = 0 if switched else proposal  # a rate measured on the other kind does not apply
        if self.agreed is None:
            self._start(self._proposal())
        return self.agreed

    def settle(self) -> StopRequest | None:
        """Exchange now and wait: the one in flight, then one with this rank's current flags. For rare
        moments every rank reaches at the same step (a non-finite step). Must be called on all ranks."""
        self.drain()
        self._start(0)
        self.drain()
        self._skip, self._since = 0, None
        return self.agreed

    def drain(self) -> None:
        """Finish the in-flight all-reduce (all ranks) so no collective is left dangling at exit."""
        self.close()
        if self._pending is not None:
            self._take(self._pending.result())

    def _start(self, proposal: int) -> None:
        from disttrain import dist

        flags = [int(name in self.local.received) for name in STOP_SIGNALS] + [int(self.nonfinite)]
        self.nonfinite = False  # sent: a later non-finite loss is a new one
        self._pending = dist.start_max([*flags, proposal])

    def _take(self, values: list[int]) -> int:
        """Record an exchange's result; returns the agreed proposal."""
        self._pending = None
        *flags, nonfinite, proposal = values
        signals = tuple(name for name, on in zip(STOP_SIGNALS, flags) if on)
        if signals and self.agreed is None:
            self.agreed = StopRequest(signals)
        self.nonfinite_agreed = bool(nonfinite)
        self.exchanges += 1
        return proposal

    def _proposal(self) -> int:
        """Rank 0: how many boundaries fit in interval_s at the rate since the last exchange started."""
        from disttrain import dist

        now, since, boundaries = time.monotonic(), self._since, self._boundaries
        self._since, self._boundaries = now, 0
        if since is None or self.interval_s <= 0 or not dist.is_main():  # no rate yet, or not rank 0's call
            return 0
        per_boundary = (now - since) / max(1, boundaries)
        return min(MAX_SKIP, int(self.interval_s / max(per_boundary, 1e-6)))


class HangWatch:
    """Ends a rank that hangs outside any collective (in the user's loss, a data loader, a stuck file).

    Its peers notice nothing until their next collective gives up after trainer.collective_timeout_s,
    and then exit; the hung rank would stay: under SLURM until the time limit, under torchrun until the
    agent's SIGKILL 30 s after its SIGTERM, which a hung rank only notes as a flag. So a thread watches
    the step boundaries (every `StopAgreement.poll`, also between eval batches): after `after_s` without
    one, plus a margin, the rank says where its main thread is, records it (`on_hang`) and exits 1.
    The margin (a tenth, at least 5 s) lets a rank that is merely waiting in a collective for the hung
    one fail by that collective's own timeout first, with the message that says another rank hangs."""

    def __init__(self, after_s: float, on_hang: Callable[[str], None] | None = None):
        self.after_s, self.on_hang = after_s + max(5.0, after_s / 10), on_hang
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.beat()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="disttrain-hang-watch", daemon=True)
            self._thread.start()

    def beat(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.after_s / 10)):
            if time.monotonic() - self._last > self.after_s:
                self._give_up()

    def _give_up(self) -> None:
        from disttrain import dist

        message = (
            f"rank {dist.rank()} reached no step boundary for {self.after_s:g} s (trainer.collective_timeout_s "
            f"and a margin): it hangs in {_main_thread_at()}; exiting so that the job does not wait for it"
        )
        print(f"disttrain: {message}", file=sys.stderr, flush=True)
        if self.on_hang is not None:  # on a thread of its own: the storage it writes to may be what hangs
            record = threading.Thread(target=self._record, args=(message,), daemon=True)
            record.start()
            record.join(timeout=10)
        sys.stdout.flush()
        os._exit(1)

    def _record(self, message: str) -> None:
        with contextlib.suppress(Exception):
            if self.on_hang is not None:
                self.on_hang(message)


def _main_thread_at() -> str:
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    if frame is None:
        return "an unknown place"
    last = traceback.extract_stack(frame)[-1]
    return f"{last.name} ({last.filename}:{last.lineno})"


def tie_to_launcher(cluster: ClusterEnv) -> None:
    """A torchrun worker dies with its agent. torchrun starts each worker in a session of its own, so a
    kill -9 of the agent reaches only the agent, and its orphaned ranks would go on training and
    committing checkpoints into a run dir that a relaunch then shares with them (they even join the
    relaunched agent's store, which listens on the same port). Linux's parent-death signal makes the
    kernel SIGKILL the worker the moment the agent goes: nothing is written after that, and a kill -9
    leaves every committed checkpoint intact (DESIGN §4). (The agent forks its workers from its main
    thread, which lives as long as the agent.)

    Armed first thing in `python -m disttrain.main`, before any heavy import (disttrain.main). An agent
    that died before that moment sends no signal: the worker has already been handed to init (parent
    pid 1) or, outside its pid namespace, to a reaper (parent pid 0), and it exits at once. Not caught:
    an adoption by a subreaper in the first tenth of a second of the interpreter's start."""
    if cluster.launcher != "torchrun" or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        print(f"disttrain: warning: could not tie this rank to torchrun (prctl errno {ctypes.get_errno()})",
              file=sys.stderr)  # fmt: skip
    elif _launcher_gone():  # checked after arming: an agent that dies from now on kills this worker
        print(f"disttrain: rank {cluster.rank}: its torchrun agent was gone before it started (parent pid "
              f"{os.getppid()}); exiting without doing anything", file=sys.stderr, flush=True)  # fmt: skip
        os._exit(1)


def _launcher_gone() -> bool:
    """Whether this process was orphaned: adopted by init, or by a reaper outside its pid namespace
    (getppid() is 0 then). torchrun itself can be a container's init (pid 1): it has torch loaded, or
    where its memory map is not readable (init often is not, even to root), torch in its command line."""
    parent = os.getppid()
    if parent != 1:
        return parent == 0
    try:
        with open("/proc/1/maps", encoding="utf-8", errors="replace") as fh:
            return not any("libtorch" in line for line in fh)
    except OSError:
        pass
    try:
        with open("/proc/1/cmdline", "rb") as fh:
            return b"torch" not in fh.read()
    except OSError:  # cannot tell: trust it
        return False


# --------------------------------------------------------------------------------------- requeue


@dataclass(frozen=True)
class Requeue:
    """What a stopped SLURM job does next: decided by rank 0, the same on every rank."""

    requeued: bool
    reason: str  # why, in words, for events.jsonl and the log
    signal: str | None  # the stop signal, as any rank received it
    budget_left: int  # requeues still allowed after this one


def max_requeues_from_env(environ: dict[str, str] | None = None) -> int:
    """The requeue budget of a job launched without `disttrain submit` (srun python -m disttrain.main)."""
    value = (os.environ if environ is None else environ).get(MAX_REQUEUES_ENV, "")
    return int(value) if value.strip().isdigit() else DEFAULT_MAX_REQUEUES


def after_stop(stop: StopRequest, cluster: ClusterEnv, max_requeues: int) -> Requeue:
    """Decide whether a stopped SLURM job requeues, and requeue it. Must be called on all ranks, after the
    stop checkpoint is committed: rank 0 decides and runs `scontrol requeue` once, then every rank learns
    the outcome, so all ranks exit the same way. The signals are the agreed union (StopAgreement)."""
    from disttrain import dist

    decision = None
    if dist.is_main():
        decision = decide(_deciding_signal(stop.signals), cluster, max_requeues)
        if decision.requeued:
            decision = requeue(cluster.job_id, decision)
    return dist.broadcast_from_main(decision)


def decide(sig: str | None, cluster: ClusterEnv, max_requeues: int, show_job=None) -> Requeue:
    """The requeue policy, on rank 0. `show_job(job_id) -> {Key: value}` reads `scontrol show job`."""
    used = cluster.restart_count  # SLURM_RESTART_COUNT: every requeue so far, ours or SLURM's own
    left = max(0, max_requeues - used - 1)

    def no(reason: str) -> Requeue:
        return Requeue(False, reason, sig, max(0, max_requeues - used))

    if not cluster.job_id:
        return no("not a SLURM job")
    if sig == "SIGUSR2":
        cause = "time limit warning (SIGUSR2)"
    elif sig == "SIGTERM":
        info = (show_job or show_slurm_job)(cluster.job_id)
        preempt_time = info.get("PreemptTime", "None")
        if preempt_time in ("None", "Unknown", ""):
            state = info.get("JobState", "unknown")
            return no(
                f"stopped by scancel or the time limit (SIGTERM, JobState={state}, no PreemptTime): not requeued"
            )
        cause = f"preempted (SIGTERM, PreemptTime={preempt_time})"
    else:
        return no(f"stopped by {sig or 'a stop request'}: not a scheduler signal, not requeued")
    if used >= max_requeues:
        return no(f"{cause}, but the requeue budget is spent ({used} of --max-requeues {max_requeues} used)")
    return Requeue(True, cause, sig, left)


def requeue(job_id: str, decision: Requeue) -> Requeue:
    """`scontrol requeue JOB` on rank 0. SLURM kills the job's tasks right after (KillWait later SIGKILL),
    keeps the job id, and starts it again once eligible; the tasks then resume from the checkpoint."""
    try:
        res = _scontrol("requeue", job_id)
    except (OSError, subprocess.TimeoutExpired) as err:
        return Requeue(
            False, f"{decision.reason}; scontrol requeue failed: {err}", decision.signal, decision.budget_left
        )
    if res.returncode == 0:
        return decision
    detail = (res.stderr or res.stdout).strip()
    if "pending" in detail.lower():  # SLURM (or a previous attempt) already requeued it: that is the goal
        return Requeue(
            True, f"{decision.reason}; already requeued by SLURM", decision.signal, decision.budget_left
        )
    return Requeue(
        False, f"{decision.reason}; scontrol requeue failed: {detail}", decision.signal, decision.budget_left
    )


def show_slurm_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o JOB` as {Key: value}; empty when scontrol fails."""
    try:
        res = _scontrol("show", "job", "-o", job_id)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if res.returncode != 0:
        return {}
    return parse_scontrol(res.stdout)


def _scontrol(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)


def _deciding_signal(signals: tuple[str, ...]) -> str | None:
    """One signal for the job from every rank's. SIGTERM first: if it came from a scancel, the user
    wants the job gone even if the time-limit warning came before; if from preemption, it requeues too."""
    return next((name for name in ("SIGTERM", "SIGUSR2", "SIGINT") if name in signals), None)
