"""Section 5: how much of a step waits for its batch, in the built-in pipelines as configured (one
process, the shipped configs' num_workers). A hook's before_step stamps the step's start and the
configured pipeline, wrapped, stamps each loss() call; the wait is the time between the two: the
loader's next(), plus the loop's bookkeeping before the forward (~25 us on this machine). The step is
the interval between before_step stamps. The trainer and the loader are untouched.

Worker: python -m bench.datawait SPEC.json OUT.json
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from bench.common import Section, ratio_row, run_worker, train_cfg, worker_main
from disttrain.config import PipelineConfig
from disttrain.pipelines import Pipeline, load_pipeline

PIPELINES = {
    "digits (default config)": {"config": None, "overrides": [], "steps": 150, "warmup": 10},
    "tiny_gpt (configs/tiny_gpt.yaml)": {"config": "configs/tiny_gpt.yaml",
                                         "overrides": ["scheduler.warmup_steps=5"], "steps": 30, "warmup": 5},
}  # fmt: skip
LOSS_CALLS: list[float] = []  # perf_counter() at each TimedLoss.loss call, in this process


def run(quick: bool) -> Section:
    sec = Section("data", "5. Data wait: step start to loss() (mostly next(batch)) vs the step, one process")
    [runs] = run_worker("bench.datawait", {"reps": 3 if quick else 5, "pipelines": PIPELINES}, threads=2)
    for name in PIPELINES:
        mine = [r for r in runs if r["pipeline"] == name]
        waits, steps = [r["wait"] * 1e3 for r in mine], [r["step"] * 1e3 for r in mine]
        sec.rows.append(ratio_row(f"{name}: step start to loss() vs the step", waits, steps, "ms",
                                  "<= 0.01", lambda r: r <= 0.01))  # fmt: skip
    sec.extra["runs"] = runs
    return sec


class TimedLoss(Pipeline):
    """Builds the pipeline named by `inner` with the other args and returns *it*, with its loss() stamped:
    every other method (num_tokens, flops_per_sample, shard_units, ...) is the inner pipeline's own, so
    the trainer measures exactly what the configured pipeline costs (a forwarding wrapper would have to
    keep up with the Pipeline interface, and hide which methods the inner one overrides)."""

    def __new__(cls, inner: str, **args: Any) -> Any:  # type: ignore[misc]
        pipeline = load_pipeline(PipelineConfig(target=inner, args=args))
        loss = pipeline.loss

        def stamped(model: Any, batch: Any) -> Any:
            LOSS_CALLS.append(time.perf_counter())
            return loss(model, batch)

        pipeline.loss = stamped  # type: ignore[method-assign]
        return pipeline


def one_run(spec: dict[str, Any], run_dir: str) -> dict[str, float]:
    from disttrain.cluster import detect
    from disttrain.hooks import Hook
    from disttrain.trainer import build_trainer

    starts: list[float] = []

    class Stamp(Hook):
        def before_step(self, trainer: Any) -> None:
            starts.append(time.perf_counter())

    cfg = train_cfg(spec, run_dir)
    cfg.pipeline.args = {"inner": cfg.pipeline.target, **cfg.pipeline.args}
    cfg.pipeline.target = "bench.datawait:TimedLoss"
    LOSS_CALLS.clear()
    build_trainer(cfg, detect(), hooks=[Stamp()]).fit()
    w, n = spec["warmup"], len(starts) - 1 - spec["warmup"]  # grad_accum 1: one loss() per step
    waits = [c - s for s, c in zip(starts[w : w + n], LOSS_CALLS[w : w + n])]
    return {"wait": sum(waits) / n, "step": (starts[-1] - starts[w]) / n}


def worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """reps rounds, each one run of every pipeline (interleaved)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as root:
        for i in range(spec["reps"]):
            for name, p in spec["pipelines"].items():
                out.append({"pipeline": name, **one_run(p, os.path.join(root, f"r{i}_{len(out)}"))})
    return out


if __name__ == "__main__":
    # Under -m this file is __main__; the trainer imports bench.datawait for TimedLoss, a second copy with
    # its own LOSS_CALLS. Run the worker from that copy, so it reads the stamps TimedLoss writes.
    from bench.datawait import worker as imported_worker

    worker_main(imported_worker)
