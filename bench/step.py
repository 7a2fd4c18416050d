"""Section 1: step time and memory of disttrain's Trainer against the loops a user would otherwise
write, 2 ranks over gloo on the CPU; and what the Trainer's own per-step machinery costs.

Variants, each a whole run:
  A  the Trainer, as shipped
  B  the plain torch DDP loop of bench/plain.py (the same math: weights bit-identical to A)
  C  the plain accelerate loop of bench/plain.py (accelerate's documented loop, same math)
  G  the Trainer without the non-finite guard (trainer.nonfinite=off): A/G is the guard's cost
  M  the Trainer without the train-metrics accumulation (grad norm, tokens, loss window): A/M is its cost
  E  the Trainer with the stop agreement exchanged at every step boundary (interval 0): what the 0.1 s
     cadence saves

Two launches per workload, each a fresh pair of processes running whole runs in groups of one run per
variant, the order rotating from group to group (and reversed in the second launch), so no variant
always runs first; each group is one repetition and every ratio pairs runs of the same group. A step
is the interval between consecutive before-step timestamps (a hook's before_step; the loops stamp the
same point), so it holds everything the loop does per step; the first `warmup` steps and the
trainer's end-of-run eval are left out. The first run of a launch is that variant's memory figure.
Every run's final weights are hashed: all variants must be bit-identical.

After the timed runs, one instrumented Trainer run per launch times the guard's, the metrics' and the
stop agreement's calls one by one (rank 0): their cost per step without the noise of whole runs.

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
        "goal": 1.01,
    },
    # the default example (digits CNN, batch 64): ~3-6 ms a step, so fixed per-step costs show.
    "digits": {"config": None, "overrides": [], "full": (80, 10, 5), "quick": (40, 10, 3), "goal": 1.03},
}
VARIANTS = "ABCGME"
ORDERS = ("ABCGME", "BEMGCA")  # the two launches: each starts with the variant whose fresh memory is measured
BASELINES = {  # row label, the other variant, goal (ratio of A to it), per workload
    "B": ("vs the plain torch DDP loop", None),
    "C": ("vs the plain accelerate loop", 1.0),
    "G": ("the non-finite guard's cost: vs trainer.nonfinite=off", 1.005),
    "M": ("the train metrics' cost: vs no metrics accumulation", 1.005),
    "E": ("stop agreement every 0.1 s vs at every step boundary", None),
}


def run(quick: bool) -> Section:
    sec = Section(
        "step", "1. Step overhead: Trainer vs plain loops, and its own per-step costs (2 ranks, gloo, CPU)"
    )
    for name, wl in WORKLOADS.items():
        steps, warmup, reps = wl["quick" if quick else "full"]
        spec = {"config": wl["config"], "overrides": wl["overrides"], "steps": steps + warmup + 1,
                "warmup": warmup}  # fmt: skip
        launches = [
            run_worker("bench.step", {**spec, "order": _sequence(order, reps)}, nproc=2) for order in ORDERS
        ]
        # rank 0's runs: rank 1 is in lockstep with it through the all-reduces
        groups = [g for ranks in launches for g in _groups(ranks[0]["runs"], len(VARIANTS))]
        _time_rows(sec, name, groups, steps, wl["goal"])
        _hash_row(sec, name, launches)
        _memory_rows(sec, name, launches)
        _component_rows(sec, name, launches)
    return sec


def _sequence(variants: str, reps: int) -> list[str]:
    """reps groups of one run per variant, each group's order rotated by one from the previous group's."""
    return [v for i in range(reps) for v in variants[i % len(variants) :] + variants[: i % len(variants)]]


def _groups(runs: list[dict[str, Any]], size: int) -> list[dict[str, dict[str, Any]]]:
    """Consecutive runs `size` by `size`, each group as {variant: run}."""
    return [{r["variant"]: r for r in runs[i : i + size]} for i in range(0, len(runs) - size + 1, size)]


def p10(xs: list[float]) -> float:
    """The 10th percentile of a run's step times: the step when nothing else got in the way. Contention
    on a shared machine only ever adds time, so this is the steadier per-run figure."""
    return sorted(xs)[int(0.1 * (len(xs) - 1))]


# How a run's step times become one figure: (label, which times, statistic). The CPU time of rank 0's
# training thread is the steadiest on a machine other jobs share: contention there stretches wall time
# (waiting for a core, for the other rank), much less the work a step does on its own thread.
STATS = (("median step", "times", statistics.median), ("10th-percentile step", "times", lambda xs: p10(xs)),
         ("CPU time of rank 0's training thread, 10th percentile", "cpu", lambda xs: p10(xs)))  # fmt: skip


def _time_rows(sec: Section, name: str, groups: list[dict[str, Any]], steps: int, goal: float) -> None:
    for label, key, stat in STATS:
        a = [stat(g["A"][key]) for g in groups]
        for other, (what, ratio_goal) in BASELINES.items():
            b = [stat(g[other][key]) for g in groups]
            d = [(x - y) * 1e6 for x, y in zip(a, b)]
            wanted = goal if ratio_goal is None and other == "B" else ratio_goal
            text = "(context)" if wanted is None else (f"< {wanted}" if other == "C" else f"<= {wanted}")
            check = None if wanted is None else (lambda r, w=wanted, o=other: r < w if o == "C" else r <= w)
            note = f"{steps} timed steps a run; difference {median(d):+.0f} us/step (range {min(d):+.0f} to {max(d):+.0f})"
            sec.rows.append(
                ratio_row(f"{name}: {label}, {what}", a, b, "ms", text, check, scale=1e3, note=note)
            )
        sec.extra[f"{name}_{label}_ms"] = {v: [stat(g[v][key]) * 1e3 for g in groups] for v in VARIANTS}


def _hash_row(sec: Section, name: str, launches: list[list[dict[str, Any]]]) -> None:
    runs = [r for ranks in launches for rank in ranks for r in rank["runs"]]
    hashes = {r["sha256"] for r in runs}
    sec.rows.append(Row(f"{name}: final weights, sha256 of state_dict", len(hashes), 1, "distinct hashes",
                        float(len(hashes)), "1 (bit-identical)", len(hashes) == 1, f"{len(runs)} runs, both ranks",
                        note=", ".join(sorted(h[:12] for h in hashes))))  # fmt: skip


def _memory_rows(sec: Section, name: str, launches: list[list[dict[str, Any]]]) -> None:
    """From the first run of each launch, where the process was fresh: A (launch 1) and B (launch 2)."""
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


def _component_rows(sec: Section, name: str, launches: list[list[dict[str, Any]]]) -> None:
    """The instrumented runs: each part's time per step against the stock Trainer's median step."""
    parts = [ranks[0]["components"] for ranks in launches]
    step = median([p["step_s"] for p in parts])
    for key, what in (("guard", "the non-finite guard's calls (fold + bad_step)"),
                      ("metrics", "the train metrics' calls (micro_batch + step_done)"),
                      ("agreement", "the stop agreement (poll, plus each exchange's cost spread over the steps)")):  # fmt: skip
        us = [p[key] * 1e6 for p in parts]
        note = f"{', '.join(f'{u:.1f}' for u in us)} us"
        if key == "agreement":
            note += "; exchanges " + ", ".join(f"{p['exchanges']} in {p['steps']} steps" for p in parts)
        sec.rows.append(Row(f"{name}: {what}, per step, measured call by call", median(us), step * 1e6, "us",
                            median(us) / (step * 1e6), "<= 0.005", median(us) / (step * 1e6) <= 0.005,
                            f"n={len(us)} launches", note=note))  # fmt: skip


# ------------------------------------------------------------------------------------ worker side


def weights_sha256(model: Any) -> str:
    """sha256 over the state_dict's names and raw tensor bytes, in order."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class NoMetrics:
    """Variant M's stand-in for the Trainer's StepMetrics: the per-step accumulation removed (nothing is
    logged in a timed run, so `reduce` is never called). The section marks stay: they are the loop's."""

    def __init__(self, sections: Any) -> None:
        self.sections = sections

    def micro_batch(self, loss: Any, batch: Any) -> None:
        pass

    def step_done(self, applied: bool, norm: Any) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def reduce(self, world: int) -> tuple[dict[str, float], list[list[float]]]:  # the end-of-run log line
        return {"train/samples_per_sec": 0.0}, []


def _setup(variant: str, trainer: Any) -> None:
    """What makes G, M and E differ from A, applied to a built Trainer."""
    if variant == "M":
        trainer.log.window = NoMetrics(trainer.log.window.sections)
    elif variant == "E":
        trainer.stop.agreement.interval_s = 0.0


def run_trainer(cfg: Any, stamp: Any, variant: str = "A", hooks: list[Any] | None = None) -> Any:
    """Variants A, G, M, E: `build_trainer(cfg, detect(), hooks=[stamp]).fit()`; returns the trainer."""
    from disttrain.cluster import detect
    from disttrain.hooks import Hook
    from disttrain.trainer import build_trainer

    class Stamp(Hook):
        def before_step(self, trainer: Any) -> None:
            stamp()

    if variant == "G":
        cfg.trainer.nonfinite = "off"
    trainer = build_trainer(cfg, detect(), hooks=[Stamp(), *(hooks or [])])
    _setup(variant, trainer)
    trainer.fit()
    return trainer


def run_loop(cfg: Any, stamp: Any, variant: str) -> Any:
    """Variants B (plain torch) and C (plain accelerate), stamped at the same point of each step."""
    import torch
    import torch.distributed as tdist

    from bench.plain import AccelerateLoop, PlainLoop

    if not tdist.is_initialized():  # when a loop runs first; the trainer (accelerate) reuses the group
        tdist.init_process_group("gloo")
    loop = (PlainLoop if variant == "B" else AccelerateLoop)(cfg, torch.device("cpu"))
    for _ in range(cfg.trainer.max_steps):
        stamp()
        loop.step()
    return loop.model


def run_variant(variant: str, spec: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """One whole run. `peak_rss_mib`: the process's RSS high-water mark when the last step starts, so
    before the trainer's end-of-run eval (which the plain loops do not have)."""
    cfg = train_cfg(spec, run_dir)
    stamps: list[float] = []
    cpu: list[float] = []
    peak: list[float] = []

    def stamp() -> None:
        stamps.append(time.perf_counter())
        cpu.append(time.thread_time())
        if len(stamps) == cfg.trainer.max_steps:
            peak.append(rss_mib("VmHWM"))

    if variant in "BC":
        model = run_loop(cfg, stamp, variant)
    else:
        trainer = run_trainer(cfg, stamp, variant)
        model = trainer.module
        trainer.close()
    digest = weights_sha256(model)
    del model
    gc.collect()
    w = spec["warmup"]
    return {"variant": variant, "times": [b - a for a, b in zip(stamps[w:], stamps[w + 1 :])],
            "cpu": [b - a for a, b in zip(cpu[w:], cpu[w + 1 :])], "sha256": digest,
            "peak_rss_mib": peak[0], "peak_rss_end_mib": rss_mib("VmHWM")}  # fmt: skip


def components(spec: dict[str, Any], run_dir: str) -> dict[str, float]:
    """One stock Trainer run whose guard, metrics and agreement calls are timed one by one: each one's
    median time per step (the median over steps keeps a preemption of the process out of the figure),
    and the median step. Must run on all ranks."""
    from disttrain.hooks import Hook

    spent: dict[str, dict[int, float]] = {"guard": {}, "metrics": {}, "agreement": {}, "exchange": {}}
    stamps: list[float] = []

    class Instrument(Hook):
        def before_train(self, trainer: Any) -> None:
            agreement = trainer.stop.agreement
            for key, obj, names in (("guard", trainer.guard, ("fold", "bad_step")),
                                    ("metrics", trainer.log.window, ("micro_batch", "step_done")),
                                    ("agreement", agreement, ("poll",)),
                                    ("exchange", agreement, ("_start", "_take"))):  # fmt: skip
                for name in names:
                    setattr(obj, name, _timed(getattr(obj, name), spent[key], trainer))

    cfg = train_cfg(spec, run_dir)
    trainer = run_trainer(cfg, lambda: stamps.append(time.perf_counter()), "A", hooks=[Instrument()])
    trainer.close()
    w = spec["warmup"]
    times = [b - a for a, b in zip(stamps[w:], stamps[w + 1 :])]
    steps = range(w, cfg.trainer.max_steps)
    exchanges = [v for s, v in spent.pop("exchange").items() if s in steps]
    out = {k: statistics.median(v.get(s, 0.0) for s in steps) for k, v in spent.items()}
    # An exchange (start one all-reduce, read the previous) happens at a few boundaries only: its own
    # median cost, spread over the steps between exchanges.
    out["agreement"] += statistics.median(exchanges) * len(exchanges) / len(steps) if exchanges else 0.0
    return {**out, "step_s": statistics.median(times), "exchanges": len(exchanges), "steps": len(steps)}


def _timed(fn: Any, spent: dict[int, float], trainer: Any) -> Any:
    """fn, adding each call's wall time to the total of the step it runs in."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[trainer.step] = spent.get(trainer.step, 0.0) + time.perf_counter() - t0

    return timed


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Whole runs in spec["order"], then the instrumented run. Must run on all ranks."""
    # Import what the first variant imports before measuring RSS: the memory rows split off the imports.
    if spec["order"][0] in "BC":
        import bench.plain  # noqa: F401
    else:
        import disttrain.trainer  # noqa: F401
    import torch.distributed as tdist

    result: dict[str, Any] = {"rss_after_import_mib": rss_mib(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-step-") as root:
        for i, variant in enumerate(spec["order"]):
            result["runs"].append(run_variant(variant, spec, os.path.join(root, f"{variant}{i}")))
        result["components"] = components(spec, os.path.join(root, "instrumented"))
    tdist.barrier()  # no rank tears the group down while another still trains
    tdist.destroy_process_group()
    return result


if __name__ == "__main__":
    worker_main(worker)
