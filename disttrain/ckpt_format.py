"""The on-disk checkpoint format: writing a step directory, publishing its manifest (whose shape and
reader are disttrain.manifest's), and reading it back only after every file matched the manifest.

`model.safetensors` holds the weights; `state.pt` and `ranks.pt` hold tensors and plain data and are
loaded only with `torch.load(weights_only=True)`, after their sha256 matched: a replaced file is
refused twice. `manifest.json` is written last; a directory without one does not exist for readers.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import threading
from typing import Any

import safetensors.torch
import torch

from disttrain import fs
from disttrain.errors import CheckpointError
from disttrain.manifest import FILES
from disttrain.manifest import read as read_manifest
from disttrain.rundir import MANIFEST

State = dict[str, Any]

# What torch.load(weights_only=True) accepts besides tensors and containers. Anything else is refused
# at save time, so a checkpoint that saved is one that loads.
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def write_files(work: str, host: State, ranks: list[Any], model: bool = True) -> dict[str, State]:
    """Rank 0's files: the weights (unless sharded: then each rank wrote its own), state.pt, ranks.pt."""
    fs.makedirs(work)
    blobs: dict[str, bytes | memoryview] = {}
    if model:
        blobs["model.safetensors"] = bytes(safetensors.torch.save(own_storage(host["model"])))
    blobs["state.pt"] = _torch_bytes({k: v for k, v in host.items() if k != "model" or not model})
    blobs["ranks.pt"] = _torch_bytes(ranks)
    return {name: _put(fs.join(work, name), data) for name, data in blobs.items()}


def own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights, views of one buffer): give every
    tensor after the first on a storage a copy of its own, and make all contiguous."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        shared = ptr in seen and t.numel() > 0
        out[name] = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()
        seen.add(ptr)
    return out


def _torch_bytes(obj: Any) -> memoryview:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer()  # a view, not getvalue()'s copy of the whole archive


def put(path: str, data: bytes | memoryview) -> State:
    """Write `data` to `path` (fsynced on local disks); returns {bytes, sha256} for the manifest."""
    return _put(path, data)


def _put(path: str, data: bytes | memoryview) -> State:
    hasher = _Sha256(data)  # hashes on its own thread while this one writes: both release the GIL
    with fs.open_file(path, "wb") as fh:
        fh.write(data)
        if fs.is_local(path):
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename that publishes it
    return {"bytes": len(data), "sha256": hasher.hexdigest()}


class _Sha256:
    """sha256 of a buffer, computed in a background thread when the buffer is big enough to matter."""

    THREAD_MIN = 1 << 20

    def __init__(self, data: bytes | memoryview):
        self._hash = hashlib.sha256()
        self._thread: threading.Thread | None = None
        if len(data) < self.THREAD_MIN:
            self._hash.update(data)
        else:
            self._thread = threading.Thread(target=self._hash.update, args=(data,), daemon=True)
            self._thread.start()

    def hexdigest(self) -> str:
        if self._thread is not None:
            self._thread.join()
        return self._hash.hexdigest()


def publish(work: str, final: str, m: State) -> None:
    _put(fs.join(work, MANIFEST), json.dumps(m, indent=1, sort_keys=True).encode())
    if work != final:
        fs.fsync_dir(work)
        fs.remove(final, recursive=True)  # an earlier save of this step, e.g. a corrupt one skipped
        fs.rename(work, final)  # atomic on one filesystem; fs.rename fsyncs the parent


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
    data, hasher = _read_hashing(path, name)
    _check(path, name, m, data, hasher)
    return data


def _read_hashing(path: str, name: str) -> tuple[bytes, _Sha256]:
    where = fs.join(path, name)
    try:
        data = fs.read_bytes(where)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing (the manifest lists it)") from None
    return data, _Sha256(data)


def _check(path: str, name: str, m: State, data: bytes, hasher: _Sha256) -> None:
    problem = _mismatch(fs.join(path, name), m["files"][name], len(data), hasher.hexdigest())
    if problem is not None:
        raise CheckpointError(problem)


def read_checkpoint(path: str) -> tuple[State, list[Any]]:
    """(app_state, per-rank states) of the checkpoint at `path`; every file is checked before use."""
    m = read_manifest(path)
    # The .pt files are read and hashed on a thread of their own meanwhile (reads and sha256 release the
    # GIL), and unpickled only after their hash matched. The weights are parsed while their hash is
    # still being computed: safetensors is a format made to be parsed untrusted (no code runs), and
    # nothing parsed is returned unless the hash matched.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="disttrain-read") as pool:
        later = pool.submit(lambda: {name: load_pt_verified(path, name, m) for name in FILES[1:]})
        data, hasher = _read_hashing(path, FILES[0])
        try:
            model = safetensors.torch.load(data)
        except Exception as err:  # the safetensors parser's own error types
            _check(path, FILES[0], m, data, hasher)  # a corrupt file: say so by its hash first
            raise CheckpointError(f"{fs.join(path, FILES[0])}: not a safetensors file ({err})") from None
        _check(path, FILES[0], m, data, hasher)
        loaded = later.result()
    state, ranks = loaded["state.pt"], loaded["ranks.pt"]
    if not isinstance(state, dict) or not isinstance(ranks, list):
        raise CheckpointError(f"{path}: state.pt or ranks.pt does not hold what disttrain writes")
    return {"model": model, **state}, ranks


def parse_weights(path: str, data: bytes) -> State:
    """The tensors of a model.safetensors whose bytes were verified; CheckpointError if unparsable."""
    try:
        return safetensors.torch.load(data)
    except Exception as err:  # the safetensors parser's own error types
        raise CheckpointError(f"{fs.join(path, FILES[0])}: not a safetensors file ({err})") from None


def read_state(path: str, m: State) -> State:
    """state.pt, verified then loaded with weights_only."""
    state = load_pt_verified(path, "state.pt", m)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: state.pt does not hold what disttrain writes")
    return state


def read_ranks(path: str, m: State) -> list[Any]:
    """ranks.pt (every rank's RNG states and cursor), verified then loaded with weights_only."""
    ranks = load_pt_verified(path, "ranks.pt", m)
    if not isinstance(ranks, list):
        raise CheckpointError(f"{path}: ranks.pt does not hold what disttrain writes")
    return ranks


def load_pt_verified(path: str, name: str, m: State) -> Any:
    """A .pt file of the checkpoint, unpickled (weights_only) only after its sha256 matched the manifest.
    A local file is hashed through one open file descriptor in chunks, then loaded from that same
    descriptor: one pass over the bytes fewer than reading them into memory first, and a file swapped
    meanwhile by a rename is not the one loaded. Remote files: read whole, verified, loaded."""
    where = fs.join(path, name)
    if not fs.is_local(where):
        return _torch_load(read_verified(path, name, m), where)
    try:
        with open(fs.local_path(where), "rb") as fh:
            return _verified_load(fh, where, m["files"][name])
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing (the manifest lists it)") from None


def _verified_load(fh: Any, where: str, meta: State) -> Any:
    digest, size = _sha256_open(fh)
    problem = _mismatch(where, meta, size, digest)
    if problem is not None:
        raise CheckpointError(problem)
    fh.seek(0)
    return _torch_load(fh, where)


def _sha256_open(fh: Any) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    while n := fh.readinto(buf):
        h.update(view[:n])  # hashlib and readinto both release the GIL on chunks this size
        size += n
    return h.hexdigest(), size


def _torch_load(data: bytes | Any, where: str) -> Any:
    try:
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for foreign objects, RuntimeError for a broken archive
        raise CheckpointError(
            f"{where}: refused by torch.load(weights_only=True): {fs.first_line(err)}"
        ) from None


def host_copy(obj: Any, where: str, snapshot: bool = True, into: Any = None) -> Any:
    """The tensors of nested plain data on the CPU (copied when `snapshot`, or when they live on a GPU);
    refuses what weights_only loading would refuse. `into`: an earlier host copy of the same state that
    nothing reads any more; each tensor is copied into its counterpart there where shape and dtype match
    (no allocation, no fresh pages to fault in: the local tier's snapshot every few steps)."""
    try:
        with torch.no_grad():
            return _host_copy(obj, snapshot, into)
    except _Refused as err:
        raise CheckpointError(
            f"{where}{err.path} is a {err.kind}: checkpoints hold only tensors and plain data (dict, list, "
            "tuple, str, int, float, bool, None); convert it in state_dict()"
        ) from None


class _Refused(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind, self.path = kind, ""


_NOTHING: dict[Any, Any] = {}


def _host_copy(obj: Any, snapshot: bool, into: Any) -> Any:
    """host_copy's walk, kept lean: it runs for every tensor of the state at every local save."""
    if isinstance(obj, torch.Tensor):
        if (
            isinstance(into, torch.Tensor)
            and into.shape == obj.shape
            and into.dtype == obj.dtype
            and into.is_cpu
            and obj.layout == torch.strided
            and into.is_contiguous()
        ):
            return into.copy_(obj)
        return obj.detach().to("cpu", copy=snapshot)
    if isinstance(obj, dict):
        old = into if isinstance(into, dict) else _NOTHING
        out = {}
        for k, v in obj.items():
            try:
                out[k] = _host_copy(v, snapshot, old.get(k))
            except _Refused as err:
                err.path = f"[{k!r}]{err.path}"
                raise
        return out
    if type(obj) in (list, tuple):
        olds = into if type(into) is type(obj) and len(into) == len(obj) else (None,) * len(obj)
        items = []
        for i, v in enumerate(obj):
            try:
                items.append(_host_copy(v, snapshot, olds[i]))
            except _Refused as err:
                err.path = f"[{i}]{err.path}"
                raise
        return type(obj)(items)
    if isinstance(obj, _PLAIN) and type(obj).__module__ in ("builtins", "torch"):
        return obj
    raise _Refused(f"{type(obj).__module__}.{type(obj).__qualname__}")
