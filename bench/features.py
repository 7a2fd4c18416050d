"""Section 7: what trainer.compile and trainer.activation_checkpointing do to tiny_gpt on the CPU.

  compile  configs/tiny_gpt.yaml on 2 ranks (DDP over gloo): whole runs alternated, eager and
           `trainer.compile=true` (inductor, default mode), in one pair of processes; time per step
           after the warm-up, and the first step of the first compiled run (where compilation happens)
           against an eager step. The compiled model computes in fused kernels, so its weights are
           close to, not bitwise, the eager ones: the largest difference is reported.
  ac       tiny_gpt with long windows (4 layers, d_model 128, block 256, batch 16), one process per
           run so that each run's peak RSS is its own: activation checkpointing on and off,
           alternated; peak RSS through the last step and time per step. The weights must be bitwise
           the same (recomputation replays dropout's RNG).

Worker: python -m bench.features SPEC.json OUT.json
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

from bench.common import Row, Section, median, ratio_row, rss_mib, run_worker, train_cfg, worker_main

COMPILE = {"config": "configs/tiny_gpt.yaml", "overrides": ["scheduler.warmup_steps=5"]}
AC = {"config": "configs/tiny_gpt.yaml", "overrides": [
    "scheduler.warmup_steps=2", "pipeline.args.n_layer=4", "pipeline.args.block_size=256", "data.batch_size=16",
    "pipeline.args.dropout=0.1"]}  # fmt: skip


def run(quick: bool) -> Section:
    sec = Section("features", "9. torch.compile and activation checkpointing on tiny_gpt (CPU)")
    steps, warmup, reps = (8, 3, 1) if quick else (20, 5, 2)
    spec = {**COMPILE, "steps": steps + warmup + 1, "warmup": warmup, "order": ["eager", "compiled"] * reps}
    [out, _] = run_worker("bench.features", {**spec, "what": "compile"}, nproc=2, timeout=1800)
    _compile_rows(sec, out, steps)
    runs = [run_worker("bench.features", {**AC, "steps": (3 if quick else 6) + 3, "warmup": 2, "what": "ac",
                                          "ac": on}, threads=2)[0]
            for _ in range(1 if quick else 2) for on in (False, True)]  # fmt: skip
    _ac_rows(sec, runs)
    return sec


def _compile_rows(sec: Section, out: dict[str, Any], steps: int) -> None:
    runs = out["runs"]
    eager = [r["step_s"] for r in runs if r["variant"] == "eager"]
    compiled = [r["step_s"] for r in runs if r["variant"] == "compiled"]
    sec.rows.append(ratio_row("tiny_gpt, 2 ranks: time per step, trainer.compile=true vs eager", compiled, eager,
                              "ms", "(context)", None, scale=1e3, note=f"{steps} timed steps a run, median step"))  # fmt: skip
    first = next(r for r in runs if r["variant"] == "compiled")["first_s"]
    sec.rows.append(Row("tiny_gpt, 2 ranks: the first compiled step (compilation) vs an eager step", first,
                        median(eager), "s", first / median(eager), "(context)", None, "n=1",
                        note="inductor's compile time, paid once per process"))  # fmt: skip
    sec.notes.append(f"compiled vs eager final weights: largest absolute difference {out['max_diff']:.2e}")


def _ac_rows(sec: Section, runs: list[dict[str, Any]]) -> None:
    on = [r for r in runs if r["ac"]]
    off = [r for r in runs if not r["ac"]]
    peak_on, peak_off = [r["peak_rss_mib"] for r in on], [r["peak_rss_mib"] for r in off]
    sec.rows.append(ratio_row("tiny_gpt block 256: peak RSS, activation checkpointing vs without", peak_on, peak_off,
                              "MiB", "< 1.0", lambda r: r < 1.0,
                              note=f"saves {median(peak_off) - median(peak_on):.0f} MiB of the "
                                   f"{median(peak_off) - median([r['rss_first_step_mib'] for r in off]):.0f} MiB "
                                   "that training steps added to the built model"))  # fmt: skip
    sec.rows.append(ratio_row("tiny_gpt block 256: time per step, activation checkpointing vs without",
                              [r["step_s"] for r in on], [r["step_s"] for r in off], "ms", "(context)", None,
                              scale=1e3, note="the blocks' forward runs twice"))  # fmt: skip
    same = len({r["sha256"] for r in runs}) == 1
    sec.rows.append(Row("tiny_gpt block 256: final weights with and without activation checkpointing",
                        float(len({r['sha256'] for r in runs})), 1.0, "distinct hashes", 1.0 if same else 0.0,
                        "1 (bit-identical)", same, f"{len(runs)} runs"))  # fmt: skip


# ------------------------------------------------------------------------------------ worker side


def _run(spec: dict[str, Any], run_dir: str, overrides: list[str]) -> tuple[Any, list[float], list[float]]:
    """A Trainer run; its step times, and the RSS high-water mark when the first and the last step start
    (the difference is what training, mostly activations, added to the built model)."""
    from bench.step import run_trainer

    cfg = train_cfg({**spec, "overrides": [*spec["overrides"], *overrides]}, run_dir)
    stamps: list[float] = []
    peaks: list[float] = []

    def stamp() -> None:
        stamps.append(time.perf_counter())
        if len(stamps) in (1, cfg.trainer.max_steps):
            peaks.append(rss_mib("VmHWM"))

    trainer = run_trainer(cfg, stamp)
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    return trainer, times, peaks


def worker(spec: dict[str, Any]) -> dict[str, Any]:

    from bench.step import weights_sha256

    out: dict[str, Any] = {"runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-features-") as root:
        if spec["what"] == "ac":
            trainer, times, (first, last) = _run(
                spec, os.path.join(root, "run"), [f"trainer.activation_checkpointing={spec['ac']}"]
            )
            return {"ac": spec["ac"], "peak_rss_mib": last, "rss_first_step_mib": first,
                    "sha256": weights_sha256(trainer.module), "step_s": statistics.median(times[spec["warmup"] :])}  # fmt: skip
        weights = {}
        for i, variant in enumerate(spec["order"]):
            trainer, times, _ = _run(
                spec, os.path.join(root, str(i)), [f"trainer.compile={variant == 'compiled'}"]
            )
            weights[variant] = {k: v.clone() for k, v in trainer.module.state_dict().items()}
            out["runs"].append(
                {
                    "variant": variant,
                    "first_s": times[0],
                    "step_s": statistics.median(times[spec["warmup"] :]),
                }
            )
            trainer.close()
        out["max_diff"] = max(
            (weights["eager"][k] - weights["compiled"][k]).abs().max().item() for k in weights["eager"]
        )
    import torch.distributed as tdist

    tdist.barrier()
    tdist.destroy_process_group()
    return out


if __name__ == "__main__":
    worker_main(worker)
