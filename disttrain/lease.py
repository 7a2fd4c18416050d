"""One run per run dir: a lease that names its holder (host, pid, job id).

Two runs writing one run dir adopt each other's checkpoints, interleave their logs and delete each
other's files. So rank 0 takes RUN_DIR/lease.json before the run reads or writes anything there, holds
it for the run's life and gives it back at the end; a second run exits 2 naming the holder. Only rank
0 takes it (one per run, however many nodes), after the process group exists, so every rank learns the
outcome and all exit alike.

Local disks (and NFS): an exclusive POSIX record lock on lease.json (fcntl.lockf). The kernel drops it
when the holder dies, kill -9 included, so a stale lease needs no judging: the next run simply gets the
lock. A torchrun restart or a SLURM requeue of the same run starts after the previous attempt's
processes are gone, so it never finds its own lease held. A POSIX lock belongs to a process and is not
inherited by DataLoader workers forked from it.

Object stores (s3://) have no locks: the lease is an object created only if absent (a conditional PUT)
and renewed by a heartbeat every TTL/4. It is stale, and taken over, when its last renewal is older than
the TTL ($DISTTRAIN_LEASE_TTL_S, default 120 s), when its holder was a process on this host, in this
pid namespace and this boot, that is gone (two containers sharing a host name, `--network host`, have
pids of their own: a pid from another namespace says nothing here), or when it belongs to the same SLURM
job (a requeued attempt). Taking over a stale lease (delete, then create) is not atomic: two runs doing
so in the same instant can both believe they hold it.

A holder frozen past the TTL (SIGSTOP, a paused container, a suspended VM) may find its lease taken
when it wakes, and must then write nothing more: every write into the run dir goes through a fence
(`fence`, checked by `fs`) that passes while the last renewal began less than half the TTL ago (a clock
read), and otherwise confirms and renews the lease first. The clock is CLOCK_BOOTTIME, which keeps
counting while the process is stopped and while the machine sleeps. Past the TTL, or with the lease
gone, the write raises fs.LeaseLost: the run ends with exit 1 and nothing more written. Not covered: a
freeze between the fence and the write it let through (a single write).

This module decides rank roles (rank 0 holds the lease), like the writers do for files.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import secrets
import socket
import sys
import threading
import time
from typing import Any

from disttrain import dist, fence, fs
from disttrain.cluster import ClusterEnv
from disttrain.errors import ConfigError
from disttrain.rundir import LEASE, RunDir, linked_files

TTL_ENV = "DISTTRAIN_LEASE_TTL_S"
DEFAULT_TTL_S = 120.0
FRESH_SHARE = 0.5  # a renewal vouches for writes for this share of the TTL; the rest is margin
Holder = dict[str, Any]


class RunLease:
    """The run dir's lease, held by rank 0 between `acquire` and `release`."""

    def __init__(self, run_dir: str, env: ClusterEnv):
        self.run_dir = run_dir.removeprefix("file://")
        self.path = RunDir(self.run_dir).file(LEASE)
        self.env = env
        self._created: list[str] = []  # local directories made for the lease, deepest first
        self._lock: _FileLock | _ObjectLock | None = None

    def acquire(self) -> None:
        """Take the lease on rank 0; raises ConfigError on every rank if another run holds it.
        Must be called on all ranks."""
        problem = self._take() if dist.is_main() else None
        problem = dist.broadcast_from_main(problem)
        if problem is not None:
            raise ConfigError(problem)

    def release(self) -> None:
        """Give the lease back (rank 0; a no-op elsewhere and when not held). If the run dir was created
        for the lease and nothing else was written there (bad input found after it was taken), it goes."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        lock.release()
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first; rmdir refuses a directory that is not empty
            try:
                os.rmdir(folder)
            except OSError:
                return

    def _take(self) -> str | None:
        me = holder_record(self.env)
        linked = linked_files(self.run_dir)
        if linked:  # refused before anything is written: a write would go through it, out of the run dir
            return (
                f"run_dir: {linked[0]} is a symbolic link (to {os.readlink(linked[0])}); disttrain never writes "
                "through a link in a run dir: replace it with the file itself, or remove it"
            )
        try:
            self._created = _missing_dirs(self.run_dir) if fs.is_local(self.run_dir) else []
            fs.makedirs(self.run_dir)
            lock: _FileLock | _ObjectLock = (
                _FileLock(self.path) if fs.is_local(self.path) else _ObjectLock(self.path, self.run_dir)
            )
            other = lock.take(me, self.env)
        except OSError as err:
            return (
                f"run_dir: cannot take the run-dir lease {self.path}: {err}; check the path and permissions"
            )
        if other is not None:
            self._remove_created()
            return (
                f"run_dir {self.run_dir} is in use by another run ({describe(other)}; {self.path}); wait for "
                "it to end or stop it, or choose another run_dir"
            )
        self._lock = lock
        return None


def _missing_dirs(path: str) -> list[str]:
    """The directories of `path` that do not exist yet, deepest first."""
    missing, folder = [], os.path.abspath(path)
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


# --------------------------------------------------------------------------------------- holders


def holder_record(env: ClusterEnv) -> Holder:
    """Who takes the lease: enough for a person to find the run, and for the next run to judge it."""
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": process_start(os.getpid()),
        "job_id": env.job_id,
        "launcher": env.launcher,
        "started": now,
        "renewed": now,
        "token": secrets.token_hex(8),
        **pid_space(),
    }


def pid_space() -> Holder:
    """Where this process's pid means something: the boot (a reboot reuses pids) and the pid namespace
    (each container has its own pids, even when it shares the host name). None where /proc does not say."""
    return {"boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_ns": _readlink("/proc/self/ns/pid")}


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def describe(holder: Holder) -> str:
    parts = [f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"]
    if holder.get("job_id"):
        parts.append(f"job {holder['job_id']} ({holder.get('launcher', '?')})")
    if isinstance(holder.get("started"), (int, float)):
        started = datetime.datetime.fromtimestamp(holder["started"], datetime.timezone.utc)
        parts.append(f"since {started:%Y-%m-%d %H:%M:%S} UTC")
    return ", ".join(parts)


def process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, from /proc), so a reused pid is not taken
    for the holder; None where /proc does not tell."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def judged_here(holder: Holder) -> bool:
    """Whether this process can judge the holder's process by its pid: the same host, the same boot and
    the same pid namespace. A record without these fields (an older disttrain) is judged by its TTL."""
    here = pid_space()
    return holder.get("host") == socket.gethostname() and all(holder.get(k) == v for k, v in here.items())


def alive_here(holder: Holder) -> bool:
    """Whether the holder's process still runs (asked only for a holder judged_here)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not _exists(pid):
        return False
    start = holder.get("pid_start")
    return start is None or process_start(pid) in (None, start)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: it exists
    return True


def ttl_s() -> float:
    text = os.environ.get(TTL_ENV, "").strip()
    try:
        return max(1.0, float(text)) if text else DEFAULT_TTL_S
    except ValueError:
        return DEFAULT_TTL_S


def is_stale(holder: Holder, env: ClusterEnv, now: float | None = None) -> bool:
    """An object-store lease no live run holds: not renewed for the TTL, its process on this host gone,
    or an earlier attempt of this very SLURM job (requeued: its tasks are gone)."""
    now = time.time() if now is None else now
    if env.requeues_slurm and env.job_id and holder.get("job_id") == env.job_id:
        return True
    if judged_here(holder) and not alive_here(holder):
        return True
    renewed = holder.get("renewed")
    return not isinstance(renewed, (int, float)) or now - renewed > ttl_s()


def _parse(data: bytes) -> Holder | None:
    try:
        holder = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


# ----------------------------------------------------------------------------------------- locks


class _FileLock:
    """lease.json on a local (or NFS) disk, held with fcntl.lockf while the run lives."""

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def take(self, me: Holder, env: ClusterEnv) -> Holder | None:
        import fcntl

        for _ in range(5):
            # O_NOFOLLOW: a symlink planted at lease.json fails (ELOOP) instead of truncating its target.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EACCES, errno.EAGAIN):
                    return self._holder() or {"pid": "?", "host": "? (starting right now)"}
                print(f"disttrain: warning: no run-dir lock on this filesystem ({err}); two runs on "
                      f"{os.path.dirname(self.path)} would not be stopped", file=sys.stderr)  # fmt: skip
                return None
            if _same_file(fd, self.path):  # not removed by a holder releasing it in between
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
                os.fsync(fd)
                self.fd = fd
                return None
            os.close(fd)
        return None

    def _holder(self) -> Holder | None:
        try:
            with open(self.path, "rb") as fh:
                return _parse(fh.read())
        except OSError:
            return None

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still locked: nobody can lock the file being removed
            os.close(self.fd)
            self.fd = None


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _clock() -> float:
    """Seconds on a clock that runs on while this process is stopped or the machine sleeps."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


class _ObjectLock:
    """lease.json on an object store: created if absent, renewed by a heartbeat thread, and the fence
    of every write into the run dir while it is held."""

    def __init__(self, path: str, run_dir: str):
        self.path, self.run_dir = path, run_dir
        self.me: Holder = {}
        self.lost: str | None = None  # why this run no longer holds the lease, once it does not
        self._vouched = 0.0  # _clock() when the last renewal (or the creation) began
        self._renewing = threading.Lock()  # one renewal at a time: the heartbeat's or a write's
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self, me: Holder, env: ClusterEnv) -> Holder | None:
        for _ in range(3):
            began = _clock()
            if fs.create_exclusive(self.path, json.dumps(me).encode()):
                self.me, self._vouched = me, began
                fence.add(self.run_dir, self.check)
                self._thread = threading.Thread(target=self._beat, name="disttrain-lease", daemon=True)
                self._thread.start()
                return None
            holder = self._holder()
            if holder is not None and not is_stale(holder, env):
                return holder
            fs.remove(self.path)  # stale (or unreadable): take it over
        return self._holder()

    def _holder(self) -> Holder | None:
        try:
            return _parse(fs.read_bytes(self.path))
        except FileNotFoundError:
            return None

    def check(self, path: str) -> None:
        """The run dir's write fence: passes at the cost of a clock read while the last renewal is
        recent; otherwise confirms and renews the lease first. Raises fs.LeaseLost once it is gone."""
        if path == self.path:
            return  # the lease's own renewals and release
        if self.lost is None and _clock() - self._vouched < ttl_s() * FRESH_SHARE:
            return
        self.renew()
        if self.lost is not None:
            raise fs.LeaseLost(self.lost)

    def renew(self) -> None:
        """Confirm that the lease is still this run's and renew it, or record that it is lost. A lease
        not renewed for its TTL is lost whatever the object says: another run may be taking it over."""
        with self._renewing:
            began, renewed = _clock(), time.time()
            if self.lost is not None:
                return
            if began - self._vouched >= ttl_s():
                self._lose(
                    f"not renewed for {began - self._vouched:.0f} s, more than its TTL of {ttl_s():g} s (this "
                    "process was stopped, or its storage failed), so another run may hold it now"
                )
                return
            holder = self._holder()
            if holder is None or holder.get("token") != self.me["token"]:
                self._lose(
                    f"another run holds it ({describe(holder)})" if holder else "its object was deleted"
                )
                return
            self.me["renewed"] = renewed
            fs.write_bytes(self.path, json.dumps(self.me).encode())
            self._vouched = began

    def _lose(self, why: str) -> None:
        self.lost = f"lost the run-dir lease {self.path}: {why}; this run stops and writes nothing more there"
        print(f"disttrain: error: {self.lost}", file=sys.stderr, flush=True)

    def _beat(self) -> None:
        while self.lost is None and not self._stop.wait(ttl_s() / 4):
            try:
                self.renew()
            except OSError as err:  # storage trouble: the deadline bounded it; try again next beat
                print(f"disttrain: warning: could not renew the run-dir lease {self.path}: {err}",
                      file=sys.stderr)  # fmt: skip

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is not None:
            return  # the fence stays up: nothing more is written, and the lease is not this run's to delete
        fence.remove(self.run_dir)
        if fs.storage_degraded():
            return  # the store just failed: the next run finds this holder's process gone, or its TTL out
        with contextlib.suppress(OSError):
            holder = self._holder()
            if holder is not None and holder.get("token") == self.me.get("token"):
                fs.remove(self.path)
