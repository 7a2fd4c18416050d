"""String paths over fsspec: a local fast path, `s3://`, `memory://` and anything else fsspec knows.

Remote paths stay strings end to end (never pathlib). Writes that must be all-or-nothing go through
`atomic_write`: on local disks a temporary name, fsync and rename; on object stores a single PUT,
which readers see whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import fsspec


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def filesystem(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it). Raises a clear error when the protocol's package is missing."""
    try:
        fs, inner = fsspec.core.url_to_fs(path)
    except ImportError as err:
        protocol = path.split("://", 1)[0]
        extra = " (pip install 'disttrain[s3]')" if protocol in ("s3", "s3a") else ""
        raise RuntimeError(f"no filesystem for {protocol}:// paths: {err}{extra}") from None
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
    return bool(fs.exists(inner))


def isdir(path: str) -> bool:
    if is_local(path):
        return os.path.isdir(_local(path))
    fs, inner = filesystem(path)
    return bool(fs.isdir(inner))


def isfile(path: str) -> bool:
    if is_local(path):
        return os.path.isfile(_local(path))
    fs, inner = filesystem(path)
    return bool(fs.isfile(inner))


def makedirs(path: str) -> None:
    """Create a directory and its parents; a no-op on object stores, where directories are implicit."""
    if is_local(path):
        os.makedirs(_local(path), exist_ok=True)
        return
    fs, inner = filesystem(path)
    with contextlib.suppress(FileExistsError):
        fs.makedirs(inner, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries directly under `path`; empty when it does not exist."""
    if is_local(path):
        local = _local(path)
        return sorted(os.listdir(local)) if os.path.isdir(local) else []
    fs, inner = filesystem(path)
    try:
        entries = fs.ls(inner, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    return sorted({basename(e) for e in entries if basename(e) and e.rstrip("/") != inner.rstrip("/")})


def size(path: str) -> int:
    if is_local(path):
        return os.path.getsize(_local(path))
    fs, inner = filesystem(path)
    return int(fs.size(inner))


def open_file(path: str, mode: str = "rb") -> IO[Any]:
    if is_local(path):
        return open(_local(path), mode)  # noqa: SIM115 - returned to the caller's `with`
    fs, inner = filesystem(path)
    return fs.open(inner, mode)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as fh:
        return fh.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Plain write (not atomic on local disks); use atomic_write for anything a reader must trust."""
    with open_file(path, "wb") as fh:
        fh.write(data)


def atomic_write(path: str, data: bytes | str) -> None:
    """Readers see the old content or the new, never a torn file."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if not is_local(path):
        write_bytes(path, payload)  # one PUT: object stores publish an object whole
        return
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
        with open(_local(path), "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
        return
    old = read_text(path) if exists(path) else ""
    write_bytes(path, (old + text).encode("utf-8"))


def remove(path: str, recursive: bool = False) -> None:
    """Delete a file or (with `recursive`) a directory; missing paths are fine."""
    if is_local(path):
        local = _local(path)
        if os.path.isdir(local) and recursive:
            shutil.rmtree(local, ignore_errors=False)
        elif os.path.lexists(local):
            os.unlink(local)
        return
    fs, inner = filesystem(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(inner, recursive=recursive)


def rename(src: str, dst: str) -> None:
    """Atomic on one local filesystem; object stores copy then delete (not atomic, callers know)."""
    if is_local(src):
        os.replace(_local(src), _local(dst))
        fsync_dir(os.path.dirname(_local(dst)) or ".")
        return
    fs, inner = filesystem(src)
    _, inner_dst = filesystem(dst)
    fs.mv(inner, inner_dst, recursive=True)


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
    for item in fs.find(inner):
        yield f"{protocol}://{item}"
