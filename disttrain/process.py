"""This process's first moments, before any heavy import: the stop-signal flag and the tie to the
launcher that started it. The entry point (disttrain.main) installs both before fsspec, yaml or torch
is imported, so both hold from the first tenth of a second. Stdlib only.

Why these signals: SLURM sends `--signal=USR2@N` before the time limit (USR1 is claimed by NCCL), and
SIGTERM on preemption or `scancel`; torchrun forwards SIGTERM to its workers; SIGINT is Ctrl-C. USR2's
default action would kill a SLURM task still importing torch. What the ranks do with the flag (agree,
save, stop, requeue) is disttrain.stop's.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType

from disttrain.cluster import ClusterEnv

STOP_SIGNALS = ("SIGTERM", "SIGUSR2", "SIGINT")


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


def tie_to_launcher(cluster: ClusterEnv) -> None:
    """A torchrun worker dies with its agent. torchrun starts each worker in a session of its own, so a
    kill -9 of the agent reaches only the agent, and its orphaned ranks would go on training and
    committing checkpoints into a run dir that a relaunch then shares with them (they even join the
    relaunched agent's store, which listens on the same port). Linux's parent-death signal makes the
    kernel SIGKILL the worker the moment the agent goes: nothing is written after that, and a kill -9
    leaves every committed checkpoint intact (DESIGN §4). (The agent forks its workers from its main
    thread, which lives as long as the agent.)

    Armed first thing in `python -m disttrain.main`, before any heavy import. An agent
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
    maps = _read("/proc/1/maps")
    if maps is not None:
        return b"libtorch" not in maps
    cmdline = _read("/proc/1/cmdline")
    return cmdline is not None and b"torch" not in cmdline  # cannot tell: trust it


def _read(path: str) -> bytes | None:
    """A /proc file's bytes, or None where it is not readable (init's memory map often is not)."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None
