"""Section 7: sharded training (trainer.strategy=fsdp) against replicated (ddp), 2 ranks over gloo on
the CPU, the same tiny_gpt and config otherwise.

- Model-state memory per rank: bytes of parameters + gradients + optimizer state this rank holds after
  a step (gradients are as large as the parameters they belong to; counted from the parameters).
- The largest tiny_gpt each strategy trains under a per-rank cap on the process's peak RSS: a ladder of
  widths (8 layers), each trained for a few steps in a fresh pair of processes; the cap sits a fixed
  budget above the smallest model's peak (what torch and the data cost alone). glibc keeps freed heap
  memory and reuses it imperfectly, so RSS would track the allocator's history more than live tensors:
  the ladder runs with a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_), which returns every large
  buffer to the OS when freed, for both strategies alike.
- Step time, interleaved launches (ddp, fsdp, fsdp, ddp, ...): CPU/gloo moves data differently from
  NCCL (all-gather + reduce-scatter instead of one all-reduce), so this is a report, not a goal.
- Save time of a sync checkpoint (every rank writes its shard vs rank 0 writes the whole state) and how
  long an async save blocks the step against a sync save of the same state.

Worker: python -m bench.fsdp SPEC.json OUT.json, on 2 ranks under bench.common.run_worker.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

from bench.common import Row, Section, median, ratio_row, rss_mib, run_worker, train_cfg, worker_main

MODEL = [
    "pipeline.args.n_layer=4",
    "pipeline.args.n_head=4",
    "pipeline.args.block_size=64",
    "data.batch_size=16",
    "scheduler.warmup_steps=0",
]
WIDTHS = (128, 256, 384, 512, 640, 768)  # d_model of the memory ladder, 8 layers
LADDER = ["pipeline.args.n_layer=8", "data.batch_size=8"]
CAP_ABOVE_SMALLEST_MIB = 500  # the per-rank budget for model states and activations, above the baseline
LIVE_RSS = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run(quick: bool) -> Section:
    sec = Section("fsdp", "7. Sharded (fsdp) vs replicated (ddp) training, 2 ranks over gloo, CPU")
    reps = 2 if quick else 3
    order = [s for i in range(reps) for s in (("ddp", "fsdp") if i % 2 == 0 else ("fsdp", "ddp"))]
    runs = [
        run_worker("bench.fsdp", _spec(strategy, 384, steps=8, saves=3), nproc=2)[0] for strategy in order
    ]
    by = {s: [r for r in runs if r["strategy"] == s] for s in ("ddp", "fsdp")}
    _state_row(sec, by)
    _pairs_row(sec, by, "step_s", "tiny_gpt d_model 384: time per step, fsdp vs ddp", "ms", None, "report")
    _pairs_row(sec, by, "save_s", "sync checkpoint save: every rank its shard vs rank 0 everything", "s",
               lambda r: r < 1.0, "< 1 (faster)")  # fmt: skip
    blocked = [r["async_blocked_s"] / r["save_s"] for r in by["fsdp"]]
    sec.rows.append(Row("fsdp async save: time the step is blocked vs a sync save", median([r["async_blocked_s"] for r in by["fsdp"]]),
                        median([r["save_s"] for r in by["fsdp"]]), "s", median(blocked), "<= 0.05",
                        median(blocked) <= 0.05, f"{min(blocked):.3f}-{max(blocked):.3f} (n={len(blocked)})"))  # fmt: skip
    _ladder_rows(sec, quick)
    return sec


def _spec(strategy: str, width: int, steps: int, saves: int) -> dict[str, Any]:
    return {"config": "configs/tiny_gpt.yaml", "steps": steps, "saves": saves, "strategy": strategy,
            "overrides": [*MODEL, f"pipeline.args.d_model={width}", f"trainer.strategy={strategy}"]}  # fmt: skip


def _state_row(sec: Section, by: dict[str, list[dict[str, Any]]]) -> None:
    a, b = [r["state_bytes"] / 2**20 for r in by["fsdp"]], [r["state_bytes"] / 2**20 for r in by["ddp"]]
    sec.rows.append(ratio_row("model states (params + grads + optimizer) per rank, fsdp vs ddp", a, b, "MiB",
                              "<= 0.55", lambda r: r <= 0.55))  # fmt: skip


def _pairs_row(sec: Section, by: dict[str, list[dict[str, Any]]], key: str, figure: str, unit: str, check: Any,
               goal: str) -> None:  # fmt: skip
    a, b = [r[key] for r in by["fsdp"]], [r[key] for r in by["ddp"]]
    scale = 1e3 if unit == "ms" else 1.0
    sec.rows.append(ratio_row(figure, a, b, unit, goal, check, scale=scale))


def _ladder_rows(sec: Section, quick: bool) -> None:
    widths = WIDTHS[:4] if quick else WIDTHS
    peaks: dict[str, dict[int, float]] = {"ddp": {}, "fsdp": {}}
    params: dict[int, int] = {}
    for width in widths:
        for strategy in ("ddp", "fsdp"):
            spec = _spec(strategy, width, steps=3, saves=0)
            spec["overrides"] += LADDER
            ranks = run_worker("bench.fsdp", spec, nproc=2, env=LIVE_RSS)
            peaks[strategy][width] = max(r["peak_rss_mib"] for r in ranks)
            params[width] = ranks[0]["params"]
    cap = min(peaks["ddp"][widths[0]], peaks["fsdp"][widths[0]]) + CAP_ABOVE_SMALLEST_MIB
    largest = {s: max((w for w in widths if peaks[s][w] <= cap), default=widths[0]) for s in peaks}
    ratio = params[largest["fsdp"]] / params[largest["ddp"]]
    sec.rows.append(Row(f"largest tiny_gpt under a per-rank peak RSS cap of {cap:.0f} MiB: parameters, fsdp vs ddp",
                        params[largest["fsdp"]] / 1e6, params[largest["ddp"]] / 1e6, "M params", ratio, ">= 1.8",
                        ratio >= 1.8, "one run per size and strategy",
                        note=f"d_model fsdp {largest['fsdp']}, ddp {largest['ddp']}; ladder {list(widths)}"))  # fmt: skip
    sec.notes.append(
        "peak RSS per rank (MiB) by d_model: "
        + "; ".join(
            f"{w}: ddp {peaks['ddp'][w]:.0f}, fsdp {peaks['fsdp'][w]:.0f} ({params[w] / 1e6:.1f}M params)"
            for w in widths
        )
    )
    sec.extra["ladder"] = {"peaks": peaks, "params": params, "cap_mib": cap}


# ------------------------------------------------------------------------------------ worker side


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train spec["steps"] steps, then measure model-state bytes and save times. Must run on all ranks."""
    from disttrain import dist
    from disttrain.cluster import detect
    from disttrain.hooks import Hook
    from disttrain.trainer import build_trainer

    stamps: list[float] = []

    class Stamp(Hook):
        def before_step(self, trainer: Any) -> None:
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as root:
        trainer = build_trainer(train_cfg(spec, root), detect(), hooks=[Stamp()])
        trainer.fit()
        out = {"strategy": spec["strategy"], "peak_rss_mib": rss_mib("VmHWM"), "state_bytes": _state_bytes(trainer),
               "params": sum(p.numel() for p in trainer.module.parameters())}  # fmt: skip
        steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
        out["step_s"] = statistics.median(steps) if steps else float("nan")
        if spec["saves"]:
            out.update(_save_times(trainer, spec["saves"]))
        trainer.close()
    dist.destroy()
    return out


def _state_bytes(trainer: Any) -> int:
    """Bytes of this rank's parameters, their gradients (parameter-sized) and optimizer state."""

    def local(t: Any) -> int:  # a DTensor's own piece, whatever its placements (fsdp, tp, both)
        part = t.to_local() if hasattr(t, "to_local") else t
        return part.numel() * part.element_size()

    params = sum(local(p) for p in trainer.module.parameters())
    state = sum(
        local(v) for s in trainer.strategy.optimizer.state.values() for v in s.values() if hasattr(v, "numel")
    )
    return 2 * params + state


def _save_times(trainer: Any, n: int) -> dict[str, float]:
    """Median seconds of n sync saves, and of how long n async saves block the step (each then waited
    for before the next); both timings include building the state to save, as a periodic save does."""
    sync, blocked = [], []
    for background in [False, True] * n:
        trainer.progress.step += 1  # a new step each time, as in training
        manager = trainer.checkpointing.manager
        manager.cfg.async_save = background
        t0 = time.perf_counter()
        shared, mine, shards = trainer.checkpointing.capture()
        manager.save(trainer.step, shared, mine, shards=shards)
        (blocked if background else sync).append(time.perf_counter() - t0)
        manager.wait()
    return {"save_s": statistics.median(sync), "async_blocked_s": statistics.median(blocked)}


if __name__ == "__main__":
    worker_main(worker)
