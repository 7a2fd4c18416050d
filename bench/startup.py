"""Start-up and exit of a segment, before and after: `python -m bench.startup [--baseline REV]`.

The same runs of `python -m disttrain.main`, once with the disttrain of commit REV (extracted with `git
archive`, default: the commit this branch started from) and once with the working tree, interleaved
(A B B A ...), with each tree's defaults (what a user of each gets):

- fresh: one process, an empty run dir, digits, 30 steps;
- resume: two ranks under torchrun, from a step-20 checkpoint the same tree wrote, to step 30.

Timed from outside, the same way for both trees: from just before the process is spawned to the first
call of the pipeline's loss() (start-up), and from the last loss() call to the process's exit (the
last step's backward and optimizer step, the final save, teardown). The pipeline is the digits example
with a train split only (no eval at the end) and a file stamp per loss() call. The working tree's
own split of its start-up (the `ready` event) is reported alongside.

Results: the `startup` section of bench/RESULTS.md (bench/sections.py), raw numbers in
bench/RESULTS_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, child_env, free_port, machine_info, median, spread
from bench.sections import replace_section
from disttrain import events as ev

PROBE = '''
import os, time
from disttrain.pipelines.digits import DigitsPipeline


class StampDigits(DigitsPipeline):
    """Digits, train split only, stamping the time of the first and the latest loss() call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stamp_dir, self.first = os.environ["STAMP_DIR"], True  # not an arg: args must match on resume

    def datasets(self):
        return {"train": super().datasets()["train"]}

    def loss(self, model, batch):
        name = f"{'first' if self.first else 'last'}_{os.getpid()}"
        self.first = False
        with open(os.path.join(self.stamp_dir, name), "w") as fh:
            fh.write(repr(time.time()))
        return super().loss(model, batch)
'''
ARGS = ("trainer.eval_every=0", "trainer.log_every=10", "trainer.progress=none", "checkpoint.every_steps=0",
        "pipeline.target=stamp_probe:StampDigits")  # fmt: skip


def extract(rev: str, dest: Path) -> Path:
    """The disttrain package of commit `rev`, in `dest`, without touching the repository's worktrees."""
    archive = subprocess.run(["git", "archive", rev, "disttrain"], cwd=REPO, capture_output=True, check=True)
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def one_run(tree: Path, probe_dir: Path, run_dir: Path, steps: int, nproc: int) -> dict[str, float]:
    stamps = Path(tempfile.mkdtemp(prefix="stamps-", dir=probe_dir))
    args = [f"run_dir={run_dir}", f"trainer.max_steps={steps}", *ARGS]
    cmd = [sys.executable, "-m", "disttrain.main", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "disttrain.main", *args]  # fmt: skip
    env = child_env(1, PYTHONPATH=os.pathsep.join([str(tree), str(probe_dir)]), STAMP_DIR=str(stamps))
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=probe_dir, capture_output=True, text=True, timeout=600)
    t_exit = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    first = max(float((stamps / n).read_text()) for n in os.listdir(stamps) if n.startswith("first_"))
    last = max(float((stamps / n).read_text()) for n in os.listdir(stamps) if n.startswith("last_"))
    return {"startup_s": first - t0, "exit_s": t_exit - last, **_ready_split(run_dir)}


def _ready_split(run_dir: Path) -> dict[str, float]:
    """The start-up split of the run's last segment, where its disttrain records one."""
    path = run_dir / "events.jsonl"
    ready = [e for e in map(json.loads, path.read_text().splitlines()) if ev.kind(e) == ev.READY]
    return {f"split_{k}": v for k, v in ready[-1]["startup"].items()} if ready else {}


def measure(
    trees: dict[str, Path], probe_dir: Path, reps: int
) -> dict[str, dict[str, list[dict[str, float]]]]:
    results: dict[str, dict[str, list[dict[str, float]]]] = {k: {"fresh": [], "resume": []} for k in trees}
    sources = {}
    for name, tree in trees.items():  # each tree resumes from a checkpoint it wrote itself
        sources[name] = probe_dir / f"src_{name}"
        one_run(tree, probe_dir, sources[name], 20, 2)
    order = list(trees)
    for i in range(reps):
        for name in order if i % 2 == 0 else order[::-1]:
            run = probe_dir / f"run_{name}_{i}"
            results[name]["fresh"].append(one_run(trees[name], probe_dir, run, 30, 1))
            shutil.copytree(sources[name], probe_dir / f"res_{name}_{i}")
            results[name]["resume"].append(
                one_run(trees[name], probe_dir, probe_dir / f"res_{name}_{i}", 30, 2)
            )
            print(f"[startup] {name} rep {i}: fresh {results[name]['fresh'][-1]['startup_s']:.2f} s, "
                  f"resume {results[name]['resume'][-1]['startup_s']:.2f} s", flush=True)  # fmt: skip
    return results


def report(results: dict[str, Any], info: dict[str, Any], rev: str, reps: int, command: str) -> str:
    base, cur = results["baseline"], results["current"]
    lines = [
        "## Start-up and exit of a segment, before and after (issue 13)", "",
        f"`{command}` on {info['date']}: {info['nproc']} CPUs, {info['cpu_model']}, load average "
        f"{'/'.join(f'{x:.2f}' for x in info['load_avg_at_start'])} at start, "
        f"{'/'.join(f'{x:.2f}' for x in info['load_avg_at_end'])} at end (the machine is shared: other jobs "
        f"ran). Baseline: commit {rev}; current: the working tree at {info['git_commit']}. {reps} interleaved "
        "repetitions each; medians, with the min-max of the per-repetition ratios.", "",
        "| run | figure | baseline | current | ratio (spread) |", "| --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for kind, what in (("fresh", "1 process, fresh"), ("resume", "2 ranks (torchrun), resumed")):
        for key, figure in (("startup_s", "spawn to first step"), ("exit_s", "last step to exit")):
            b, c = [r[key] for r in base[kind]], [r[key] for r in cur[kind]]
            rs = [x / y for x, y in zip(c, b) if y]
            lo, hi = spread(rs)
            lines.append(f"| {what} | {figure} | {median(b):.2f} s | {median(c):.2f} s | "
                         f"{median(rs):.2f} ({lo:.2f}-{hi:.2f}) |")  # fmt: skip
    split = {k[6:]: median([r[k] for r in cur["resume"]]) for k in cur["resume"][0] if k.startswith("split_")}
    lines += ["", "Current, resumed, rank 0's own split of its start-up (`ready` event, medians): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in split.items()) + "."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--baseline", default="d429859", help="commit to compare with (default: where issue 13 began)"
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = p.parse_args(argv)
    command = "python -m bench.startup" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        root = Path(tmp)
        (root / "stamp_probe.py").write_text(PROBE)
        trees = {"baseline": extract(args.baseline, root / "baseline"), "current": REPO}
        results = measure(trees, root, args.reps)
    info["load_avg_at_end"] = os.getloadavg()
    replace_section(args.out, "startup", report(results, info, args.baseline, args.reps, command))
    raw = {"command": command, "machine": info, "baseline": args.baseline, "results": results}
    Path(args.out).with_name("RESULTS_startup.json").write_text(json.dumps(raw, indent=1, default=str))
    print(f"[startup] wrote the startup section of {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
