"""Shared pieces of the harness: statistics over interleaved repetitions, result rows, machine facts,
the benchmark's run config, and running a worker module in fresh processes."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ statistics


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> tuple[float, float]:
    """(min, max) of the repetitions: with 3-8 repetitions the range is the honest spread."""
    return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))


def ratios(a: list[float], b: list[float]) -> list[float]:
    """Pairwise a_i / b_i of interleaved repetitions (A_i and B_i ran back to back)."""
    return [x / y for x, y in zip(a, b) if y]


@dataclass
class Row:
    """One figure of a results table: the measured value against its same-run baseline."""

    figure: str
    value: float  # median of the repetitions
    baseline: float  # median of the baseline's repetitions
    unit: str
    ratio: float  # median of the pairwise ratios value_i / baseline_i
    goal: str  # human text, e.g. "<= 1.01"
    met: bool | None  # None: no goal for this row (context only)
    spread: str  # e.g. "0.998-1.004 (n=6)"
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Section:
    """One section of RESULTS.md: a title, rows, one-line facts."""

    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # raw numbers for the .json
    seconds: float = 0.0


def ratio_row(figure: str, a: list[float], b: list[float], unit: str, goal: str, check: Any,
              scale: float = 1.0, note: str = "") -> Row:  # fmt: skip
    """A row from interleaved repetitions a (measured) and b (baseline); `check(ratio) -> bool` or None."""
    rs = ratios(a, b)
    lo, hi = spread(rs)
    return Row(figure, median(a) * scale, median(b) * scale, unit, median(rs), goal,
               None if check is None else bool(check(median(rs))), f"{lo:.3f}-{hi:.3f} (n={len(rs)})", note)  # fmt: skip


# ------------------------------------------------------------------------------------ machine


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host_cpus": os.cpu_count(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_avg_at_start": os.getloadavg(),
    }
    for name in ("accelerate", "safetensors", "s3fs", "moto", "numpy"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = "not installed"
    if torch.cuda.is_available():
        info["gpu"], info["cuda"] = torch.cuda.get_device_name(0), torch.version.cuda
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    info["git_commit"] = git.stdout.strip() or "unknown"
    return info


def _cpu_model() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------ runs


def train_cfg(spec: dict[str, Any], run_dir: str) -> Any:
    """The config of a timed run: spec's config file and overrides, `steps` steps, and nothing due
    inside the run (no eval, logging, checkpoint or progress output) so that a step is only training."""
    from disttrain.config import load_config

    quiet = [
        f"run_dir={run_dir}", f"trainer.max_steps={spec['steps']}", "trainer.eval_every=0",
        f"trainer.log_every={10**9}", "trainer.progress=none", "checkpoint.every_steps=0",
        "checkpoint.save_final=false", "log.plot=false", "log.console=false", "resume=never",
    ]  # fmt: skip
    return load_config(spec.get("config"), [*spec.get("overrides", []), *quiet])


def rss_mib(key: str = "VmRSS") -> float:
    """This process's resident set now (VmRSS) or its high-water mark (VmHWM, as ru_maxrss)."""
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int = 1, **extra: str) -> dict[str, str]:
    """Environment for a worker: `threads` per process (2 cores here: one per rank when there are two),
    unbuffered, the repo on the path, and no inherited torchrun/SLURM variables."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               WANDB_MODE="offline")  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS"):  # fmt: skip
        env.pop(key, None)
    env.update(extra)
    return env


def run_worker(module: str, spec: dict[str, Any], nproc: int = 1, threads: int = 1,
               timeout: float = 600, env: dict[str, str] | None = None) -> list[Any]:  # fmt: skip
    """Run `python -m MODULE SPEC.json OUT.json` in `nproc` fresh processes and return each one's JSON
    result, rank 0 first. With nproc > 1 they get torchrun's variables (env:// rendezvous on loopback)
    without torchrun's agent process, so a launch costs only the interpreter start and the imports."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w", encoding="utf-8") as fh:
            json.dump(spec, fh)
        port, procs = str(free_port()), []
        for rank in range(nproc):
            ranks = {} if nproc == 1 else dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                                               LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
            log = open(os.path.join(tmp, f"log_{rank}.txt"), "w", encoding="utf-8")  # noqa: SIM115
            cmd = [sys.executable, "-m", module, spec_path, os.path.join(tmp, f"out_{rank}.json")]
            procs.append(subprocess.Popen(cmd, env=child_env(threads, **ranks, **(env or {})), cwd=REPO, stdout=log,
                                          stderr=subprocess.STDOUT))  # fmt: skip
            log.close()  # the child holds its own copy
        codes = _wait_all(procs, time.monotonic() + timeout)
        if any(codes):
            logs = "".join(Path(tmp, f"log_{r}.txt").read_text()[-3000:] for r in range(nproc))
            raise RuntimeError(f"{module} failed (exit codes {codes}):\n{logs}")
        return [json.loads(Path(tmp, f"out_{r}.json").read_text()) for r in range(nproc)]


def _wait_all(procs: list[subprocess.Popen], deadline: float) -> list[int]:
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes


def worker_main(fn: Any) -> None:
    """The worker side of run_worker: `fn(spec) -> result`, from and to the JSON files on argv."""
    with open(sys.argv[1], encoding="utf-8") as fh:
        spec = json.load(fh)
    result = fn(spec)
    with open(sys.argv[2], "w", encoding="utf-8") as fh:
        json.dump(result, fh)
