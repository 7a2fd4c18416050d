"""Sections 2 and 3: checkpoint write and read throughput against raw I/O of the same bytes on the same
storage, and how long an async save blocks the step against a sync save of the same state.

The state is what a model trained with AdamW checkpoints: weights (a third of the bytes, written as
safetensors) and two optimizer moments (two thirds, in state.pt), in float32 tensors of at most 64 MiB,
plus this process's RNG states. One process, no process group: the same code path rank 0 runs.

  local  a temporary directory on the disk /tmp is on. Raw write: open, write every tensor's bytes,
         fsync, close (one file). Raw read: read that file. Before every read, both the checkpoint's
         files and the raw file are dropped from the page cache (posix_fadvise DONTNEED); the VM's host
         may still cache them.
  s3     a moto S3 server (a separate process) on loopback, through s3fs as a run on S3 uses it. Raw
         write: one s3fs `pipe` of the same bytes (already joined in memory); raw read: one `cat`.

Every save goes to a fresh run directory (no retention work), and repetitions alternate A B A B.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from bench.common import Section, free_port, ratio_row

MB = 10**6
CHUNK = 16 * 2**20  # floats per tensor: 64 MiB


def make_state(nbytes: int, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    from disttrain.checkpoint import capture_rank_state

    gen = torch.Generator().manual_seed(seed)
    per_part = max(1, nbytes // 3 // 4)  # floats in the weights, and in each Adam moment

    def tensors(prefix: str) -> dict[str, Any]:
        out, left, i = {}, per_part, 0
        while left > 0:
            n = min(CHUNK, left)
            out[f"{prefix}.{i}"] = torch.rand(n, generator=gen)
            left, i = left - n, i + 1
        return out

    model = tensors("layer")
    m1, m2 = tensors("m"), tensors("v")
    state = {i: {"step": torch.tensor(1.0), "exp_avg": a, "exp_avg_sq": b}
             for i, (a, b) in enumerate(zip(m1.values(), m2.values()))}  # fmt: skip
    optimizer = {"state": state, "param_groups": [{"params": list(state), "lr": 1e-3, "betas": (0.9, 0.999),
                                                   "eps": 1e-8, "weight_decay": 0.0}]}  # fmt: skip
    app = {"model": model, "optimizer": optimizer, "scheduler": {"last_epoch": 1}, "scaler": None,
           "trainer": {"step": 1, "cursor": {"epoch": 0, "offset": 64}}, "hooks": {}}  # fmt: skip
    return app, {"rng": capture_rank_state(), "window_loss": 0.0}


def state_tensors(app: dict[str, Any]) -> list[Any]:
    out = list(app["model"].values())
    for s in app["optimizer"]["state"].values():
        out += [s["exp_avg"], s["exp_avg_sq"]]
    return out


def state_bytes(app: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state_tensors(app))


def manager(run_dir: str, async_save: bool = False) -> Any:
    from disttrain.checkpoint import CheckpointManager
    from disttrain.config import CheckpointConfig

    return CheckpointManager(run_dir, CheckpointConfig(every_steps=0, keep_last=3, async_save=async_save))


def drop_cache(path: str) -> None:
    """Evict a file (or every file under a directory) from the page cache."""
    files = [path] if os.path.isfile(path) else [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _bytes_view(t: Any) -> memoryview:
    """The tensor's bytes without a copy (any dtype; the tensor must be contiguous and on the CPU)."""
    import torch

    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def raw_write_local(path: str, tensors: list[Any]) -> None:
    with open(path, "wb") as fh:
        for t in tensors:
            fh.write(_bytes_view(t))
        fh.flush()
        os.fsync(fh.fileno())


def raw_read_local(path: str) -> int:
    with open(path, "rb") as fh:
        return len(fh.read())


# ------------------------------------------------------------------------------------ S3 server


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server in its own process on loopback; yields the bucket URL prefix."""
    import fsspec
    import s3fs

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _wait_port(port, proc)
        s3fs.S3FileSystem.clear_instance_cache()
        fsspec.filesystem("s3").mkdir("bench")
        yield "s3://bench"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        proc.terminate()
        proc.wait(timeout=30)


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    import socket

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("moto server exited at start")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError("moto server did not start within 60 s")


# ------------------------------------------------------------------------------------ measurements


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_local(nbytes: int, reps: int, root: str) -> dict[str, list[float]]:
    app, ranks = make_state(nbytes)
    tensors = state_tensors(app)
    out: dict[str, list[float]] = {"save": [], "raw_write": [], "load": [], "raw_read": []}
    for i in range(reps):
        run_dir, raw = os.path.join(root, f"run{i}"), os.path.join(root, f"raw{i}.bin")
        mgr = manager(run_dir)
        out["save"].append(_timed(lambda: mgr.save(1, app, ranks, sync=True)))  # noqa: B023
        out["raw_write"].append(_timed(lambda: raw_write_local(raw, tensors)))  # noqa: B023
        drop_cache(run_dir)
        out["load"].append(_timed(lambda: mgr.load(1)))  # noqa: B023
        drop_cache(raw)
        out["raw_read"].append(_timed(lambda: raw_read_local(raw)))  # noqa: B023
        shutil.rmtree(run_dir)
        os.unlink(raw)
    return out


def measure_s3(nbytes: int, reps: int, prefix: str) -> dict[str, list[float]]:
    import fsspec

    s3 = fsspec.filesystem("s3")
    app, ranks = make_state(nbytes)
    blob = b"".join(_bytes_view(t) for t in state_tensors(app))
    out: dict[str, list[float]] = {"save": [], "raw_write": [], "load": [], "raw_read": []}
    for i in range(reps):
        run_dir, raw = f"{prefix}/n{nbytes}/run{i}", f"{prefix}/n{nbytes}/raw{i}.bin"
        mgr = manager(run_dir)
        out["save"].append(_timed(lambda: mgr.save(1, app, ranks, sync=True)))  # noqa: B023
        out["raw_write"].append(_timed(lambda: s3.pipe(raw, blob)))  # noqa: B023
        out["load"].append(_timed(lambda: mgr.load(1)))  # noqa: B023
        out["raw_read"].append(_timed(lambda: s3.cat(raw)))  # noqa: B023
        s3.rm(f"{prefix}/n{nbytes}", recursive=True)
    return out


def measure_async(nbytes: int, reps: int, root: str) -> dict[str, list[float]]:
    app, ranks = make_state(nbytes)
    out: dict[str, list[float]] = {"async_block": [], "sync": [], "async_total": []}
    for i in range(reps):
        mgr = manager(os.path.join(root, f"async{i}"), async_save=True)
        t0 = time.perf_counter()
        mgr.save(1, app, ranks, sync=False)
        out["async_block"].append(time.perf_counter() - t0)
        mgr.wait()
        out["async_total"].append(time.perf_counter() - t0)
        sync_mgr = manager(os.path.join(root, f"sync{i}"))
        out["sync"].append(_timed(lambda: sync_mgr.save(1, app, ranks, sync=True)))  # noqa: B023
        shutil.rmtree(os.path.join(root, f"async{i}"))
        shutil.rmtree(os.path.join(root, f"sync{i}"))
    return out


# ------------------------------------------------------------------------------------ sections


def _mb(n: int) -> str:
    return f"{n // 10**9} GB" if n >= 10**9 else f"{n // MB} MB"


def _throughput_rows(sec: Section, where: str, n: int, m: dict[str, list[float]]) -> None:
    mbps = [n / MB / t for t in m["save"]], [n / MB / t for t in m["raw_write"]]
    sec.rows.append(ratio_row(f"{where} {_mb(n)}: save (sync) vs raw write", *mbps, "MB/s", ">= 0.70",
                              lambda r: r >= 0.70))  # fmt: skip
    mbps = [n / MB / t for t in m["load"]], [n / MB / t for t in m["raw_read"]]
    sec.rows.append(ratio_row(f"{where} {_mb(n)}: load vs raw read", *mbps, "MB/s", ">= 0.70",
                              lambda r: r >= 0.70))  # fmt: skip


def run_write(quick: bool, sizes: list[int] | None = None) -> Section:
    sec = Section("ckpt", "2. Checkpoint write and read: CheckpointManager vs raw I/O of the same bytes")
    reps = 2 if quick else 3
    local = sizes or ([10 * MB, 100 * MB] if quick else [10 * MB, 100 * MB, 1000 * MB])
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as root:
        for n in local:
            m = measure_local(n, reps, root)
            _throughput_rows(sec, "local", n, m)
            sec.extra[f"local_{n}"] = m
    try:
        with moto_server() as prefix:
            for n in [10 * MB, 100 * MB] if sizes is None else sizes:
                m = measure_s3(n, reps, prefix)
                _throughput_rows(sec, "S3 (moto)", n, m)
                sec.extra[f"s3_{n}"] = m
    except (ImportError, RuntimeError) as err:
        sec.notes.append(f"S3 part not run: {err}")
    return sec


def run_async(quick: bool, sizes: list[int] | None = None) -> Section:
    sec = Section("async", "3. Async save: time the step is blocked, vs a sync save of the same state")
    reps = 3 if quick else 4
    with tempfile.TemporaryDirectory(prefix="bench-async-") as root:
        for n in sizes or ([10 * MB, 100 * MB] if quick else [10 * MB, 100 * MB, 1000 * MB]):
            m = measure_async(n, reps, root)
            ms = [t * 1e3 for t in m["async_block"]], [t * 1e3 for t in m["sync"]]
            sec.rows.append(ratio_row(f"local {_mb(n)}: save() returns (async) vs sync save", *ms, "ms",
                                      "<= 0.05", lambda r: r <= 0.05))  # fmt: skip
            sec.extra[f"async_{n}"] = m
    return sec
