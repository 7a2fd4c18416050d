"""Local staging for writers whose library cannot write to a remote run dir directly."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from disttrain import fs


class Staging:
    """A local folder for libraries that only write local files (TensorBoard, wandb). For a local
    run dir it is the target itself; for a remote one (s3://) a temporary folder whose files `sync`
    copies up, every `every_s` seconds from `maybe_sync` and at close. A kill -9 loses what changed
    since the last sync."""

    def __init__(self, target: str, every_s: float = 60.0):
        self.target, self.every_s = target, every_s
        self.remote = not fs.is_local(target)
        self._tmp = tempfile.mkdtemp(prefix="disttrain-stage-") if self.remote else None
        self.local = (
            os.path.join(self._tmp, fs.basename(target)) if self._tmp else target.removeprefix("file://")
        )
        os.makedirs(self.local, exist_ok=True)
        self._sent: dict[str, tuple[float, int]] = {}
        self._last = time.monotonic()

    def maybe_sync(self) -> None:
        if self.remote and time.monotonic() - self._last > self.every_s:
            self.sync()

    def sync(self) -> None:
        """Copy new or changed files up whole (object stores cannot append)."""
        if not self.remote:
            return
        self._last = time.monotonic()
        for root, _, names in os.walk(self.local):
            for name in names:
                path = os.path.join(root, name)
                if os.path.islink(path):
                    continue  # wandb's latest-run / debug.log shortcuts
                stat = os.stat(path)
                if self._sent.get(path) == (stat.st_mtime, stat.st_size):
                    continue
                rel = os.path.relpath(path, self.local).replace(os.sep, "/")
                with open(path, "rb") as fh:
                    fs.write_bytes(fs.join(self.target, rel), fh.read())
                self._sent[path] = (stat.st_mtime, stat.st_size)

    def close(self) -> None:
        self.sync()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
