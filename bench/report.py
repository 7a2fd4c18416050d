"""bench/RESULTS.md from the sections: the machine and command, the goals at a glance, one table per
section. Facts only; how to read them is in bench/README.md."""

from __future__ import annotations

import json
import os
from typing import Any

from bench.common import Row, Section
from bench.sections import owned_sections

TABLE_HEAD = ["| figure | value | baseline | ratio | goal | goal met? | spread | note |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip


def _fmt(x: Any) -> str:
    """Three significant figures or so; thousands separated."""
    if not isinstance(x, float):
        return str(x)
    if x != x:
        return "n/a"
    for limit, spec in ((1000, ",.0f"), (100, ".0f"), (10, ".1f"), (1, ".2f")):
        if abs(x) >= limit:
            return format(x, spec)
    return f"{x:.3f}"


def _verdict(met: bool | None) -> str:
    return "—" if met is None else ("**met**" if met else "**missed**")


def _row_line(r: Row) -> str:
    cells = [r.figure, f"{_fmt(r.value)} {r.unit}", f"{_fmt(r.baseline)} {r.unit}", f"{r.ratio:.3f}", r.goal,
             _verdict(r.met), r.spread, r.note]  # fmt: skip
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def _machine(info: dict[str, Any], command: str, quick: bool) -> list[str]:
    gpu = f"GPU {info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else "no GPU"
    load = {k: "/".join(f"{x:.2f}" for x in info[k]) for k in ("load_avg_at_start", "load_avg_at_end")}
    return [
        "| | |", "| --- | --- |",
        f"| command | `{command}` (from the repository root{'; quick mode' if quick else ''}) |",
        f"| date | {info['date']} |",
        f"| machine | {info['nproc']} CPUs usable ({info['host_cpus']} online), {info['cpu_model']}, "
        f"{info['ram_gib']} GiB RAM; {gpu} |",
        f"| load average | {load['load_avg_at_start']} at start, {load['load_avg_at_end']} at end |",
        f"| versions | python {info['python']}, torch {info['torch']}, accelerate {info['accelerate']}, "
        f"safetensors {info['safetensors']}, s3fs {info['s3fs']}, moto {info['moto']}, numpy {info['numpy']} |",
        f"| platform | {info['platform']} |",
        f"| disttrain | commit {info['git_commit']} (the working tree as it was) |",
        f"| wall time | {info['total_seconds']} s |",
    ]  # fmt: skip


def _summary(sections: list[Section]) -> list[str]:
    out = ["| section | figure | ratio | goal | goal met? |", "| --- | --- | --- | --- | --- |"]
    for sec in sections:
        number = sec.title.split(".")[0]
        out += [f"| {number} | {r.figure} | {r.ratio:.3f} | {r.goal} | {_verdict(r.met)} |"
                for r in sec.rows if r.met is not None]  # fmt: skip
    return out


def _last_gpu_run(path: str) -> list[str]:
    """Section 6 when this run had no GPU: the goals of the last `python -m bench --gpu` (its own report,
    RESULTS_GPU.md, has the whole section), or how to make one."""
    if not os.path.exists(path):
        return ["Not in this run: `python -m bench --gpu` needs a CUDA device."]
    with open(path, encoding="utf-8") as fh:
        last = json.load(fh)
    info = last["machine"]
    rows = [row for sec in last["sections"] for row in sec["rows"]]
    head = (f"Not in this run (no CUDA device). The last GPU run, `{last['command']}` on {info.get('gpu', '?')} "
            f"at {info.get('date', '?')}, commit {info.get('git_commit', '?')}; all of it in bench/RESULTS_GPU.md:")  # fmt: skip
    table = ["", "| figure | ratio | goal | goal met? |", "| --- | --- | --- | --- |"]
    table += [f"| {r['figure']} | {r['ratio']:.3f} | {r['goal']} | {_verdict(r['met'])} |" for r in rows]
    return [head, *table]


def _verdict(met: bool | None) -> str:
    return "—" if met is None else ("met" if met else "**missed**")


def write_report(path: str, sections: list[Section], info: dict[str, Any], command: str, quick: bool) -> None:
    lines = ["# disttrain benchmarks", "",
             "Written by `python -m bench`; how to read it: bench/README.md; raw numbers in the .json next to "
             "this file.", "", "## Machine and command", "", *_machine(info, command, quick), "",
             "## Goals at a glance", "", *_summary(sections), ""]  # fmt: skip
    for sec in sections:
        lines += [f"## {sec.title}", "", f"Section time: {sec.seconds:.0f} s.", "", *TABLE_HEAD]
        lines += [_row_line(r) for r in sec.rows] + [""] + [f"- {n}" for n in sec.notes] + [""]
    if not any(s.key == "gpu" for s in sections):
        gpu = os.path.join(os.path.dirname(path), "RESULTS_GPU.json")
        lines += ["## 6. GPU", "", *_last_gpu_run(gpu), ""]
    kept = owned_sections(path)  # sections other commands write (bench/sections.py) stay as they were
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines).rstrip() + "\n" + (f"\n{kept}\n" if kept else ""))
