"""Section 1: step overhead of disttrain's Trainer against a plain torch DDP loop (2 ranks, gloo, CPU).

Two launches per workload, each a fresh pair of processes running whole training runs alternately,
A B B A A B ... (launch 1) and B A A B B A ... (launch 2), so neither variant always goes first. Each
adjacent (A, B) couple is one repetition: the ratio of their median step times. The first run of each
launch is that variant's memory figure (fresh process). Every run's final weights are hashed: A and B
must be bit-identical. See bench/step_worker.py for what A and B are exactly.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.common import Row, Section, launch_ranks, median, ratio_row, spread

WORKLOADS = {
    # tiny_gpt as configs/tiny_gpt.yaml ships it (2 layers, d_model 128, batch 32): ~40-90 ms a step here.
    "tiny_gpt": {
        "config": "configs/tiny_gpt.yaml",
        "overrides": ["scheduler.warmup_steps=5"],
        "full": (20, 5, 3),
        "quick": (12, 3, 2),
    },  # fmt: skip
    # the default example (digits CNN, batch 64): ~3-6 ms a step, so fixed per-step costs show.
    "digits": {"config": None, "overrides": [], "full": (80, 10, 5), "quick": (40, 10, 3)},
}
# 01 and 03 are applied to disttrain; 02 (stop_every) is the one proposal left to time against stock.
ABLATION = {"digits": ["A", "stop_every", "B"], "tiny_gpt": ["A", "stop_every", "B"]}


def p10(xs: list[float]) -> float:
    """The 10th percentile of a run's step times: the step when nothing else got in the way. Contention
    on a shared machine only ever adds time, so this is the steadier per-run figure."""
    ys = sorted(xs)
    return ys[int(0.1 * (len(ys) - 1))]


def _sequence(first: str, reps: int) -> list[str]:
    other = "B" if first == "A" else "A"
    seq: list[str] = []
    for i in range(reps):
        seq += [first, other] if i % 2 == 0 else [other, first]
    return seq


def _couples(runs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Adjacent runs two by two, as (A, B)."""
    out = []
    for x, y in zip(runs[0::2], runs[1::2]):
        out.append((x, y) if x["variant"] == "A" else (y, x))
    return out


def run(quick: bool, ablation: bool, profile: bool) -> Section:
    sec = Section(
        "step", "1. Step overhead: disttrain Trainer vs a plain torch DDP loop (2 ranks, gloo, CPU)"
    )
    for name, wl in WORKLOADS.items():
        steps, warmup, reps = wl["quick" if quick else "full"]
        base = {"config": wl["config"], "overrides": wl["overrides"], "steps": steps + warmup + 1,
                "warmup": warmup}  # fmt: skip
        launches = [launch_ranks("bench.step_worker", {**base, "order": _sequence(first, reps), "reps": 1}, 2)
                    for first in ("A", "B")]  # fmt: skip
        _rows(sec, name, launches, steps)
        if ablation:
            order = ABLATION[name]
            res = launch_ranks("bench.step_worker", {**base, "order": order, "reps": reps}, 2)
            _ablation(sec, name, res[0]["runs"], order)
        if profile:
            res = launch_ranks("bench.step_worker", {**base, "order": [], "reps": 0, "components": True,
                                                     "profile_steps": steps + warmup + 1}, 2)  # fmt: skip
            sec.extra[f"{name}_profile"] = _profile_table(res[0]["profile"])
            sec.extra[f"{name}_components"] = res[0]["components"]
    return sec


def _rows(sec: Section, name: str, launches: list[list[dict[str, Any]]], steps: int) -> None:
    couples = []
    for ranks in launches:  # rank 0's runs; rank 1 is in lockstep with it through the all-reduces
        couples += _couples(ranks[0]["runs"])
    a = [statistics.median(x["times"]) for x, _ in couples]
    b = [statistics.median(y["times"]) for _, y in couples]
    diffs_us = [(x - y) * 1e6 for x, y in zip(a, b)]
    lo, hi = spread(diffs_us)
    sec.rows.append(ratio_row(f"{name}: time per step (each run's median step)", a, b, "ms", "<= 1.01",
                              lambda r: r <= 1.01, scale=1e3,
                              note=f"{steps} timed steps a run; overhead {median(diffs_us):+.0f} us/step "
                                   f"(range {lo:+.0f} to {hi:+.0f})"))  # fmt: skip
    a10 = [p10(x["times"]) for x, _ in couples]
    b10 = [p10(y["times"]) for _, y in couples]
    d10 = [(x - y) * 1e6 for x, y in zip(a10, b10)]
    sec.rows.append(ratio_row(f"{name}: time per step (each run's 10th-percentile step)", a10, b10, "ms",
                              "<= 1.01", lambda r: r <= 1.01, scale=1e3,
                              note=f"the same runs; overhead {median(d10):+.0f} us/step (range {min(d10):+.0f} "
                                   f"to {max(d10):+.0f})"))  # fmt: skip
    hashes = {r["sha256"] for ranks in launches for rr in ranks for r in rr["runs"]}
    n_runs = sum(len(rr["runs"]) for ranks in launches for rr in ranks)
    sec.rows.append(Row(f"{name}: final weights, sha256 of state_dict", len(hashes), 1, "distinct hashes",
                        float(len(hashes)), "1 (bit-identical)", len(hashes) == 1, f"{n_runs} runs, both ranks",
                        note=", ".join(sorted(h[:12] for h in hashes))))  # fmt: skip
    mem = {ranks[0]["memory"]["variant"]: [rr["memory"] for rr in ranks] for ranks in launches}
    for rank in (0, 1):
        ma, mb = mem["A"][rank], mem["B"][rank]
        pa, pb = ma["peak_rss_mib"], mb["peak_rss_mib"]
        ia, ib = ma["rss_after_import_mib"], mb["rss_after_import_mib"]
        sec.rows.append(Row(f"{name}: peak RSS through the last step, rank {rank} (fresh process)", pa, pb, "MiB",
                            pa / pb, "<= +1 MiB", pa - pb <= 1.0, "n=1 per variant",
                            note=f"{pa - pb:+.1f} MiB: imports {ia - ib:+.1f} MiB, building and training "
                                 f"{(pa - ia) - (pb - ib):+.1f} MiB; after the trainer's end-of-run eval "
                                 f"{ma['peak_rss_end_mib'] - pa:+.1f} MiB more"))  # fmt: skip
    sec.extra[f"{name}_runs"] = [{"a_ms": x * 1e3, "b_ms": y * 1e3} for x, y in zip(a, b)]


def _ablation(sec: Section, name: str, runs: list[dict[str, Any]], order: list[str]) -> None:
    by: dict[str, list[float]] = {v: [] for v in order}
    for r in runs:
        by[r["variant"]].append(p10(r["times"]))
    hashes = {r["sha256"] for r in runs}
    for v in order:
        if v == "B":
            continue
        row = ratio_row(f"{name}: `{v}` vs plain loop (10th-percentile step)", by[v], by["B"], "ms", "<= 1.01",
                        lambda r: r <= 1.01,
                        scale=1e3)  # fmt: skip
        gain = [(x - y) * 1e6 for x, y in zip(by["A"], by[v])]
        row.note = f"saves {median(gain):+.0f} us/step vs stock (range {min(gain):+.0f} to {max(gain):+.0f})"
        row.note += "" if v != "A" else "; stock, for reference"
        row.note += f"; weights {'bit-identical' if len(hashes) == 1 else 'DIFFER'} across variants"
        sec.extra.setdefault("ablation_rows", []).append(row.as_dict())


def _min_merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    funcs: dict[str, dict[str, float]] = {}
    for run in runs:
        for key, f in run["funcs"].items():
            if key not in funcs or f["tottime"] < funcs[key]["tottime"]:
                funcs[key] = f
    return {"steps": runs[0]["steps"], "funcs": funcs}


def _profile_table(profiles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-function self time per step, A minus B, biggest first: what disttrain adds per step. Two
    profiled runs of each, alternated; each function's smaller figure of the two (noise only adds)."""
    a = _min_merge([p for p in profiles if p["variant"] == "A"])
    b = _min_merge([p for p in profiles if p["variant"] == "B"])
    fa, fb = a["funcs"], b["funcs"]
    rows = []
    for key in set(fa) | set(fb):
        da = fa.get(key, {}).get("tottime", 0.0) / a["steps"]
        db = fb.get(key, {}).get("tottime", 0.0) / b["steps"]
        calls = fa.get(key, {}).get("calls", 0) / a["steps"]
        rows.append({"function": key, "a_us": da * 1e6, "b_us": db * 1e6, "diff_us": (da - db) * 1e6,
                     "calls_per_step": calls})  # fmt: skip
    rows.sort(key=lambda r: -r["diff_us"])
    total_a = sum(v["tottime"] for v in fa.values()) / a["steps"] * 1e6
    total_b = sum(v["tottime"] for v in fb.values()) / b["steps"] * 1e6
    return [{"function": "(all, under the profiler)", "a_us": total_a, "b_us": total_b,
             "diff_us": total_a - total_b, "calls_per_step": 0}] + rows[:15]  # fmt: skip
