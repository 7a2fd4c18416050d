"""Sections 2 and 3: checkpoint save and load throughput against raw I/O of the same bytes on the same
storage, and how long an async save blocks the step against a sync save of the same state.

The state is what a model trained with AdamW checkpoints: weights (a third of the bytes, written as
safetensors) and two optimizer moments (two thirds, in state.pt), in float32 tensors of at most 64 MiB,
plus this process's RNG states. One process, no process group: the path rank 0 runs.

  local  a temporary directory on the disk /tmp is on. Raw write: every tensor's bytes into one file,
         fsync. Raw read: read that file. Before the reads, the checkpoint's files and the raw file are
         dropped from the page cache (posix_fadvise DONTNEED); the VM's host may still cache them.
  s3     a moto S3 server (a separate process) on loopback, through s3fs as a run on S3 uses it. Raw
         write: one s3fs `pipe` of the same bytes (already joined in memory); raw read: one `cat`.

Every save goes to a fresh run directory (no retention work); repetitions alternate A B A B.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from bench.common import Row, Section, free_port, ratio_row

MB = 10**6
CHUNK = 16 * 2**20  # floats per tensor: 64 MiB


def make_state(nbytes: int, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(app_state, rank_state) shaped as the trainer's, holding about `nbytes` of float32 tensors."""
    import torch

    from disttrain.state import capture_rank_state

    gen = torch.Generator().manual_seed(seed)
    per_part = max(1, nbytes // 3 // 4)  # floats in the weights, and in each Adam moment

    def tensors() -> list[Any]:
        sizes = [min(CHUNK, per_part - i) for i in range(0, per_part, CHUNK)]
        return [torch.rand(n, generator=gen) for n in sizes]

    weights, m1, m2 = tensors(), tensors(), tensors()
    state = {i: {"step": torch.tensor(1.0), "exp_avg": a, "exp_avg_sq": b}
             for i, (a, b) in enumerate(zip(m1, m2))}  # fmt: skip
    optimizer = {"state": state, "param_groups": [{"params": list(state), "lr": 1e-3, "betas": (0.9, 0.999),
                                                   "eps": 1e-8, "weight_decay": 0.0}]}  # fmt: skip
    app = {"model": {f"layer.{i}": t for i, t in enumerate(weights)}, "optimizer": optimizer,
           "scheduler": {"last_epoch": 1}, "scaler": None,
           "trainer": {"step": 1, "cursor": {"epoch": 0, "offset": 64}}, "hooks": {}}  # fmt: skip
    return app, {"rng": capture_rank_state(), "window_loss": 0.0}


def host_tensors(obj: Any) -> list[Any]:
    """Every tensor in a state, on the host (a GPU state is copied here, outside any timing)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj.detach().to("cpu")]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in host_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in host_tensors(v)]
    return []


def manager(run_dir: str, async_save: bool = False) -> Any:
    from disttrain.ckpt_write import CheckpointManager
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
    """The tensor's bytes without a copy (any dtype; a CPU tensor)."""
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


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server in its own process on loopback, s3fs pointed at it; yields a bucket prefix."""
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
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("moto server exited at start")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError("moto server did not start within 60 s")


# ------------------------------------------------------------------------------------ measurements


def _timed(fn: Any, *args: Any, **kwargs: Any) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


State = dict[str, Any]


def measure_io(app: State, ranks: State, reps: int, root: str, s3: Any = None) -> dict[str, list[float]]:
    """Sync save, raw write, load, raw read of the same state, `reps` rounds, under `root`: a local
    directory, or with `s3` (an s3fs filesystem) a prefix on it."""
    tensors = host_tensors(app)
    blob = b"".join(_bytes_view(t) for t in tensors) if s3 else b""
    out: dict[str, list[float]] = {"save": [], "raw_write": [], "load": [], "raw_read": []}
    for i in range(reps):
        run_dir, raw = f"{root}/run{i}", f"{root}/raw{i}.bin"
        mgr = manager(run_dir)
        out["save"].append(_timed(mgr.save, 1, app, ranks, sync=True))
        out["raw_write"].append(_timed(s3.pipe, raw, blob) if s3 else _timed(raw_write_local, raw, tensors))
        if not s3:
            drop_cache(run_dir)
            drop_cache(raw)
        out["load"].append(_timed(mgr.load, 1))
        out["raw_read"].append(_timed(s3.cat, raw) if s3 else _timed(raw_read_local, raw))
        if s3:
            s3.rm(run_dir, recursive=True)
            s3.rm(raw)
        else:
            shutil.rmtree(run_dir)
            os.unlink(raw)
    return out


def measure_async(app: State, ranks: State, reps: int, root: str) -> dict[str, list[float]]:
    """How long save(sync=False) blocks, and the whole async save, against a sync save; `reps` rounds."""
    out: dict[str, list[float]] = {"async_block": [], "async_total": [], "sync": []}
    for i in range(reps):
        mgr = manager(f"{root}/async{i}", async_save=True)
        t0 = time.perf_counter()
        mgr.save(1, app, ranks, sync=False)
        out["async_block"].append(time.perf_counter() - t0)
        mgr.wait()
        out["async_total"].append(time.perf_counter() - t0)
        out["sync"].append(_timed(manager(f"{root}/sync{i}").save, 1, app, ranks, sync=True))
        shutil.rmtree(f"{root}/async{i}")
        shutil.rmtree(f"{root}/sync{i}")
    return out


def io_rows(label: str, nbytes: float, m: dict[str, list[float]]) -> list[Row]:
    """Save vs raw write and load vs raw read, as throughputs (MB/s) of the same bytes."""
    mbps = {k: [nbytes / 1e6 / t for t in v] for k, v in m.items()}
    return [ratio_row(f"{label}: save (sync) vs raw write", mbps["save"], mbps["raw_write"], "MB/s", ">= 0.70",
                      lambda r: r >= 0.70),
            ratio_row(f"{label}: load vs raw read", mbps["load"], mbps["raw_read"], "MB/s", ">= 0.70",
                      lambda r: r >= 0.70)]  # fmt: skip


def async_row(label: str, m: dict[str, list[float]]) -> Row:
    ms = [t * 1e3 for t in m["async_block"]], [t * 1e3 for t in m["sync"]]
    return ratio_row(f"{label}: save() returns (async) vs sync save", *ms, "ms", "<= 0.05",
                     lambda r: r <= 0.05)  # fmt: skip


# ------------------------------------------------------------------------------------ sections


def _sizes(quick: bool) -> list[int]:
    return [10 * MB, 100 * MB] if quick else [10 * MB, 100 * MB, 1000 * MB]


def _mb(n: int) -> str:
    return f"{n // 10**9} GB" if n >= 10**9 else f"{n // MB} MB"


def run_write(quick: bool) -> Section:
    sec = Section("ckpt", "2. Checkpoint write and read: CheckpointManager vs raw I/O of the same bytes")
    reps = 2 if quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as root:
        for n in _sizes(quick):
            sec.extra[f"local_{n}"] = m = measure_io(*make_state(n), reps, root)
            sec.rows += io_rows(f"local {_mb(n)}", n, m)
    try:
        with moto_server() as prefix:
            import fsspec

            s3 = fsspec.filesystem("s3")
            for n in [10 * MB, 100 * MB]:
                sec.extra[f"s3_{n}"] = m = measure_io(*make_state(n), reps, f"{prefix}/n{n}", s3)
                sec.rows += io_rows(f"S3 (moto) {_mb(n)}", n, m)
    except (ImportError, RuntimeError) as err:
        sec.notes.append(f"S3 part not run: {err}")
    return sec


def run_async(quick: bool) -> Section:
    sec = Section("async", "3. Async save: time the step is blocked, vs a sync save of the same state")
    with tempfile.TemporaryDirectory(prefix="bench-async-") as root:
        for n in _sizes(quick):
            sec.extra[f"async_{n}"] = m = measure_async(*make_state(n), 3 if quick else 4, root)
            sec.rows.append(async_row(f"local {_mb(n)}", m))
    return sec
