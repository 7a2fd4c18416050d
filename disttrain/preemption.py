"""A torchrun worker's tie to its agent. The stop itself (signal flag, agreement, hang watch) is
`stop.py`'s; the requeue that follows a stop under SLURM is `slurm.py`'s policy, run by
`stop.after_stop`."""

from __future__ import annotations

import signal
import sys

from disttrain.cluster import ClusterEnv


def tie_to_launcher(cluster: ClusterEnv) -> None:
    """A torchrun worker dies with its agent. torchrun starts each worker in a session of its own, so a
    kill -9 of the agent reaches only the agent, and its orphaned ranks would go on training and
    committing checkpoints into a run dir that a relaunch then shares with them. Linux's parent-death
    signal makes the kernel SIGKILL the worker the moment the agent goes: nothing is written after
    that, and a kill -9 leaves every committed checkpoint intact (DESIGN §4). (The agent forks its
    workers from its main thread, which lives as long as the agent.)"""
    if cluster.launcher != "torchrun" or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        print(f"disttrain: warning: could not tie this rank to torchrun (prctl errno {ctypes.get_errno()})",
              file=sys.stderr)  # fmt: skip
