"""Write fences: a check that runs before every write `fs` makes under a path prefix.

The run-dir lease on an object store (`lease.py`) fences its run dir: a process frozen past the lease's
TTL (SIGSTOP, a paused container, a VM that was suspended) may have lost the run dir to another run by
the time it wakes, and its next write would land among that run's files. So every write under the run
dir first asks the lease, which answers at the cost of a clock read while its last renewal is recent,
and raises (fs.LeaseLost) when the lease is gone or can no longer be vouched for. Stdlib only, and
`fs` is its only caller, so the rule holds for every writer, including ones written later.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Check = Callable[[str], None]  # raises to refuse a write of that path

_lock = threading.Lock()
_fences: dict[str, Check] = {}


def add(prefix: str, check: Check) -> None:
    """Run `check(path)` before every write of `prefix` or a path under it."""
    with _lock:
        _fences[prefix.rstrip("/")] = check


def remove(prefix: str) -> None:
    with _lock:
        _fences.pop(prefix.rstrip("/"), None)


def check(path: str) -> None:
    """Called by `fs` before it writes, renames or deletes `path`: raises if a fence refuses it."""
    if not _fences:  # the common case: nothing fenced, one dict lookup per write
        return
    with _lock:
        matching = [c for p, c in _fences.items() if path == p or path.startswith(p + "/")]
    for fence in matching:
        fence(path)
