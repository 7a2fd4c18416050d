"""A time limit on writing a checkpoint (checkpoint.save_timeout_s), so that slow storage fails a save
as a checkpoint error instead of killing every rank.

While rank 0 writes, the other ranks wait for its verdict in a collective. Bounded by the process
group's timeout (trainer.collective_timeout_s), a save longer than that timeout would end every rank
with a collective failure. Instead the ranks wait on a group of their own, bounded by the save's
timeout (dist.side_group), and rank 0 stops waiting for its writer thread at that timeout: the save
fails on every rank as a CheckpointError naming the key, and the previous checkpoint is intact,
because the abandoned writer is refused its commit (manifest, `latest`, retention) whenever it gets
there. A commit already under way when the time is up is let finish (a manifest and a pointer: small
writes), and then the save counts as done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from disttrain.ckpt_format import CheckpointError

MARGIN_S = 30.0  # how much longer than rank 0 the other ranks wait for its verdict (clock skew, hand-off)


class SaveDeadline:
    """One save's writer and its limit: `run` (a sync save) or `watch` + `wait` (an async one) on rank
    0; the writer wraps its commit in `commit()`."""

    def __init__(self, seconds: float, what: str):
        self.seconds, self.what = seconds, what
        self._lock = threading.Lock()  # held by the writer while it commits
        self._abandoned = self._committed = False
        self._box: dict[str, Any] = {}
        self._thread: threading.Thread | None = None

    @contextmanager
    def commit(self) -> Iterator[None]:
        """The writer's commit: refused once the caller gave up waiting."""
        with self._lock:
            if self._abandoned:
                raise CheckpointError(f"{self.what}: abandoned after checkpoint.save_timeout_s; not published")
            yield
            self._committed = True

    def run(self, fn: Callable[[], Any], on_timeout: Callable[[], str] = lambda: "") -> Any:
        """fn() on a writer thread, waiting at most `seconds`; its result, or its exception re-raised."""
        self.watch(fn)
        return self.wait(on_timeout)

    def watch(self, fn: Callable[[], Any]) -> None:
        """Start fn() on a writer thread (daemon: an abandoned one must not keep the process alive)."""

        def target() -> None:
            try:
                self._box["result"] = fn()
            except BaseException as err:  # handed to whoever waits, on their thread
                self._box["error"] = err

        self._thread = threading.Thread(target=target, name="disttrain-save", daemon=True)
        self._thread.start()

    def wait(self, on_timeout: Callable[[], str] = lambda: "") -> Any:
        """Wait for the writer at most `seconds`. Past that, give up (a CheckpointError whose message
        ends with on_timeout()), unless its commit has begun, which is waited for."""
        assert self._thread is not None
        self._thread.join(self.seconds)
        if self._thread.is_alive():
            with self._lock:  # waits for a commit in progress; after this, none can start
                self._abandoned = not self._committed
            if self._committed:
                self._thread.join()  # committed: only its return is left
        if self._abandoned:
            raise CheckpointError(
                f"{self.what} took longer than checkpoint.save_timeout_s={self.seconds:g} s (slow or stuck "
                f"storage): abandoned, not published; {on_timeout()}; raise checkpoint.save_timeout_s if "
                "saves this slow are expected"
            )
        if "error" in self._box:
            raise self._box["error"]
        return self._box.get("result")
