"""Section 1: step time and memory of disttrain's Trainer (A) against the plain loop of bench/plain.py
(B), 2 ranks over gloo on the CPU.

Two launches per workload, each a fresh pair of processes training whole runs alternately, A B B A A B
... and B A A B B A ..., so neither variant always goes first; each adjacent (A, B) couple is one
repetition. A step is the interval between consecutive before-step timestamps (A: a hook's before_step,
the trainer otherwise unmodified), so it holds everything the loop does per step; the first `warmup`
steps and the trainer's end-of-run eval are left out. The first run of a launch is that variant's
memory figure (a fresh process). Every run's final weights are hashed: A and B must be bit-identical.

Worker: python -m bench.step SPEC.json OUT.json, on 2 ranks under bench.common.run_worker.
"""

from __future__ import annotations

import gc
import hashlib
import os
import statistics
import tempfile
import time
from typing import Any

from bench.common import Row, Section, median, ratio_row, rss_mib, run_worker, train_cfg, worker_main

WORKLOADS = {
    # tiny_gpt as configs/tiny_gpt.yaml ships it (2 layers, d_model 128, batch 32): ~40-90 ms a step here.
    "tiny_gpt": {
        "config": "configs/tiny_gpt.yaml",
        "overrides": ["scheduler.warmup_steps=5"],
        "full": (20, 5, 3),  # (timed steps, warmup steps, repetitions)
        "quick": (12, 3, 2),
    },
    # the default example (digits CNN, batch 64): ~3-6 ms a step, so fixed per-step costs show.
    "digits": {"config": None, "overrides": [], "full": (80, 10, 5), "quick": (40, 10, 3)},
}


def run(quick: bool) -> Section:
    sec = Section("step", "1. Step overhead: Trainer vs a plain torch DDP loop (2 ranks, gloo, CPU)")
    for name, wl in WORKLOADS.items():
        steps, warmup, reps = wl["quick" if quick else "full"]
        spec = {"config": wl["config"], "overrides": wl["overrides"], "steps": steps + warmup + 1,
                "warmup": warmup}  # fmt: skip
        launches = [run_worker("bench.step", {**spec, "order": _sequence(first, reps)}, nproc=2)
                    for first in "AB"]  # fmt: skip
        # rank 0's runs: rank 1 is in lockstep with it through the all-reduces
        couples = [c for ranks in launches for c in _couples(ranks[0]["runs"])]
        _time_rows(sec, name, couples, steps)
        _hash_row(sec, name, launches)
        _memory_rows(sec, name, launches)
    return sec


def _sequence(first: str, reps: int) -> list[str]:
    """reps couples, the order flipping each time: A B B A A B ... for first="A"."""
    other = "B" if first == "A" else "A"
    return [v for i in range(reps) for v in ((first, other) if i % 2 == 0 else (other, first))]


def _couples(runs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Adjacent runs two by two, as (A, B)."""
    return [(x, y) if x["variant"] == "A" else (y, x) for x, y in zip(runs[0::2], runs[1::2])]


def p10(xs: list[float]) -> float:
    """The 10th percentile of a run's step times: the step when nothing else got in the way. Contention
    on a shared machine only ever adds time, so this is the steadier per-run figure."""
    return sorted(xs)[int(0.1 * (len(xs) - 1))]


def _time_rows(sec: Section, name: str, couples: list[tuple[Any, Any]], steps: int) -> None:
    for label, stat in (("median", statistics.median), ("10th-percentile", p10)):
        a, b = [stat(x["times"]) for x, _ in couples], [stat(y["times"]) for _, y in couples]
        d = [(x - y) * 1e6 for x, y in zip(a, b)]
        note = f"{steps} timed steps a run; overhead {median(d):+.0f} us/step (range {min(d):+.0f} to {max(d):+.0f})"
        sec.rows.append(ratio_row(f"{name}: time per step (each run's {label} step)", a, b, "ms", "<= 1.01",
                                  lambda r: r <= 1.01, scale=1e3, note=note))  # fmt: skip
        sec.extra[f"{name}_{label}_ms"] = {"a": [x * 1e3 for x in a], "b": [y * 1e3 for y in b]}


def _hash_row(sec: Section, name: str, launches: list[list[dict[str, Any]]]) -> None:
    runs = [r for ranks in launches for rank in ranks for r in rank["runs"]]
    hashes = {r["sha256"] for r in runs}
    sec.rows.append(Row(f"{name}: final weights, sha256 of state_dict", len(hashes), 1, "distinct hashes",
                        float(len(hashes)), "1 (bit-identical)", len(hashes) == 1, f"{len(runs)} runs, both ranks",
                        note=", ".join(sorted(h[:12] for h in hashes))))  # fmt: skip


def _memory_rows(sec: Section, name: str, launches: list[list[dict[str, Any]]]) -> None:
    """From the first run of each launch, where the process was fresh."""
    first = {ranks[0]["runs"][0]["variant"]: ranks for ranks in launches}
    for rank in (0, 1):
        a, b = first["A"][rank], first["B"][rank]
        pa, pb = a["runs"][0]["peak_rss_mib"], b["runs"][0]["peak_rss_mib"]
        imports = a["rss_after_import_mib"] - b["rss_after_import_mib"]
        eval_extra = a["runs"][0]["peak_rss_end_mib"] - pa
        sec.rows.append(Row(f"{name}: peak RSS through the last step, rank {rank} (fresh process)", pa, pb, "MiB",
                            pa / pb, "<= +1 MiB", pa - pb <= 1.0, "n=1 per variant",
                            note=f"{pa - pb:+.1f} MiB: imports {imports:+.1f} MiB, building and training "
                                 f"{pa - pb - imports:+.1f} MiB; after the trainer's end-of-run eval "
                                 f"{eval_extra:+.1f} MiB more"))  # fmt: skip


# ------------------------------------------------------------------------------------ worker side


def weights_sha256(model: Any) -> str:
    """sha256 over the state_dict's names and raw tensor bytes, in order."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_trainer(cfg: Any, stamp: Any) -> Any:
    """Variant A: `Trainer(cfg, detect(), hooks=[stamp]).fit()`; returns the trained model."""
    from disttrain.cluster import detect
    from disttrain.hooks import Hook
    from disttrain.trainer import Trainer

    class Stamp(Hook):
        def before_step(self, trainer: Any) -> None:
            stamp()

    trainer = Trainer(cfg, detect(), hooks=[Stamp()])
    trainer.fit()
    return trainer.module


def run_plain(cfg: Any, stamp: Any) -> Any:
    """Variant B: the plain loop, stamped at the same point of each step; returns the trained model."""
    import torch
    import torch.distributed as tdist

    from bench.plain import PlainLoop

    if not tdist.is_initialized():  # when B runs first; the trainer (accelerate) reuses the group
        tdist.init_process_group("gloo")
    loop = PlainLoop(cfg, torch.device("cpu"))
    for _ in range(cfg.trainer.max_steps):
        stamp()
        loop.step()
    return loop.model


def run_variant(variant: str, spec: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """One whole run. `peak_rss_mib`: the process's RSS high-water mark when the last step starts, so
    before the trainer's end-of-run eval (which the plain loop does not have)."""
    cfg = train_cfg(spec, run_dir)
    stamps: list[float] = []
    peak: list[float] = []

    def stamp() -> None:
        stamps.append(time.perf_counter())
        if len(stamps) == cfg.trainer.max_steps:
            peak.append(rss_mib("VmHWM"))

    model = (run_trainer if variant == "A" else run_plain)(cfg, stamp)
    digest = weights_sha256(model)
    del model
    gc.collect()
    w = spec["warmup"]
    return {"variant": variant, "times": [b - a for a, b in zip(stamps[w:], stamps[w + 1 :])], "sha256": digest,
            "peak_rss_mib": peak[0], "peak_rss_end_mib": rss_mib("VmHWM")}  # fmt: skip


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Whole runs in spec["order"]. Must run on all ranks."""
    # Import what the first variant imports before measuring RSS: the memory rows split off the imports.
    if spec["order"][0] == "A":
        import disttrain.trainer  # noqa: F401
    else:
        import bench.plain  # noqa: F401
    import torch.distributed as tdist

    result: dict[str, Any] = {"rss_after_import_mib": rss_mib(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-step-") as root:
        for i, variant in enumerate(spec["order"]):
            result["runs"].append(run_variant(variant, spec, os.path.join(root, f"{variant}{i}")))
    tdist.barrier()  # no rank tears the group down while another still trains
    tdist.destroy_process_group()
    return result


if __name__ == "__main__":
    worker_main(worker)
