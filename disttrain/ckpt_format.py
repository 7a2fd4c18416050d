"""The on-disk checkpoint format: writing a step directory, its manifest, and reading it back only
after every file matched the manifest.

`model.safetensors` holds the weights; `state.pt` and `ranks.pt` hold tensors and plain data and are
loaded only with `torch.load(weights_only=True)`, after their sha256 matched: a replaced file is
refused twice. `manifest.json` is written last; a directory without one does not exist for readers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import safetensors.torch
import torch

from disttrain import fs

State = dict[str, Any]
FILES = ("model.safetensors", "state.pt", "ranks.pt")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, read or trusted; the message names the file and the problem."""


def write_files(work: str, host: State, ranks: list[Any]) -> dict[str, State]:
    fs.makedirs(work)
    # The host copy gave every tensor its own storage; contiguous too, and tied weights save fine.
    model = {name: t.contiguous() for name, t in host["model"].items()}
    blobs = {
        "model.safetensors": safetensors.torch.save(model),
        "state.pt": _torch_bytes({k: v for k, v in host.items() if k != "model"}),
        "ranks.pt": _torch_bytes(ranks),
    }
    return {name: _put(fs.join(work, name), data) for name, data in blobs.items()}


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _put(path: str, data: bytes) -> State:
    with fs.open_file(path, "wb") as fh:
        fh.write(data)
        if fs.is_local(path):
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename that publishes it
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def publish(work: str, final: str, manifest: State) -> None:
    _put(fs.join(work, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
    if work != final:
        fs.fsync_dir(work)
        fs.remove(final, recursive=True)  # an earlier save of this step, e.g. a corrupt one skipped
        fs.rename(work, final)  # atomic on one filesystem; fs.rename fsyncs the parent


def read_manifest(path: str) -> State:
    """The manifest of the checkpoint at `path`, checked for shape; raises CheckpointError."""
    where = fs.join(path, MANIFEST)
    try:
        m = json.loads(fs.read_text(where))
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing, so {path} is not a committed checkpoint") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{where}: unreadable ({err})") from None
    problem = _manifest_problem(m)
    if problem is not None:
        raise CheckpointError(f"{where}: {problem}")
    return m


def _manifest_problem(m: Any) -> str | None:
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
        return "not a disttrain manifest (no files table)"
    if not all(isinstance(m.get(key), (int, float)) for key in ("step", "time", "world_size")):
        return "step, time or world_size is missing or not a number"
    if any(name not in m["files"] for name in FILES):
        return f"does not list all of {', '.join(FILES)}"
    for name, meta in m["files"].items():
        if "/" in name or name.startswith(".") or not isinstance(meta, dict):
            return f"bad file entry {name!r}"
        if not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
            return f"file entry {name!r} lacks bytes or sha256"
    return None


def problem(path: str, full: bool) -> str | None:
    try:
        return files_problem(path, read_manifest(path), full)
    except CheckpointError as err:
        return str(err)


def files_problem(path: str, m: State, full: bool) -> str | None:
    for name, meta in m["files"].items():
        where = fs.join(path, name)
        try:
            n = fs.size(where)
        except FileNotFoundError:
            return f"{where}: missing (the manifest lists it with {meta['bytes']} bytes)"
        problem = _mismatch(where, meta, n, _sha256_file(where) if full and n == meta["bytes"] else None)
        if problem is not None:
            return problem
    return None


def _mismatch(where: str, meta: State, n: int, digest: str | None) -> str | None:
    if n != meta["bytes"]:
        return f"{where}: {n} bytes, but the manifest says {meta['bytes']} (truncated or overwritten)"
    if digest is not None and digest != meta["sha256"]:
        expected = meta["sha256"][:16]
        return f"{where}: sha256 {digest[:16]}... does not match the manifest's {expected}... (corrupted or replaced)"
    return None


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with fs.open_file(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_verified(path: str, name: str, m: State) -> bytes:
    where = fs.join(path, name)
    try:
        data = fs.read_bytes(where)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing (the manifest lists it)") from None
    problem = _mismatch(where, m["files"][name], len(data), hashlib.sha256(data).hexdigest())
    if problem is not None:
        raise CheckpointError(problem)
    return data


def read_checkpoint(path: str) -> tuple[State, list[Any]]:
    """(app_state, per-rank states) of the checkpoint at `path`; every file is checked before use."""
    m = read_manifest(path)
    blobs = {name: read_verified(path, name, m) for name in FILES}
    try:
        model = safetensors.torch.load(blobs["model.safetensors"])
    except Exception as err:  # the safetensors parser's own error types
        raise CheckpointError(f"{fs.join(path, FILES[0])}: not a safetensors file ({err})") from None
    state = _torch_load(blobs["state.pt"], fs.join(path, "state.pt"))
    ranks = _torch_load(blobs["ranks.pt"], fs.join(path, "ranks.pt"))
    if not isinstance(state, dict) or not isinstance(ranks, list):
        raise CheckpointError(f"{path}: state.pt or ranks.pt does not hold what disttrain writes")
    return {"model": model, **state}, ranks


def _torch_load(data: bytes, where: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for foreign objects, RuntimeError for a broken archive
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{where}: refused by torch.load(weights_only=True): {first}") from None
