"""Shared pieces of the benchmark harness: statistics over interleaved repetitions, result rows,
machine facts, and launching a worker on N ranks over gloo (torchrun's environment, without torchrun's
agent process, so a launch costs only the interpreter start and the imports)."""

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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


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
    ratio: float  # median of the pairwise ratios value_i / baseline_i (or value / baseline)
    goal: str  # human text, e.g. "<= 1.01"
    met: bool | None  # None: no goal for this row (context only)
    spread: str  # e.g. "0.998-1.004 (n=6)"
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Section:
    """One section of RESULTS.md: a title, rows, free-text findings."""

    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # raw numbers for results.json
    seconds: float = 0.0


def ratio_row(
    figure: str,
    a: list[float],
    b: list[float],
    unit: str,
    goal: str,
    check: Any,
    scale: float = 1.0,
    note: str = "",
    invert: bool = False,
) -> Row:
    """A row from interleaved repetitions a (measured) and b (baseline). `check(ratio) -> bool`.
    `invert`: the ratio is b/a (throughput from times: raw time / disttrain time)."""
    rs = ratios(b, a) if invert else ratios(a, b)
    lo, hi = spread(rs)
    r = median(rs)
    return Row(
        figure=figure,
        value=median(a) * scale,
        baseline=median(b) * scale,
        unit=unit,
        ratio=r,
        goal=goal,
        met=None if check is None else bool(check(r)),
        spread=f"{lo:.3f}-{hi:.3f} (n={len(rs)})",
        note=note,
    )


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
        info[name] = _version(name)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = "unknown"
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


# ------------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for worker processes: one thread per rank (2 cores here), unbuffered, the repo on
    the path, and no inherited torchrun/SLURM variables."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS"):  # fmt: skip
        env.pop(key, None)
    env.update(extra)
    return env


def launch_ranks(module: str, spec: dict[str, Any], nproc: int, timeout: float = 600) -> list[dict[str, Any]]:
    """Run `python -m module SPEC.json OUT_r.json` on `nproc` ranks with torchrun's variables (env://
    rendezvous on loopback) and return each rank's JSON result, rank 0 first."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w", encoding="utf-8") as fh:
            json.dump(spec, fh)
        port = str(free_port())
        procs, outs = [], []
        for rank in range(nproc):
            out = os.path.join(tmp, f"out_{rank}.json")
            env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                            LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
            log = open(os.path.join(tmp, f"log_{rank}.txt"), "w", encoding="utf-8")  # noqa: SIM115
            procs.append((subprocess.Popen([sys.executable, "-m", module, spec_path, out], env=env, cwd=REPO,
                                           stdout=log, stderr=subprocess.STDOUT), log))  # fmt: skip
            outs.append(out)
        deadline = time.monotonic() + timeout
        codes = []
        for proc, log in procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
            log.close()
        if any(codes):
            logs = "".join(Path(tmp, f"log_{r}.txt").read_text()[-3000:] for r in range(nproc))
            raise RuntimeError(f"{module} failed on some rank (exit codes {codes}):\n{logs}")
        return [json.loads(Path(out).read_text()) for out in outs]


def run_worker(module: str, spec: dict[str, Any], folder: str, env: dict[str, str], timeout: float) -> Any:
    """Run `python -m MODULE SPEC OUT` in one process: the spec goes in as JSON, the result comes back as
    JSON. A worker that fails raises with the tail of its output."""
    name = module.rsplit(".", 1)[-1]
    spec_path, out_path = os.path.join(folder, f"{name}_spec.json"), os.path.join(folder, f"{name}_out.json")
    with open(spec_path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh)
    proc = subprocess.run([sys.executable, "-m", module, spec_path, out_path], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(out_path, encoding="utf-8") as fh:
        return json.load(fh)


def rss_now_mib() -> float:
    return _status_kib("VmRSS") / 1024


def rss_peak_mib() -> float:
    """This process's resident-set high-water mark (VmHWM; the same figure as ru_maxrss)."""
    return _status_kib("VmHWM") / 1024


def _status_kib(key: str) -> float:
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return float(line.split()[1])
    return float("nan")
