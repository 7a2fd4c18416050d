"""What the local checkpoint tier costs a run: `python -m bench.localtier`.

One process (CPU), the Trainer built and fitted in a worker process (bench.common.run_worker), three
ways, interleaved in every repetition: the local tier off, a local piece every step, and one every 20
steps (a setting a user would pick). Two models: tiny_gpt as shipped (configs/tiny_gpt.yaml) and
tiny_gpt widened to ~25M parameters (8 layers, d_model 512; ~300 MB of weights and AdamW state).

- Step time: the fitted loop's seconds over its steps (the first steps, warm-up, excluded: timed from
  the step after WARMUP to the last), local tier on vs off. Goal (issue 20): <= 1.02 at every step.
- Time the step blocks: LocalTier.save measured in the run, call by call (the host copy of the state,
  plus any wait for the previous piece's background write), against a plain copy of the same tensors
  into preallocated buffers in the same process afterwards: the physical floor of taking a snapshot on
  a CPU. Goal: <= 1.2x. The wait for the previous write is given on its own.

The local folder is under /dev/shm (tmpfs, the default). Results: the `localtier` section of
bench/RESULTS.md, raw numbers in bench/RESULTS_localtier.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, machine_info, median, run_worker, spread, worker_main
from bench.sections import replace_section

WARMUP = 5
MODELS = {
    "tiny_gpt": (("trainer.max_steps=120",), "configs/tiny_gpt.yaml as shipped"),
    "tiny_gpt ~25M": (
        ("pipeline.args.n_layer=8", "pipeline.args.d_model=512", "pipeline.args.n_head=8", "data.batch_size=4",
         "trainer.max_steps=40"),
        "8 layers, d_model 512, batch 4",
    ),
}  # fmt: skip
COMMON = ("trainer.eval_every=0", "trainer.log_every=10", "trainer.progress=none", "log.plot=false",
          "checkpoint.every_steps=0", "checkpoint.save_final=false", "scheduler.warmup_steps=0")  # fmt: skip
VARIANTS = {"off": 0, "every step": 1, "every 20 steps": 20}


def run(reps: int, out: Path) -> dict[str, Any]:
    info = machine_info()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {m: {v: [] for v in VARIANTS} for m in MODELS}
    with tempfile.TemporaryDirectory(prefix="bench-localtier-") as root:
        for rep in range(reps):
            for model, (overrides, _) in MODELS.items():
                order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
                for variant in order:
                    spec = {"overrides": [*COMMON, *overrides], "every": VARIANTS[variant],
                            "root": root, "name": f"{len(os.listdir(root))}"}  # fmt: skip
                    [result] = run_worker("bench.localtier", spec, threads=2, timeout=900)
                    results[model][variant].append(result)
                    print(f"rep {rep} {model} {variant}: {result['step_s'] * 1e3:.1f} ms/step", flush=True)
    info["load_avg_at_end"] = list(os.getloadavg())
    data = {"info": info, "reps": reps, "results": results}
    (out.parent / "RESULTS_localtier.json").write_text(json.dumps(data, indent=1))
    replace_section(out, "localtier", report(data))
    return data


def report(data: dict[str, Any]) -> str:
    info = data["info"]
    lines = [
        "## Local checkpoint tier: what it costs the step (issue 20)", "",
        f"`python -m bench.localtier --reps {data['reps']}` on {info['date']}: {info['nproc']} CPUs "
        f"({info['cpu_model']}), load average {'/'.join(f'{x:.2f}' for x in info['load_avg_at_start'])} at start, "
        f"{'/'.join(f'{x:.2f}' for x in info['load_avg_at_end'])} at end, commit {info['git_commit']}, torch "
        f"{info['torch']}. One process, 2 threads; the local folder on /dev/shm; the variants interleaved in "
        "each repetition; medians, (min-max) of the per-repetition ratios.", "",
        "| model | state | local tier | step | vs off | goal | blocked per save | plain copy | blocked vs copy | goal | of which waiting for the previous write |",  # noqa: E501
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for model, (_, what) in MODELS.items():
        runs = data["results"][model]
        off = [r["step_s"] for r in runs["off"]]
        for variant in VARIANTS:
            mine = runs[variant]
            state = f"{median([r['state_bytes'] for r in mine]) / 1e6:.0f} MB"
            if variant == "off":
                lines.append(
                    f"| {model} ({what}) | {state} | off | {median(off) * 1e3:.1f} ms | 1 (baseline) | | | | | | |"
                )
                continue
            steps = [r["step_s"] for r in mine]
            rs = [a / b for a, b in zip(steps, off)]
            lo, hi = spread(rs)
            goal = "<= 1.02" if variant == "every step" else "(context)"
            met = f"**{'met' if median(rs) <= 1.02 else 'missed'}**" if variant == "every step" else ""
            blocked = [r["blocked_s"] for r in mine]
            copy = [r["copy_s"] for r in mine]
            br = [a / b for a, b in zip(blocked, copy)]
            blo, bhi = spread(br)
            bmet = f"<= 1.2: **{'met' if median(br) <= 1.2 else 'missed'}**"
            waited = median([r["waited_s"] for r in mine])
            lines.append(
                f"| {model} | {state} | {variant} | {median(steps) * 1e3:.1f} ms | {median(rs):.3f} "
                f"({lo:.3f}-{hi:.3f}) | {goal} {met} | {median(blocked) * 1e3:.1f} ms | {median(copy) * 1e3:.1f} ms "
                f"| {median(br):.2f} ({blo:.2f}-{bhi:.2f}) | {bmet} | {waited * 1e3:.1f} ms |"
            )  # fmt: skip
    lines += [
        "",
        "*blocked per save*: LocalTier.save's time in the training thread, median over a run's saves "
        "(the host copy, plus waiting for the previous piece's write and peer trade to finish); *plain "
        "copy*: `dst.copy_(src)` of the same tensors into buffers allocated beforehand, median of 5; "
        "*waiting*: the part of the block spent joining the previous write (a piece written every step "
        "on 2 cores: its write and sha256 compete with the step for the same cores).",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ worker side


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build and fit the Trainer with LocalTier.save timed call by call; then time a plain copy of the
    last saved state."""
    import torch

    from disttrain import local_tier
    from disttrain.cluster import detect
    from disttrain.config import load_config
    from disttrain.hooks import Hook
    from disttrain.trainer import build_trainer

    run_dir = os.path.join(spec["root"], f"run{spec['name']}")
    local = os.path.join("/dev/shm", f"bench-localtier-{os.getpid()}")
    overrides = [*spec["overrides"], f"run_dir={run_dir}", f"checkpoint.local.every_steps={spec['every']}",
                 f"checkpoint.local.dir={local}"]  # fmt: skip
    cfg = load_config(str(REPO / "configs/tiny_gpt.yaml"), overrides)
    blocked: list[float] = []
    waited: list[float] = []
    last: list[Any] = []
    save, join = local_tier.LocalTier.save, local_tier.LocalTier._join

    def timed_save(self: Any, step: int, shared: Any, mine: Any, shards: Any) -> None:
        t0 = time.perf_counter()
        save(self, step, shared, mine, shards)
        blocked.append(time.perf_counter() - t0)
        last[:] = [shared, mine]

    def timed_join(self: Any) -> None:
        t0 = time.perf_counter()
        join(self)
        waited.append(time.perf_counter() - t0)

    local_tier.LocalTier.save = timed_save  # type: ignore[method-assign]
    local_tier.LocalTier._join = timed_join  # type: ignore[method-assign]
    stamps: list[float] = []

    class Stamp(Hook):
        def after_step(self, loop: Any) -> None:
            stamps.append(time.perf_counter())

    try:
        trainer = build_trainer(cfg, detect(), hooks=[Stamp()])
        trainer.fit()
    finally:
        shutil.rmtree(local, ignore_errors=True)
    steps = len(stamps) - 1 - WARMUP
    out: dict[str, Any] = {"step_s": (stamps[-1] - stamps[WARMUP]) / steps, "steps": steps}
    model = trainer.strategy.module
    tensors = [t for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
    for group in trainer.strategy.optimizer.state_dict()["state"].values():
        tensors += [t for t in group.values() if isinstance(t, torch.Tensor)]
    out["state_bytes"] = sum(t.numel() * t.element_size() for t in tensors)
    buffers = [torch.empty_like(t) for t in tensors]
    copies = []
    for _ in range(5):
        t0 = time.perf_counter()
        for dst, src in zip(buffers, tensors):
            dst.copy_(src)
        copies.append(time.perf_counter() - t0)
    out["copy_s"] = median(copies)
    # The first save also starts the tier (folders, first tidy): steady state is what a run pays.
    out["blocked_s"] = median(blocked[1:]) if len(blocked) > 1 else float("nan")
    # Joins from save() only (one per save, first); the final wait at the end is not a step's.
    out["waited_s"] = median(waited[1 : len(blocked)]) if len(blocked) > 1 else float("nan")
    out["saves"] = len(blocked)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    run(args.reps, Path(args.out))


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1].endswith(".json"):
        worker_main(worker)
    else:
        main()
