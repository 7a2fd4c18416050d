"""Which rank, which host (DESIGN §7b), as `disttrain status` reads it from events.jsonl: the ranks and
hosts the `straggler` events named, with what they cost the others, and the `hang` records (the rank
that did not arrive, its host, its section and frame). Not a command: commands/run_status.py puts it in
a run's report, commands/sweep_status.py in a task's row. torch-free.

A straggler's cost is the sum of its events' `waited_s`: each event carries the waiting of the windows
since the one before (features.stragglers), so the sum is what the run paid, the same seconds goodput
counts as its `stragglers` cause (goodput.py counts those of kept steps only).
"""

from __future__ import annotations

import statistics
from typing import Any

from disttrain import events as ev
from disttrain import goodput
from disttrain.hangs import waiting_for

SHOWN = 3  # ranks named on the status line before "and N more"
Record = dict[str, Any]


def stragglers(events: list[ev.Event]) -> dict[str, Any]:
    """The slow ranks and hosts of a run, costliest first: {waited_s, ranks: [{rank, host, waited_s,
    windows, section, ratio, first_step, last_step}], hosts: [{host, waited_s, windows, ranks}]}."""
    found = [e for e in events if ev.kind(e) == ev.STRAGGLER and isinstance(e.get("rank"), int)]
    by_rank: dict[tuple[int, str], list[ev.Event]] = {}
    for e in found:
        by_rank.setdefault((e["rank"], str(e.get("host") or "")), []).append(e)
    ranks = sorted((_rank(rank, host, evs) for (rank, host), evs in by_rank.items()), key=_costliest)
    by_host: dict[str, list[Record]] = {}
    for r in ranks:
        by_host.setdefault(r["host"], []).append(r)
    hosts = [
        {
            "host": host,
            "waited_s": round(sum(r["waited_s"] for r in rs), 3),
            "windows": sum(r["windows"] for r in rs),
            "ranks": sorted(r["rank"] for r in rs),
        }
        for host, rs in by_host.items()
    ]
    return {
        "waited_s": round(sum(r["waited_s"] for r in ranks), 3),
        "ranks": ranks,
        "hosts": sorted(hosts, key=_costliest),
    }


def _rank(rank: int, host: str, found: list[ev.Event]) -> Record:
    sections: dict[str, float] = {}
    for e in found:
        sections[str(e.get("section"))] = sections.get(str(e.get("section")), 0.0) + _num(e.get("waited_s"))
    windows = [max(1, int(_num(e.get("windows")))) for e in found]
    # Each event's ratio is the median over its windows: weigh it by them.
    ratios = [_num(e.get("ratio")) for e, n in zip(found, windows) for _ in range(n)]
    return {
        "rank": rank,
        "host": host,
        "waited_s": round(sum(_num(e.get("waited_s")) for e in found), 3),
        "windows": sum(windows),
        "section": max(sections, key=sections.__getitem__),
        "ratio": round(statistics.median(ratios), 3),
        "first_step": min(ev.step(e) for e in found),
        "last_step": max(ev.step(e) for e in found),
    }


def _costliest(record: Record) -> tuple[float, str]:
    return (-record["waited_s"], str(record.get("rank", record.get("host"))))


def hangs(events: list[ev.Event]) -> list[Record]:
    """Every `hang` record, oldest first: {step, time, job_id, waited_in, ranks: [{rank, host, section,
    frame}]}. `waited_in` is the section the surviving rank 0 waited in; none when rank 0 itself hung
    (its own watch wrote the record, with its section beside the rank)."""
    out = []
    for e in events:
        if ev.kind(e) != ev.HANG:
            continue
        ranks = [
            {
                "rank": r.get("rank"),
                "host": str(r.get("host") or ""),
                "section": str(r.get("section") or e.get("section") or ""),
                "frame": str(r.get("frame") or ""),
            }
            for r in e.get("ranks") or []
            if isinstance(r, dict)
        ]
        out.append(
            {
                "step": ev.step(e),
                "time": e.get("time"),
                "job_id": e.get("job_id"),
                "waited_in": e.get("waited_in"),
                "ranks": ranks,
            }  # fmt: skip
        )
    return out


# ---------------------------------------------------------------------------------------- render


def render(report: dict[str, Any]) -> list[str]:
    """The status lines: the costliest slow ranks (and their hosts when more than one rank was slow),
    and each hang. None on an even run."""
    slow, lines = report["stragglers"], []
    for i, r in enumerate(slow["ranks"][:SHOWN]):
        steps = (
            f"step {r['first_step']}"
            if r["first_step"] == r["last_step"]
            else f"steps {r['first_step']}-{r['last_step']}"
        )
        lines.append(
            f"{'stragglers' if i == 0 else '':<12} {_where(r)}: the others waited {goodput.duration(r['waited_s'])} "
            f"for it, {r['ratio']:.2f}x their median, in {r['section']} ({r['windows']} window(s), {steps})"
        )
    if len(slow["ranks"]) > SHOWN:
        lines.append(f"{'':<12} and {len(slow['ranks']) - SHOWN} more rank(s): see --json")
    if len(slow["ranks"]) > 1:
        hosts = "; ".join(
            f"{h['host'] or '?'} {goodput.duration(h['waited_s'])} (rank {', '.join(map(str, h['ranks']))})"
            for h in slow["hosts"][:SHOWN]
        )
        lines.append(f"  by host    {hosts}")
    for hang in report["hangs"]:
        lines += [
            f"{'hang':<12} step {hang['step']}: {_hung(r, hang.get('waited_in'))}" for r in hang["ranks"]
        ]
    return lines


def cell(slowest: Record | None) -> str:
    """The sweep view's cell for a task's costliest slow rank: rank, host and cost; blank for none."""
    if not slowest:
        return ""
    return f"r{slowest['rank']}@{slowest['host'] or '?'} {goodput.duration(slowest['waited_s'])}"


def _where(record: Record) -> str:
    return f"rank {record['rank']}" + (f" on {record['host']}" if record["host"] else "")


def _hung(record: Record, waited_in: str | None) -> str:
    arrived = (
        f"did not reach {waiting_for(waited_in)}" if waited_in else "hung past trainer.collective_timeout_s"
    )
    if not record["frame"]:
        return f"{_where(record)} {arrived}: it died or is frozen (it wrote no stack)"
    doing = (
        "waiting for its data loader" if record["section"] == "data" else f"in section {record['section']}"
    )
    return f"{_where(record)} {arrived}; it was {doing} at {record['frame']}"


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
