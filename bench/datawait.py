"""Section 5: how much of a step waits for the next batch, in the built-in pipelines as configured
(one process, the shipped configs' num_workers). The trainer's iterator is wrapped to time each
`next()`; a step is the interval between before_step timestamps. Nothing else changes.

Usage as a worker: python -m bench.datawait SPEC.json OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

from bench.common import Section, child_env, ratio_row, run_worker

PIPELINES = {
    "digits (default config)": {"config": None, "overrides": [], "steps": 150, "warmup": 10},
    "tiny_gpt (configs/tiny_gpt.yaml)": {"config": "configs/tiny_gpt.yaml",
                                         "overrides": ["scheduler.warmup_steps=5"], "steps": 30, "warmup": 5},
}  # fmt: skip


def _one_run(spec: dict[str, Any], run_dir: str) -> dict[str, float]:
    from bench.step_worker import load_cfg
    from disttrain.cluster import detect
    from disttrain.hooks import Hook
    from disttrain.trainer import Trainer

    waits: list[float] = []
    stamps: list[float] = []

    class Timed:
        def __init__(self, it: Any):
            self.it = it

        def __iter__(self) -> Any:
            return self

        def __next__(self) -> Any:
            t0 = time.perf_counter()
            batch = next(self.it)
            waits.append(time.perf_counter() - t0)
            return batch

    class Loader:
        def __init__(self, loader: Any):
            self.loader = loader

        def __iter__(self) -> Any:
            return Timed(iter(self.loader))

    class WaitTrainer(Trainer):
        def _train_loader(self) -> Any:
            return Loader(super()._train_loader())

    class Stamp(Hook):
        def before_step(self, trainer: Any) -> None:
            stamps.append(time.perf_counter())

    WaitTrainer(load_cfg(spec, run_dir), detect(), hooks=[Stamp()]).fit()
    w = spec["warmup"]
    steps = [b - a for a, b in zip(stamps[w:], stamps[w + 1 :])]
    return {"wait": sum(waits[w : w + len(steps)]) / len(steps), "step": sum(steps) / len(steps)}


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as root:
        for i in range(spec["reps"]):
            for name, p in spec["pipelines"].items():
                out.append(
                    {
                        "pipeline": name,
                        **_one_run({**p, "steps": p["steps"]}, os.path.join(root, f"r{i}{len(out)}")),
                    }
                )
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(out, fh)


def run(quick: bool) -> Section:
    sec = Section("data", "5. Data wait: time in next(batch) as a fraction of the step (one process, CPU)")
    spec = {"reps": 3 if quick else 5, "pipelines": PIPELINES}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        env = child_env(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
        runs = run_worker("bench.datawait", spec, tmp, env, timeout=600)
    for name in PIPELINES:
        mine = [r for r in runs if r["pipeline"] == name]
        waits, steps = [r["wait"] * 1e3 for r in mine], [r["step"] * 1e3 for r in mine]
        sec.rows.append(ratio_row(f"{name}: wait for the next batch per step vs the step", waits, steps, "ms",
                                  "<= 0.01", lambda r: r <= 0.01))  # fmt: skip
    sec.extra["runs"] = runs
    return sec


if __name__ == "__main__":
    main(*sys.argv[1:3])
