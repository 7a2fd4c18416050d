"""The benchmark harness: `python -m bench` (or `python bench/run.py`) runs the CPU sections and writes
bench/RESULTS.md and bench/RESULTS.json. How to run it and read it: bench/README.md.

  python -m bench                      all CPU sections (a few minutes on 2 cores)
  python -m bench --quick              fewer repetitions and sizes (about two minutes)
  python -m bench --sections step,ckpt only those (step, ckpt, async, resume, data, fsdp, stream, features, gpu)
  python -m bench --gpu                the GPU section alone, into bench/RESULTS_GPU.md (one CUDA device)
  python -m bench --gpu-smoke          the GPU section's code on the CPU with a toy model (a harness check)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, Section, machine_info  # noqa: E402
from bench.report import write_report  # noqa: E402

# section -> the function that runs it, as module:function under bench/ (imported when it runs)
SECTIONS = {"step": "step:run", "ckpt": "ckpt:run_write", "async": "ckpt:run_async", "resume": "resume:run",
            "data": "datawait:run", "fsdp": "fsdp:run", "stream": "stream:run",
            "features": "features:run", "gpu": "gpu:run"}  # fmt: skip
CPU_SECTIONS = [s for s in SECTIONS if s != "gpu"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", help=f"comma list of {', '.join(SECTIONS)} (default: all but gpu)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions; no 1 GB sizes")
    p.add_argument("--gpu", action="store_true", help="the GPU section alone (unless --sections names more)")
    p.add_argument("--gpu-smoke", action="store_true", help="the GPU section on the CPU with a toy model")
    p.add_argument("--no-compile", action="store_true", help="GPU section: skip the torch.compile runs")
    p.add_argument("--out", help="report path (default bench/RESULTS.md; RESULTS_GPU.md for gpu alone)")
    args = p.parse_args(argv)
    if args.sections is not None:
        args.section_list = [s for s in args.sections.split(",") if s]
    else:
        args.section_list = ["gpu"] if (args.gpu or args.gpu_smoke) else CPU_SECTIONS
    unknown = set(args.section_list) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if args.out is None:
        args.out = str(REPO / "bench" / ("RESULTS_GPU.md" if args.section_list == ["gpu"] else "RESULTS.md"))
    return args


def run_section(name: str, args: argparse.Namespace) -> Section:
    module, _, func = SECTIONS[name].partition(":")
    fn = getattr(importlib.import_module(f"bench.{module}"), func)
    if name == "gpu":
        return fn(args.quick, smoke=args.gpu_smoke, compile_model=not args.no_compile)
    return fn(args.quick)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # this process only orchestrates and does I/O
    shown = sys.argv[1:] if argv is None else argv
    command = "python -m bench" + "".join(f" {shlex.quote(a)}" for a in shown)
    info, start, sections = machine_info(), time.time(), []
    for name in args.section_list:
        print(f"[bench] {name} ...", flush=True)
        t0 = time.time()
        sec = run_section(name, args)
        sec.seconds = time.time() - t0
        print(f"[bench] {name}: {sec.seconds:.0f} s", flush=True)
        for row in sec.rows:
            verdict = "" if row.met is None else ("met" if row.met else "MISSED")
            print(f"    {row.figure}: ratio {row.ratio:.3f} (goal {row.goal}) {verdict}", flush=True)
        sections.append(sec)
    info["load_avg_at_end"], info["total_seconds"] = os.getloadavg(), round(time.time() - start)
    write_report(args.out, sections, info, command, quick=args.quick)
    raw = {"command": command, "machine": info, "sections": [
        {"key": s.key, "title": s.title, "seconds": s.seconds, "rows": [r.as_dict() for r in s.rows],
         "notes": s.notes, "extra": s.extra} for s in sections]}  # fmt: skip
    with open(Path(args.out).with_suffix(".json"), "w", encoding="utf-8") as fh:
        json.dump(raw, fh, indent=1, default=str)
    print(f"[bench] wrote {args.out} in {info['total_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
