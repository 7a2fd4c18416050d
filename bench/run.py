"""The benchmark harness: `python -m bench` (or `python bench/run.py`) runs every CPU section and writes
bench/RESULTS.md and bench/results.json.

  python -m bench                      all CPU sections (a few minutes on 2 cores)
  python -m bench --quick              fewer repetitions, no ablation or profile (about two minutes)
  python -m bench --sections step,ckpt only those (step, ckpt, async, resume, data, gpu)
  python -m bench --gpu                the GPU section alone, into bench/RESULTS_GPU.md (one CUDA device)
  python -m bench --gpu-smoke          the GPU section's code on the CPU with a toy model (a harness check)

Every figure is a ratio against a baseline measured in the same run, the two interleaved (A B A B ...),
the median over repetitions, with the spread (min-max of the per-repetition ratios).
"""

from __future__ import annotations

import argparse
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

CPU_SECTIONS = ("step", "ckpt", "async", "resume", "data")
ALL_SECTIONS = (*CPU_SECTIONS, "gpu")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sections", default=",".join(CPU_SECTIONS), help=f"comma list of {', '.join(ALL_SECTIONS)}"
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer repetitions; no ablation, profile or 1 GB sizes"
    )
    p.add_argument(
        "--gpu", action="store_true", help="run the GPU section (alone unless --sections names more)"
    )
    p.add_argument("--gpu-smoke", action="store_true", help="the GPU section on the CPU with a toy model")
    p.add_argument("--no-compile", action="store_true", help="GPU section: skip the torch.compile runs")
    p.add_argument(
        "--no-ablation", action="store_true", help="step section: skip timing the proposed patches"
    )
    p.add_argument(
        "--no-profile", action="store_true", help="step section: skip the profile and component costs"
    )
    p.add_argument("--out", help="report path (default bench/RESULTS.md; bench/RESULTS_GPU.md with --gpu)")
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    if (args.gpu or args.gpu_smoke) and "--sections" not in (argv if argv is not None else sys.argv[1:]):
        sections = ["gpu"]
    unknown = set(sections) - set(ALL_SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(ALL_SECTIONS)}")
    args.section_list = sections
    if args.out is None:
        args.out = str(REPO / "bench" / ("RESULTS_GPU.md" if sections == ["gpu"] else "RESULTS.md"))
    return args


def run_section(name: str, args: argparse.Namespace) -> Section:
    quick = args.quick
    if name == "step":
        from bench import step

        return step.run(
            quick, ablation=not (quick or args.no_ablation), profile=not (quick or args.no_profile)
        )
    if name == "ckpt":
        from bench import ckpt

        return ckpt.run_write(quick)
    if name == "async":
        from bench import ckpt

        return ckpt.run_async(quick)
    if name == "resume":
        from bench import resume

        return resume.run(quick)
    if name == "data":
        from bench import datawait

        return datawait.run(quick)
    from bench import gpu

    return gpu.run(quick, smoke=args.gpu_smoke, compile_model=not args.no_compile)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # this process only orchestrates and does I/O
    shown = argv if argv is not None else sys.argv[1:]
    command = "python -m bench" + ("".join(f" {shlex.quote(a)}" for a in shown))
    info = machine_info()
    start = time.time()
    sections = []
    for name in args.section_list:
        t0 = time.time()
        print(f"[bench] {name} ...", flush=True)
        sec = run_section(name, args)
        sec.seconds = time.time() - t0
        print(f"[bench] {name}: {sec.seconds:.0f} s", flush=True)
        for row in sec.rows:
            verdict = "" if row.met is None else ("met" if row.met else "MISSED")
            print(f"    {row.figure}: ratio {row.ratio:.3f} (goal {row.goal}) {verdict}", flush=True)
        sections.append(sec)
    info["load_avg_at_end"] = os.getloadavg()
    info["total_seconds"] = round(time.time() - start)
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
