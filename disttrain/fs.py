"""String paths over fsspec: a local fast path, `s3://`, `memory://` and anything else fsspec knows.

Remote paths stay strings end to end (never pathlib). Writes that must be all-or-nothing go through
`atomic_write`: on local disks a temporary name, fsync and rename; on object stores a single PUT,
which readers see whole or not at all.

Every remote call is bounded (`storage_call`): S3 requests get connect and read timeouts and a few
retries with backoff (botocore's, s3fs's), and the whole call a deadline, so an endpoint that stalls or
dies ends the call with a StorageError naming it instead of freezing the run. A call that is slow says
so on stderr while it waits. The waiting thread wakes every fraction of a second, so stop signals are
recorded during a stall (their handlers run), and the run's stop path proceeds once the call returns.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import fsspec

from disttrain import fence

T = TypeVar("T")
TIMEOUT_ENV = "DISTTRAIN_STORAGE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120.0  # one remote call, retries included; plus 1 s per MiB it moves
DEGRADED_TIMEOUT_S = (
    10.0  # after a call failed, until one succeeds: a dead endpoint costs seconds, not minutes
)
_BYTES_PER_S_FLOOR = 1 << 20


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


local_path = _local  # a local path or file:// URL as the OS takes it


def filesystem(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it). Raises a clear error when the protocol's package is missing."""
    try:
        fs, inner = fsspec.core.url_to_fs(path, **_options(path))
    except ImportError as err:
        protocol = path.split("://", 1)[0]
        extra = " (pip install 'disttrain[s3]')" if protocol in ("s3", "s3a") else ""
        raise RuntimeError(f"no filesystem for {protocol}:// paths: {err}{extra}") from None
    if isinstance(getattr(fs, "retries", None), int):
        fs.retries = min(fs.retries, 2)  # s3fs's own loop, around botocore's: keep the product small
    return fs, inner


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/") if base not in ("/", "") else base
    for part in parts:
        out = f"{out}/{part.strip('/')}" if out else part
    return out


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def exists(path: str) -> bool:
    if is_local(path):
        return os.path.exists(_local(path))
    fs, inner = filesystem(path)
    return storage_call("checking", path, lambda: bool(fs.exists(inner)))


def isdir(path: str) -> bool:
    if is_local(path):
        return os.path.isdir(_local(path))
    fs, inner = filesystem(path)
    return storage_call("checking", path, lambda: bool(fs.isdir(inner)))


def isfile(path: str) -> bool:
    if is_local(path):
        return os.path.isfile(_local(path))
    fs, inner = filesystem(path)
    return storage_call("checking", path, lambda: bool(fs.isfile(inner)))


def islink(path: str) -> bool:
    """A symbolic link (local disks only: object stores have none)."""
    return is_local(path) and os.path.islink(_local(path))


def makedirs(path: str) -> None:
    """Create a directory and its parents; a no-op on object stores, where directories are implicit."""
    if is_local(path):
        os.makedirs(_local(path), exist_ok=True)
        return
    fs, inner = filesystem(path)

    def make() -> None:
        with contextlib.suppress(FileExistsError):
            fs.makedirs(inner, exist_ok=True)

    storage_call("creating", path, make)


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries directly under `path`; empty when it does not exist."""
    if is_local(path):
        local = _local(path)
        return sorted(os.listdir(local)) if os.path.isdir(local) else []
    fs, inner = filesystem(path)
    try:
        entries = storage_call("listing", path, lambda: fs.ls(inner, detail=False, refresh=True))
    except FileNotFoundError:
        return []
    return sorted({basename(e) for e in entries if basename(e) and e.rstrip("/") != inner.rstrip("/")})


def size(path: str) -> int:
    if is_local(path):
        return os.path.getsize(_local(path))
    fs, inner = filesystem(path)
    return storage_call("checking", path, lambda: int(fs.size(inner)))


def human_size(n: float) -> str:
    """A size for people, in powers of 1024: 512 B, 3.4 KB, 120.5 MB, 1.2 TB."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def open_file(path: str, mode: str = "rb") -> IO[Any] | _BoundedFile:
    if mode.strip("bt") != "r":
        fence.check(path)
    if is_local(path):
        return open(_local(path), mode)  # noqa: SIM115 - returned to the caller's `with`
    fs, inner = filesystem(path)
    return _BoundedFile(storage_call("opening", path, lambda: fs.open(inner, mode)), path)


def read_bytes(path: str) -> bytes:
    if is_local(path):
        with open(_local(path), "rb") as local:
            return local.read()
    # One GET for the whole object, given the time its size needs. Not through open(): s3fs pins the
    # object's ETag when it opens it, and a log rewritten meanwhile (an append, on S3) fails the read.
    fs, inner = filesystem(path)
    size = storage_call("checking", path, lambda: int(fs.size(inner)))
    return storage_call("reading", path, lambda: bytes(fs.cat_file(inner)), nbytes=size)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Plain write (not atomic on local disks); use atomic_write for anything a reader must trust."""
    fence.check(path)
    if is_local(path):
        with _local_write("writing", path), _open_nofollow(path, os.O_TRUNC) as fh:
            fh.write(data)
        return
    fs, inner = filesystem(path)
    storage_call("writing", path, lambda: fs.pipe_file(inner, data), nbytes=len(data))


def atomic_write(path: str, data: bytes | str) -> None:
    """Readers see the old content or the new, never a torn file."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if not is_local(path):
        write_bytes(path, payload)  # one PUT: object stores publish an object whole
        return
    fence.check(path)
    with _local_write("writing", path):
        _atomic_write_local(path, payload)


def _atomic_write_local(path: str, payload: bytes) -> None:
    """A temporary name, fsync, rename: a symlink at `path` is replaced, never written through."""
    local = _local(path)
    folder = os.path.dirname(local) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(local)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, local)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def append_text(path: str, text: str) -> None:
    """Append to a log file. Object stores cannot append, so the object is rewritten whole."""
    if is_local(path):
        fence.check(path)
        with _local_write("appending to", path), _open_nofollow(path, os.O_APPEND) as fh:
            fh.write(text.encode("utf-8"))
        return
    old = read_text(path) if exists(path) else ""
    write_bytes(path, (old + text).encode("utf-8"))


def remove(path: str, recursive: bool = False) -> None:
    """Delete a file or (with `recursive`) a directory; missing paths are fine. A symlink is removed
    itself, never what it points to, and rmtree does not follow the links inside a directory."""
    fence.check(path)
    if is_local(path):
        local = _local(path)
        if os.path.isdir(local) and recursive and not os.path.islink(local):
            shutil.rmtree(local, ignore_errors=False)
        elif os.path.lexists(local):
            os.unlink(local)
        return
    fs, inner = filesystem(path)

    def rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            fs.rm(inner, recursive=recursive)

    storage_call("deleting", path, rm)


def rename(src: str, dst: str) -> None:
    """Atomic on one local filesystem; object stores copy then delete (not atomic, callers know)."""
    fence.check(src)
    fence.check(dst)
    if is_local(src):
        os.replace(_local(src), _local(dst))
        fsync_dir(os.path.dirname(_local(dst)) or ".")
        return
    fs, inner = filesystem(src)
    _, inner_dst = filesystem(dst)
    storage_call("renaming", src, lambda: fs.mv(inner, inner_dst, recursive=True))


@contextlib.contextmanager
def _local_write(what: str, path: str) -> Iterator[None]:
    """A local write's failure (a full disk, a read-only mount, a symlink where a file should be) as one
    StorageError naming the file: OSError's own text leaves the file out when the write itself fails."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise  # an answer about the path, for the caller
    except StorageError:
        raise
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StorageError(
                f"{what} {path} refused: it is a symbolic link, and disttrain never writes through one in a "
                "run dir; replace it with a plain file or remove it"
            ) from None
        raise StorageError(f"{what} {path} failed: {first_line(err)}") from err


def _open_nofollow(path: str, flags: int) -> IO[bytes]:
    """Open a local file for writing without following a symlink at its name (O_NOFOLLOW: ELOOP)."""
    fd = os.open(_local(path), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | flags, 0o666)
    return os.fdopen(fd, "wb")


def fsync_dir(folder: str) -> None:
    """Make a rename or create in `folder` durable across a power cut (POSIX needs the dir fsynced)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def walk_files(path: str) -> Iterator[str]:
    """Every file under `path`, as full paths in the same form as `path`."""
    if is_local(path):
        for root, _, files in os.walk(_local(path)):
            for name in files:
                yield os.path.join(root, name)
        return
    fs, inner = filesystem(path)
    protocol = path.split("://", 1)[0]
    for item in storage_call("listing", path, lambda: list(fs.find(inner))):
        yield f"{protocol}://{item}"


def create_exclusive(path: str, data: bytes) -> bool:
    """Write `path` only if it does not exist yet; False if it did. Atomic on local disks (O_EXCL) and on
    S3 (a conditional PUT, If-None-Match); stores that cannot do that fall back to check-then-write."""
    fence.check(path)
    if is_local(path):
        try:
            fd = os.open(_local(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True
    fs, inner = filesystem(path)

    def put() -> bool:
        try:
            fs.pipe_file(inner, data, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError, ValueError):  # no exclusive mode on this store
            if fs.exists(inner):
                return False
            fs.pipe_file(inner, data)
        return True

    return storage_call("creating", path, put, nbytes=len(data))


# ------------------------------------------------------------------------------- storage deadlines


class StorageError(OSError):
    """A storage call failed (or, remote, did not answer in time); the message names the call and the path."""


class LeaseLost(StorageError):
    """This run no longer holds its run dir's lease (lease.py): nothing more may be written there."""


class _Health:
    """Whether the last remote call failed: then the next ones get a short deadline until one succeeds,
    so a run whose storage died reaches its end (recording the error, releasing its lease) in seconds."""

    degraded = False


def storage_degraded() -> bool:
    """Whether the last remote call failed (and none has succeeded since)."""
    return _Health.degraded


def timeout_s() -> float:
    """The deadline of one remote call ($DISTTRAIN_STORAGE_TIMEOUT_S, default 120 s)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def storage_call(what: str, path: str, call: Callable[[], T], nbytes: int = 0) -> T:
    """Run one remote storage call with a deadline (timeout_s(), plus 1 s per MiB of `nbytes`).

    The call runs on a helper thread while this one waits in short slices: past a third of the deadline
    it says on stderr what it is waiting for; at the deadline it raises StorageError and leaves the
    helper behind (its own socket timeouts end it). Errors the storage library raises that are not
    OSErrors (botocore's) become StorageError, so callers handle one family."""
    limit = min(timeout_s(), DEGRADED_TIMEOUT_S) if _Health.degraded else timeout_s()
    limit += nbytes / _BYTES_PER_S_FLOOR
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as err:  # handed to the waiting thread, which raises it
            box["error"] = err
        finally:
            done.set()

    threading.Thread(target=run, name=f"disttrain-storage {what}", daemon=True).start()
    _wait(done, what, path, limit, quiet=_Health.degraded)  # a failure was already reported
    error = box.get("error")
    if error is None:
        _Health.degraded = False
        return box["value"]
    if isinstance(error, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        raise error  # an answer, not a failure of the storage
    _Health.degraded = True
    if isinstance(error, OSError):
        raise StorageError(f"{what} {path} failed: {first_line(error)}") from error
    if isinstance(error, Exception):
        raise StorageError(f"{what} {path} failed: {type(error).__name__}: {first_line(error)}") from error
    raise error


def _wait(done: threading.Event, what: str, path: str, limit: float, quiet: bool) -> None:
    t0 = time.monotonic()
    warned = quiet
    while not done.wait(0.2):
        waited = time.monotonic() - t0
        if waited >= limit:
            _Health.degraded = True
            raise StorageError(
                f"storage did not answer: {what} {path} took more than {limit:.0f} s "
                f"(${TIMEOUT_ENV}); check the endpoint and the network"
            )
        if not warned and waited >= limit / 3:
            warned = True
            print(
                f"disttrain: storage is slow: {what} {path} has not finished after {waited:.0f} s "
                f"(giving up after {limit:.0f} s)",
                file=sys.stderr,
                flush=True,
            )


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's text, or its type's name when it has none: what a
    one-line error quotes (a cause whose text starts with a newline must not come out empty). The
    full text belongs in the log."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _options(path: str) -> dict[str, Any]:
    """Request-level bounds for S3: connect and read timeouts and a few retries with backoff (botocore's
    standard mode), all inside the call's deadline. (s3fs retries on top: `filesystem` shortens that.)"""
    if not path.startswith(("s3://", "s3a://")):
        return {}
    limit = timeout_s()
    return {
        "config_kwargs": {
            "connect_timeout": min(10.0, limit),
            "read_timeout": min(30.0, limit),
            "retries": {"max_attempts": 3, "mode": "standard"},
        },
    }


class _BoundedFile:
    """A remote file whose reads, writes and close (where object stores upload) are bounded calls."""

    def __init__(self, fh: Any, path: str):
        self._fh, self._path = fh, path

    def read(self, n: int = -1) -> Any:
        return storage_call("reading", self._path, lambda: self._fh.read(n), nbytes=max(n, 0))

    def write(self, data: Any) -> int:
        return storage_call("writing", self._path, lambda: self._fh.write(data), nbytes=len(data))

    def flush(self) -> None:
        storage_call("writing", self._path, self._fh.flush)

    def close(self) -> None:
        storage_call("writing", self._path, self._fh.close)

    def __enter__(self) -> _BoundedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)
