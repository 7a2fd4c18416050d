"""The stop path (DESIGN §5): this process's signal flag, the agreement of every rank on it (and on the
named per-step flags that travel with it), the hang watch, the stop they agreed, and the stock hook that
polls it at every step boundary and saves before the loop ends.

Handlers only set a flag: nothing else is safe in a signal handler, and a rank that saved or exited on
its own would leave the others blocked in a collective. The loop polls the flag at step boundaries and
between eval batches; ranks agree with one overlapped all-reduce, so every rank stops after the same
step, saves, and exits.

The flag itself (`StopSignal`, which signals and why) is disttrain.process's, installed by the entry
point before any heavy import. Importing this module is cheap too (no torch): `disttrain.dist` is
imported only where a collective runs.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from disttrain import events as ev
from disttrain.hangs import frame_of, main_thread_stack
from disttrain.hooks import Hook, Loop
from disttrain.process import STOP_SIGNALS, StopSignal
from disttrain.sections import AGREEMENT, CHECKPOINT, Sections

if TYPE_CHECKING:
    from disttrain import dist
    from disttrain.cluster import ClusterEnv
    from disttrain.slurm import Requeue
    from disttrain.writers import EventLog

AGREE_EVERY_S = 0.1  # how often ranks exchange their flags when steps are shorter than this
MAX_SKIP = 256  # boundaries between two exchanges, at most


@dataclass(frozen=True)
class StopRequest:
    """A stop every rank agreed on, with the union of the signals the ranks received."""

    signals: tuple[str, ...]

    @property
    def signal(self) -> str | None:
        return self.signals[0] if self.signals else None


class Channel:
    """A per-step flag any rank may raise; every rank learns at the next exchange whether some rank did.
    `raised` is this rank's since its last exchange; `agreed` is what the latest exchange said (whoever
    acts on it clears it)."""

    def __init__(self, name: str):
        self.name = name
        self.raised = False
        self.agreed = False

    def send(self) -> int:
        value, self.raised = int(self.raised), False  # sent: a later raise is a new one
        return value


class StopAgreement:
    """Turns per-rank flags into decisions all ranks share. `poll` must be called on all ranks, at the
    same boundaries; the first poll that returns a StopRequest returns it on every rank.

    Every exchange is one all-reduce (MAX) of a few ints: one flag per stop signal (so every rank learns
    the union, whichever rank was signalled), one per named `Channel` (the guard's non-finite loss,
    `features.guard`), and rank 0's proposal of how many boundaries to pass before the next exchange.
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
        channels: tuple[str, ...] = (),
        on_stall: Callable[[float], None] | None = None,
    ):
        self.local, self.interval_s = local, interval_s
        self.watch = HangWatch(hang_after, on_hang, on_stall) if hang_after else None
        # Named per-step flags beside the stop signals (the guard's "nonfinite"): fixed at construction,
        # so every rank's exchange has the same shape.
        self.channels = {name: Channel(name) for name in channels}
        self.exchanges = 0  # exchanges read so far: the same count on every rank
        self.agreed: StopRequest | None = None
        self._pending: dist.PendingMax | None = None
        self._skip = 0  # boundaries to pass before reading the exchange in flight: the same on every rank
        self._kind = "step"
        self._since: float | None = None  # rank 0's clock when the exchange in flight started
        self._boundaries = 0  # boundaries polled since then

    def channel(self, name: str) -> Channel:
        return self.channels[name]

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

        flags = [int(name in self.local.received) for name in STOP_SIGNALS]
        flags += [channel.send() for channel in self.channels.values()]
        self._pending = dist.start_max([*flags, proposal])

    def _take(self, values: list[int]) -> int:
        """Record an exchange's result; returns the agreed proposal."""
        self._pending = None
        *flags, proposal = values
        stops, channels = flags[: len(STOP_SIGNALS)], flags[len(STOP_SIGNALS) :]
        signals = tuple(name for name, on in zip(STOP_SIGNALS, stops) if on)
        if signals and self.agreed is None:
            self.agreed = StopRequest(signals)
        for channel, value in zip(self.channels.values(), channels):
            channel.agreed = bool(value)
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
    """Ends a rank that hangs outside any collective (in the user's loss, a data loader, a stuck file),
    and makes sure the ranks waiting for it can say where it is.

    Its peers notice nothing until their next collective gives up after trainer.collective_timeout_s,
    and then exit; the hung rank would stay: under SLURM until the time limit, under torchrun until the
    agent's SIGKILL 30 s after its SIGTERM, which a hung rank only notes as a flag. So a thread watches
    the step boundaries (every `StopAgreement.poll`, also between eval batches). After half the timeout
    without one it calls `on_stall` once (build: write this rank's stack file, `hangs`), so that when the
    waiting ranks' collective gives up their line can name the rank that did not arrive and its frame.
    After the timeout and a margin, the rank says where its main thread is, records it (`on_hang`) and
    exits 1. The margin (a tenth, at least 5 s) lets a rank that is merely waiting in a collective for the
    hung one fail by that collective's own timeout first, with the line that names the hung one."""

    def __init__(
        self,
        after_s: float,
        on_hang: Callable[[str], None] | None = None,
        on_stall: Callable[[float], None] | None = None,
    ):
        self.stall_s, self.after_s = after_s / 2, after_s + max(5.0, after_s / 10)
        self.on_hang, self.on_stall = on_hang, on_stall
        self._last = time.monotonic()
        self._stalled = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.beat()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="disttrain-hang-watch", daemon=True)
            self._thread.start()

    def beat(self) -> None:
        self._last, self._stalled = time.monotonic(), False

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.stall_s / 5)):
            idle = time.monotonic() - self._last
            if idle > self.stall_s and not self._stalled:
                self._stalled = True
                _bounded(self.on_stall, idle)  # the storage it writes to may be what hangs
            if idle > self.after_s:
                self._give_up()

    def _give_up(self) -> None:
        from disttrain import dist

        message = (
            f"rank {dist.rank()} reached no step boundary for {self.after_s:g} s (trainer.collective_timeout_s "
            f"and a margin): it hangs at {frame_of(main_thread_stack())}; exiting so that the job does not "
            "wait for it"
        )
        print(f"disttrain: {message}", file=sys.stderr, flush=True)
        _bounded(self.on_hang, message)
        sys.stdout.flush()
        os._exit(1)


def _bounded(fn: Callable[[Any], None] | None, arg: Any) -> None:
    """fn(arg) on a thread of its own, waited for at most 10 s; a failure there is said, not raised."""
    if fn is None:
        return

    def call() -> None:
        try:
            fn(arg)
        except Exception as err:  # a record is best effort: the hang itself is what matters
            print(f"disttrain: could not record the stall: {err}", file=sys.stderr, flush=True)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout=10)


class Stopping:
    """The agreed stop of this segment, the same on every rank once agreed."""

    def __init__(self, signal: StopSignal, agreement: StopAgreement, events: EventLog):
        self.signal, self.agreement, self.events = signal, agreement, events
        self.request: StopRequest | None = None
        self._own_handlers = False

    @property
    def stopping(self) -> bool:
        return self.request is not None

    def begin(self) -> None:
        """Training starts: handle the stop signals (unless the entry point already does) and watch for
        a rank that reaches no boundary in time."""
        self._own_handlers = not self.signal.installed
        if self._own_handlers:
            self.signal.install()
        self.agreement.arm()

    def end(self) -> None:
        if self._own_handlers:
            self.signal.uninstall()
            self._own_handlers = False

    def poll(self, step: int) -> bool:
        """A step boundary: whether a stop was agreed at this one (it is recorded once, as a `signal`
        event). Must be called on all ranks, at every step boundary."""
        if self.request is not None:
            return False
        request = self.agreement.poll()
        if request is None:
            return False
        self.request = request
        received = {} if self.signal.first_at is None else {"received": round(self.signal.first_at, 3)}
        self.events.emit(
            ev.SIGNAL, step=step, signal=request.signal, signals=list(request.signals), **received
        )
        return True

    def agreed_in_eval(self) -> bool:
        """Between eval batches: whether a stop is agreed (the next step boundary acts on it). Must be
        called on all ranks, between the same batches."""
        return self.agreement.poll("eval") is not None

    def drain(self) -> None:
        """Finish the exchange in flight on every rank, so no collective is left dangling."""
        self.agreement.drain()

    def close(self) -> None:
        self.agreement.close()


class Saver(Protocol):
    def save(self, reason: str = "manual") -> None: ...


class StopHook(Hook):
    """Polls the cross-rank stop agreement at every step boundary (one overlapped all-reduce about every
    0.1 s); once a stop is agreed, saves synchronously, and the loop ends after this step. `late_check`
    runs between the poll and the save: a verdict learned from the exchange (fp16's non-finite loss) may
    end the run there, and then nothing is saved."""

    def __init__(
        self, stopping: Stopping, checkpoints: Saver, late_check: Callable[[int], None], sections: Sections
    ):
        self.stopping, self.checkpoints, self.late_check = stopping, checkpoints, late_check
        self.sections = sections

    def after_step(self, loop: Loop) -> None:
        with self.sections.section(AGREEMENT):  # reading an exchange waits for the slowest rank's part
            agreed = self.stopping.poll(loop.step)
            self.late_check(loop.step)
        if agreed:
            with self.sections.section(CHECKPOINT):
                self.checkpoints.save(reason="stop")


# --------------------------------------------------------------------------------- after a stop


def after_stop(
    stop: StopRequest, cluster: ClusterEnv, max_requeues: int, slow_nodes: list[str] | None = None
) -> Requeue:
    """Decide whether a stopped SLURM job requeues (the policy: disttrain.slurm), and requeue it. Must be
    called on all ranks, after the stop checkpoint is committed: rank 0 decides and runs `scontrol
    requeue` once, then every rank learns the outcome, so all ranks exit the same way. The signals are
    the agreed union (StopAgreement). `slow_nodes` (--exclude-slow-nodes): left out of the next attempt."""
    from disttrain import dist, slurm

    decision = None
    if dist.is_main():
        decision = slurm.decide(slurm.deciding_signal(stop.signals), cluster, max_requeues)
        if decision.requeued:
            decision = slurm.requeue(cluster.job_id, decision)
        if decision.requeued and slow_nodes:
            decision = slurm.exclude(cluster.job_id, slow_nodes, decision)
    return dist.broadcast_from_main(decision)
