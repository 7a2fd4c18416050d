"""What a save costs the run, sync against async: `python -m bench.savecost`.

An async save returns sooner, but the write then competes with the next steps for the cores and the
memory bandwidth; what matters is the time the run loses, not how fast save() returns. Two ranks
(torchrun, gloo) train tiny_gpt made big enough for a ~130 MB checkpoint for 40 steps, three ways,
interleaved: no periodic save, a sync save every 5 steps, an async save every 5 steps. The loop's time
(the `ready` event to the `finish` event) minus the no-save run's, over the 8 saves, is the cost of one
save to the run; the checkpoint events' seconds are how long save() blocked.

Results: the `savecost` section of bench/RESULTS.md (bench/sections.py), raw numbers in
bench/RESULTS_savecost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO, child_env, free_port, machine_info, median, spread
from bench.resume import MODEL
from bench.sections import replace_section
from disttrain import events as ev

STEPS, EVERY = 40, 5
VARIANTS = {
    "none": ("checkpoint.every_steps=0",),
    "sync": (f"checkpoint.every_steps={EVERY}",),
    "async": (f"checkpoint.every_steps={EVERY}", "checkpoint.async_save=true"),
}


def one_run(run_dir: Path, variant: str) -> dict[str, float]:
    args = [*MODEL, f"run_dir={run_dir}", f"trainer.max_steps={STEPS}", "checkpoint.save_final=false",
            *VARIANTS[variant]]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "disttrain.main", *args]  # fmt: skip
    proc = subprocess.run(cmd, env=child_env(1), cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    at = {e["event"]: e["time"] for e in events if ev.kind(e) in (ev.READY, ev.FINISH)}
    blocked = [e["seconds"] for e in events if ev.kind(e) == ev.CHECKPOINT]
    return {"loop_s": at[ev.FINISH] - at[ev.READY], "blocked_s": sum(blocked), "saves": len(blocked)}


def report(runs: dict[str, list[dict[str, float]]], info: dict[str, Any], command: str) -> str:
    none = [r["loop_s"] for r in runs["none"]]
    lines = [
        "## What a save costs the run: sync vs async (issue 13)", "",
        f"`{command}`, {info['date']}: {info['nproc']} CPUs ({info['cpu_model']}; load average "
        f"{'/'.join(f'{x:.2f}' for x in info['load_avg_at_start'])} at start, "
        f"{'/'.join(f'{x:.2f}' for x in info['load_avg_at_end'])} at end), commit {info['git_commit']}. "
        f"2 ranks, tiny_gpt (bench/resume.py's size, ~130 MB checkpoint), {STEPS} steps, a save every {EVERY}; "
        f"{len(none)} interleaved repetitions, medians (min-max).", "",
        "| save | save() blocked per save | cost to the run per save (loop time - no-save loop time) |",
        "| --- | --- | --- |",
    ]  # fmt: skip
    for variant in ("sync", "async"):
        n = runs[variant][0]["saves"] or 1
        blocked = [r["blocked_s"] / n for r in runs[variant]]
        cost = [(r["loop_s"] - b) / n for r, b in zip(runs[variant], none)]
        lines.append(f"| {variant} | {median(blocked):.3f} s ({spread(blocked)[0]:.3f}-{spread(blocked)[1]:.3f}) | "
                     f"{median(cost):.3f} s ({spread(cost)[0]:.3f}-{spread(cost)[1]:.3f}) |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.savecost", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = p.parse_args(argv)
    command = "python -m bench.savecost" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    info = machine_info()
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-savecost-") as tmp:
        for i in range(args.reps):
            order = list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]
            for variant in order:
                runs[variant].append(one_run(Path(tmp) / f"{variant}_{i}", variant))
                print(f"[savecost] {variant} rep {i}: {runs[variant][-1]}", flush=True)
    info["load_avg_at_end"] = os.getloadavg()
    replace_section(args.out, "savecost", report(runs, info, command))
    raw = {"command": command, "machine": info, "runs": runs}
    Path(args.out).with_name("RESULTS_savecost.json").write_text(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
