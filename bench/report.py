"""bench/RESULTS.md from the sections' rows: machine, command, one table per section, why goals were
missed, and the proposed patches with their measured effect."""

from __future__ import annotations

import glob
import os
from typing import Any

from bench.common import REPO, Row, Section

HOW_TO_READ = """\
Every figure is set against a baseline measured **in the same run**, the two interleaved (A B A B …):
*value* and *baseline* are medians over the repetitions, *ratio* is the median of the per-repetition
ratios (value_i / baseline_i; for throughputs disttrain / raw), *spread* is the min–max of those
ratios and n. The machine is shared with other jobs (2 cores), so single runs swing by ±50 %; the
interleaving and the medians are what make the ratios usable, and the spread says how far to trust
them. Step times are given twice: each run's median step, and each run's 10th-percentile step (the
step when nothing else got in the way; contention only ever adds time, so it is the steadier one)."""

WHY = {
    "step": """\
**Why (step overhead).** The plain loop and disttrain do the same math (the weights match bit for bit),
so the difference is what the trainer does around it. The component tables above time each extra on
the real objects: accelerate's `AcceleratedOptimizer.step` asks importlib twice per call whether the
optional `lomo_optim` package is installed (a `find_spec` scan of `sys.path`, ~0.1 ms), `zero_grad`
runs `inspect.signature`, `model.train()` walks every module each step, and the stop agreement
(DESIGN §5) starts one async gloo all-reduce per step, whose dispatch and wait cost 0.1–0.3 ms on
two oversubscribed cores. On tiny_gpt that is ≲1 % of a 40–90 ms step; on the default digits example
(3–7 ms steps) it is 5–20 %, and no fixed per-step cost of that size can fit in 1 %. The ablation
The components add up to less than the measured overhead: the stop agreement's all-reduce also keeps
gloo's background thread busy, competing with the two ranks for the two cores (the ablation's
`stop_every` saves more than the poll's own time), and accelerate's `backward` divides the loss by the
accumulation steps (one more autograd node). The ablation
table times the two proposed patches (bench/proposed/) in the same run, whole runs alternated; with
this much noise it confirms the direction, and the component table gives the size: patch 01 removes
the optimizer-wrapper, zero_grad and `model.train()` rows, patch 02 all but one in ~0.1 s of the stop
agreement. Memory: the trainer process imports accelerate (≈15 MiB of RSS before any training);
building and training then add a little more than the plain loop (the Trainer also keeps the eval
and test splits, the writers, the checkpoint manager), so the +1 MiB goal is missed mostly by the
import.""",
    "ckpt": """\
**Why (checkpoint throughput).** This disk writes ~1–2 GB/s with fsync, so every extra pass over the
bytes shows. A sync save serialises the weights into one `bytes` (safetensors) and the rest into a
`BytesIO`, hashes every byte (sha256 on a second thread, beside the write), then writes and fsyncs
three files, the manifest, the `latest` pointer and the directory: at 10 MB those fixed fsyncs and
renames dominate, and at 1 GB the serialised copy (fresh memory, page faults) does. Load reads every
file and deserialises it with another copy; the weights are parsed while their hash is computed, but
a raw read is one pass and a load is at least two. Streaming serialisation straight into the file
would close more of the gap. On S3 (moto on loopback) the many small requests (list, exists,
manifest, `latest`, retention) weigh at 10 MB.""",
    "async": """\
**Why (async save).** The step blocks for the host copy of the whole state (DESIGN §4.7: the copy is
what makes the background write consistent). On a CPU that copy is a memcpy into freshly allocated
memory, while a sync save (which needs no copy since the state cannot change under it) writes to a
fast local disk, so the ratio is 10–25 %; the goal assumes a write much slower than a copy (network
storage, or GPU memory copied by DMA while the GPU keeps going).""",
    "resume": """\
**Why (resume).** A resume reads and hashes each file of the newest checkpoint once (the 03 patch
is applied), deserialises it, and the trainer then copies the tensors into the model and the
optimizer (`load_state_dict`); that last copy is what a resume adds beyond `load()`. The
process-level figure also carries the noise of interpreter start-up on a shared machine (imports
alone swing by seconds), which is why the in-process Trainer-construction figure is given too.
**Why (preemption).** The stop is agreed one step boundary after the signal is seen (the all-reduce
started at one boundary is read at the next), so up to two steps pass before the save; exit also
includes interpreter teardown. With steps longer than ~0.5 s the allowance of one step + 1 s is
exceeded by that second step.""",
    "data": """\
**Why (data wait).** With `num_workers: 0` (the shipped configs) each batch is built in the training
process. Batches of in-memory `TensorDataset`s are now gathered whole (one index per tensor, ~32 us
for digits instead of ~106 us sample by sample), but against digits' 3–7 ms step the rest of the
DataLoader's per-batch work still shows; tiny_gpt's step is long enough for it to vanish.
`data.num_workers=1` prefetches in a worker process, which on 2 cores competes with the ranks.""",
}


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x != x:
            return "n/a"
        a = abs(x)
        if a >= 1000:
            return f"{x:,.0f}"
        if a >= 100:
            return f"{x:.0f}"
        if a >= 10:
            return f"{x:.1f}"
        if a >= 1:
            return f"{x:.2f}"
        return f"{x:.3f}"
    return str(x)


def _verdict(met: bool | None) -> str:
    return "—" if met is None else ("**met**" if met else "**missed**")


def _row_line(r: Row | dict[str, Any]) -> str:
    d = r.as_dict() if isinstance(r, Row) else r
    cells = [d["figure"], f"{_fmt(d['value'])} {d['unit']}", f"{_fmt(d['baseline'])} {d['unit']}",
             f"{d['ratio']:.3f}", d["goal"], _verdict(d["met"]), d["spread"], d.get("note", "")]  # fmt: skip
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


TABLE_HEAD = ("| figure | value | baseline | ratio | goal | goal met? | spread | note |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- |")  # fmt: skip


def _section(sec: Section) -> list[str]:
    out = [f"## {sec.title}", "", f"Section time: {sec.seconds:.0f} s.", "", TABLE_HEAD]
    out += [_row_line(r) for r in sec.rows]
    out.append("")
    out += [f"- {n}" for n in sec.notes]
    if sec.key == "step":
        out += _step_extras(sec)
    if any(r.met is False for r in sec.rows) and sec.key in WHY:
        out += ["", WHY[sec.key], ""]
    return out


def _step_extras(sec: Section) -> list[str]:
    out: list[str] = []
    if sec.extra.get("ablation_rows"):
        out += ["", "### Proposed patches, timed in the same run (whole runs alternated: stock, patched…, "
                "plain)", "", TABLE_HEAD]  # fmt: skip
        out += [_row_line(r) for r in sec.extra["ablation_rows"]]
        out += ["", "`stop_every` = bench/proposed/02-stop-agreement-cadence.diff, mirrored as a subclass in "
                "bench/patches.py (01 and 03 are applied to disttrain, so they are no longer timed apart)."]  # fmt: skip
    for wl in ("tiny_gpt", "digits"):
        comps = sec.extra.get(f"{wl}_components")
        if comps:
            out += [
                "",
                f"### What the trainer adds per step, {wl} (measured call by call, no profiler; fastest of 9 blocks)",
                "",
                "| component | disttrain, us | plain equivalent, us | extra, us/step |",
                "| --- | --- | --- | --- |",
            ]
            out += [
                f"| {c['component']} | {c['a_us']:.1f} | {c['b_us']:.1f} | {c['extra_us']:+.1f} |"
                for c in comps
            ]
            out.append(f"| **sum** | | | **{sum(c['extra_us'] for c in comps):+.0f}** |")
        prof = sec.extra.get(f"{wl}_profile")
        if prof:
            out += ["", f"### cProfile, {wl}: self time per step, disttrain minus plain (timed steps only; the "
                    "profiler inflates Python-heavy code, so rank by it, size by the table above; `run_backward` "
                "includes waiting in DDP's all-reduce for the other, unprofiled rank)", "",
                    "| function | disttrain, us | plain, us | difference, us | calls/step |",
                    "| --- | --- | --- | --- | --- |"]  # fmt: skip
            out += [f"| `{p['function']}` | {p['a_us']:.0f} | {p['b_us']:.0f} | {p['diff_us']:+.0f} | "
                    f"{p['calls_per_step']:.1f} |" for p in prof[:13]]  # fmt: skip
    return out


def _machine(info: dict[str, Any], command: str, quick: bool) -> list[str]:
    return [
        "| | |", "| --- | --- |",
        f"| command | `{command}` (from the repository root{'; quick mode' if quick else ''}) |",
        f"| date | {info['date']} |",
        f"| machine | {info['nproc']} CPUs usable ({info['host_cpus']} online), {info['cpu_model']}, "
        f"{info['ram_gib']} GiB RAM; no GPU |" if "gpu" not in info else
        f"| machine | {info['nproc']} CPUs, {info['cpu_model']}, {info['ram_gib']} GiB RAM, GPU {info['gpu']} "
        f"(CUDA {info['cuda']}) |",
        f"| load average | {_load(info['load_avg_at_start'])} at start, {_load(info['load_avg_at_end'])} at end "
        "(other jobs share the machine) |",
        f"| versions | python {info['python']}, torch {info['torch']}, accelerate {info['accelerate']}, "
        f"safetensors {info['safetensors']}, s3fs {info['s3fs']}, moto {info['moto']}, numpy {info['numpy']} |",
        f"| platform | {info['platform']} |",
        f"| disttrain | commit {info['git_commit']} (the working tree as it was) |",
        f"| wall time | {info['total_seconds']} s |",
    ]  # fmt: skip


def _load(avg: Any) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def _summary(sections: list[Section]) -> list[str]:
    out = ["| section | figure | ratio | goal | goal met? |", "| --- | --- | --- | --- | --- |"]
    for sec in sections:
        for r in sec.rows:
            if r.met is not None:
                out.append(f"| {sec.title.split(':')[0].split('.')[0]} | {r.figure} | {r.ratio:.3f} | {r.goal} | "
                           f"{_verdict(r.met)} |")  # fmt: skip
    return out


GPU_NOT_RUN = """\
## 6. GPU

**Not run in this session: no GPU was lent to it.** The section is written and its code path was
checked on the CPU with a toy model (`python -m bench --gpu-smoke`). On a machine with one CUDA device,
from the repository root:

    python -m bench --gpu            # about 5-8 minutes; writes bench/RESULTS_GPU.md and .json

It measures the device's bf16 matmul peak (8192³ matmuls), trains tiny_gpt as configs/tiny_gpt_gpu.yaml
sizes it (12 layers, d_model 768, 1024 tokens, batch 64, bf16, fused AdamW) with the Trainer and with a
plain loop, alternated, eager and then with torch.compile: time per step and the overhead, tokens/s
and model FLOPs utilisation against the measured peak; then sync save vs raw write, async-save blocking
vs sync save, and load vs raw read of the trained model's ~1 GB GPU state. `--no-compile` skips the
compiled runs."""


def write_report(path: str, sections: list[Section], info: dict[str, Any], command: str, quick: bool) -> None:
    lines = ["# disttrain benchmarks", "", "Written by `bench/run.py`; raw numbers in the .json next to this file.",
             "", HOW_TO_READ, "", "## Machine and command", ""]  # fmt: skip
    lines += _machine(info, command, quick)
    lines += ["", "## Goals at a glance", ""] + _summary(sections) + [""]
    for sec in sections:
        lines += _section(sec) + [""]
    if not any(s.key == "gpu" for s in sections) and os.path.basename(path) == "RESULTS.md":
        lines += [GPU_NOT_RUN, ""]
    patches = sorted(glob.glob(str(REPO / "bench" / "proposed" / "*.diff")))
    if patches and any(s.key == "step" for s in sections):
        lines += ["## Proposed patches to disttrain", ""]
        lines += [f"- `bench/proposed/{os.path.basename(p)}`: {_first_line(p)}" for p in patches]
        lines += [
            "",
            "01 and 03 are applied to disttrain (commit d3932fe); 02 is not, because DESIGN section 5 asks "
            "for agreement at every step boundary (apply it with `git apply bench/proposed/02-*.diff`).",
            "",
        ]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines).rstrip() + "\n")


def _first_line(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("#"):
                return line.lstrip("# ").strip()
    return ""
