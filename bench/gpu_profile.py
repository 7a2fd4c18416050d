"""Where a GPU step's time goes, the Trainer against the plain loop: torch.profiler over a few steps of
configs/tiny_gpt_gpu.yaml, with the host-device syncs counted per step. A diagnostic that
bench/gpu_device.sh runs beside the GPU section, not a benchmark row.

    python -m bench.gpu_profile OUT_DIR          writes OUT_DIR/profile.txt
    python -m bench.gpu_profile OUT_DIR --smoke  the same on the CPU with a toy model (a harness check)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from bench.common import train_cfg
from bench.gpu import GPU_CONFIG, SMOKE_ARGS
from bench.plain import PlainLoop

WARMUP, ACTIVE = 4, 6
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
         "aten::item", "cudaMemcpyAsync", "cudaLaunchKernel", "cudaGraphLaunch")  # fmt: skip


def _profiler(cuda: bool, name: str, parts: list[str]) -> profile:
    """One cycle: WARMUP steps, then ACTIVE steps recorded; its summary is appended to `parts`."""
    return profile(
        activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])],
        schedule=schedule(wait=0, warmup=WARMUP, active=ACTIVE, repeat=1),
        on_trace_ready=lambda prof: parts.append(_summary(name, prof)),
    )


def _summary(name: str, prof: profile) -> str:
    avg = prof.key_averages()
    counts = {e.key: e.count / ACTIVE for e in avg if e.key in SYNCS}
    head = f"== {name}: per step over {ACTIVE} steps: " + ", ".join(
        f"{k} {v:g}" for k, v in sorted(counts.items())
    )
    return head + "\n" + avg.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)


def main(out_dir: str, smoke: bool = False) -> None:
    from disttrain.cluster import detect
    from disttrain.hooks import Hook
    from disttrain.trainer import build_trainer

    overrides = [
        "scheduler.warmup_steps=2",
        *(SMOKE_ARGS if smoke else []),
        f"trainer.cpu={str(smoke).lower()}",
    ]
    spec: dict[str, Any] = {"config": GPU_CONFIG, "steps": WARMUP + ACTIVE + 2, "overrides": overrides}
    parts: list[str] = []
    device = torch.device("cpu" if smoke else "cuda")
    with tempfile.TemporaryDirectory() as root:
        prof = _profiler(not smoke, "Trainer", parts)

        class Step(Hook):
            def before_step(self, trainer: Any) -> None:
                prof.step()

        with prof:
            trainer = build_trainer(train_cfg(spec, f"{root}/a"), detect(), hooks=[Step()])
            trainer.fit()
        del trainer
        loop = PlainLoop(train_cfg(spec, f"{root}/b"), device)
        prof = _profiler(not smoke, "plain loop", parts)
        with prof:
            for _ in range(spec["steps"]):
                prof.step()
                loop.step()
            if not smoke:
                torch.cuda.synchronize()
    Path(out_dir, "profile.txt").write_text("\n\n".join(parts) + "\n")
    print(*(part.splitlines()[0] for part in parts), sep="\n")


if __name__ == "__main__":
    main(sys.argv[1], smoke="--smoke" in sys.argv[2:])
