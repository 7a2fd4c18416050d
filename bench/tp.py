"""Tensor parallel (issue 22): model-state memory per rank and step time at tp=2 against ddp and fsdp,
2 ranks over gloo on the CPU, the same tiny_gpt as section 7 (d_model 384, 4 layers).

`python -m bench.tp [--quick]` writes its own section of bench/RESULTS.md (between the `tp` markers).

- Model states per rank (parameters + gradients + optimizer state this rank holds after a step, counted
  from the local pieces of its DTensors): a count, the same on any machine and load. Goal: tp=2 at most
  0.55x of ddp.
- Time per step, interleaved launches (ddp, fsdp, tp, tp, fsdp, ddp, ...): a report, not a goal. On CPU
  over gloo every tensor-parallel block adds activation all-reduces (forward and backward) that a GPU's
  NVLink hides and loopback TCP does not; tp is for models whose layers do not fit one device.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.common import REPO, Section, machine_info, ratio_row, run_worker
from bench.fsdp import MODEL
from bench.sections import write_owned

LAYOUTS = {
    "ddp": ["trainer.strategy=ddp"],
    "fsdp": ["trainer.strategy=fsdp"],
    "tp": ["trainer.strategy=fsdp", "parallel.tp=2"],
}


def _spec(name: str) -> dict[str, Any]:
    return {"config": "configs/tiny_gpt.yaml", "steps": 8, "saves": 0, "strategy": name,
            "overrides": [*MODEL, "pipeline.args.d_model=384", *LAYOUTS[name]]}  # fmt: skip


def run(quick: bool) -> Section:
    sec = Section("tp", "Tensor parallel (tp=2) against ddp and fsdp: memory and step (2 ranks, gloo, CPU)")
    reps = 1 if quick else 2
    names = list(LAYOUTS)
    order = [n for i in range(reps) for n in (names if i % 2 == 0 else names[::-1])]
    runs = [run_worker("bench.fsdp", _spec(name), nproc=2)[0] for name in order]
    by = {n: [r for r in runs if r["strategy"] == n] for n in names}
    mib = {n: [r["state_bytes"] / 2**20 for r in by[n]] for n in names}
    sec.rows.append(ratio_row("model states per rank, tp=2 vs ddp", mib["tp"], mib["ddp"], "MiB", "<= 0.55",
                              lambda r: r <= 0.55))  # fmt: skip
    sec.rows.append(
        ratio_row("model states per rank, tp=2 vs fsdp", mib["tp"], mib["fsdp"], "MiB", "report", None)
    )
    steps = {n: [r["step_s"] for r in by[n]] for n in names}
    for base in ("ddp", "fsdp"):
        sec.rows.append(ratio_row(f"time per step, tp=2 vs {base}", steps["tp"], steps[base], "ms", "report", None,
                                  scale=1e3, note="every tp block all-reduces activations over loopback gloo (bench/tp.py)"))  # fmt: skip
    sec.extra["runs"] = runs
    return sec


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tp")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = p.parse_args()
    info, t0 = machine_info(), time.time()
    sec = run(args.quick)
    command = f"python -m bench.tp{' --quick' if args.quick else ''}"
    note = " Memory is a count of bytes and does not depend on load; step times do."
    write_owned(args.out, sec, info, command, time.time() - t0, note)


if __name__ == "__main__":
    main()
