"""Which rank is slow, on which host, at what, and what it costs (DESIGN §7b), from the section timings
every rank's log window carries (`sections`): no collective of its own.

Per window, on rank 0: each rank's *busy* time is what it spends without waiting for a peer (data,
forward, optimizer; backward holds the gradient all-reduce, where the others wait for a slow rank). The
slowest rank's busy time against the median of the others' is its ratio; the difference is what the
others spent waiting for it (`train/slowest_*` metrics, logged every window). A rank that stays at least
`trainer.straggler_ratio` times the others for `trainer.straggler_windows` windows in a row is a
straggler: a `straggler` event names it, its host and section, the ratio, and the seconds the others
waited. While it stays slow, further events carry the waiting of the windows since the last one, so
their sum is the run's cost (`disttrain status`, goodput).

A host whose rank was slow in most of a segment's windows (`SLOW_NODE_SHARE`) is a slow node: with
`disttrain submit --exclude-slow-nodes`, the next requeue leaves it out (`stop.after_stop`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from disttrain import events as ev
from disttrain.sections import BUSY, SECTIONS
from disttrain.writers import EventLog

_BUSY = [SECTIONS.index(name) for name in BUSY]
SLOW_NODE_SHARE = 0.8  # of a segment's windows a host's rank must be slow in to be left out of a requeue


@dataclass(frozen=True)
class Slowest:
    """The slowest rank of one window."""

    rank: int
    section: str  # the busy section where it lost the most against the others
    ratio: float  # its busy time / the median of the other ranks'
    waited_s: float  # its busy time minus that median: what the others waited for it


def slowest(per_rank: list[list[float]]) -> Slowest | None:
    """The slowest rank of a window of per-rank section seconds (rows in SECTIONS order); None with
    fewer than two ranks or no busy time."""
    if len(per_rank) < 2:
        return None
    busy = [sum(row[i] for i in _BUSY) for row in per_rank]
    rank = max(range(len(busy)), key=busy.__getitem__)
    others = [row for r, row in enumerate(per_rank) if r != rank]
    median = statistics.median(busy[r] for r in range(len(busy)) if r != rank)
    if busy[rank] <= 0:
        return None
    excess = {SECTIONS[i]: per_rank[rank][i] - statistics.median(row[i] for row in others) for i in _BUSY}
    section = max(excess, key=excess.__getitem__)
    ratio = busy[rank] / median if median > 0 else float("inf")
    return Slowest(rank, section, ratio, max(0.0, busy[rank] - median))


@dataclass
class _Streak:
    rank: int
    windows: int = 0
    waited_s: float = 0.0  # not yet reported
    ratios: list[float] = field(default_factory=list)
    sections: dict[str, float] = field(default_factory=dict)
    confirmed: bool = False


class Stragglers:
    """Rank 0's straggler verdicts across windows (every other rank holds one too and records nothing:
    the event log is a null writer there)."""

    def __init__(self, hosts: list[str], ratio: float, windows: int, events: EventLog):
        self.hosts, self.ratio, self.windows, self.events = hosts, ratio, windows, events
        self._streak: _Streak | None = None
        self.judged = 0  # windows of this segment with a verdict
        self.slow: dict[int, int] = {}  # rank -> windows of this segment it was slow in

    def window(self, step: int, per_rank: list[list[float]]) -> dict[str, float]:
        """The window's `train/slowest_*` metrics; records a straggler once it is one. Rank 0's call
        decides; the same numbers reach every rank, so every rank could."""
        found = slowest(per_rank)
        if found is None:
            return {}
        self.judged += 1
        if found.ratio >= self.ratio:
            self.slow[found.rank] = self.slow.get(found.rank, 0) + 1
        self._judge(step, found)
        return {
            "train/slowest_rank": float(found.rank),
            "train/slowest_ratio": found.ratio,
            "train/slowest_wait_s": found.waited_s,
        }

    def _judge(self, step: int, found: Slowest) -> None:
        streak = self._streak
        if found.ratio < self.ratio or (streak is not None and streak.rank != found.rank):
            self.flush(step)
            streak = None
        if found.ratio < self.ratio:
            return
        if streak is None:
            streak = self._streak = _Streak(found.rank)
        streak.windows += 1
        streak.waited_s += found.waited_s
        streak.ratios.append(found.ratio)
        streak.sections[found.section] = streak.sections.get(found.section, 0.0) + found.waited_s
        if streak.windows % self.windows == 0:  # confirmed, and every `windows` windows while it lasts
            streak.confirmed = True
            self._record(step, streak)

    def flush(self, step: int) -> None:
        """Record what a confirmed straggler cost since its last record (a streak ends, the segment ends)."""
        streak, self._streak = self._streak, None
        if streak is not None and streak.confirmed and streak.ratios:
            self._record(step, streak)

    def _record(self, step: int, streak: _Streak) -> None:
        section = max(streak.sections, key=streak.sections.__getitem__)
        self.events.emit(
            ev.STRAGGLER,
            step=step,
            rank=streak.rank,
            host=self.hosts[streak.rank] if streak.rank < len(self.hosts) else "",
            section=section,
            ratio=round(statistics.median(streak.ratios), 3),
            waited_s=round(streak.waited_s, 4),
            windows=len(streak.ratios),
        )
        streak.waited_s, streak.ratios, streak.sections = 0.0, [], {}

    def slow_hosts(self, share: float = SLOW_NODE_SHARE) -> list[str]:
        """The hosts whose rank was slow in at least `share` of this segment's windows, and in at least
        trainer.straggler_windows of them (a short segment names nobody). The same on every rank: the
        section rows reach every rank."""
        need = max(self.windows, share * self.judged)
        ranks = [rank for rank, n in sorted(self.slow.items()) if n >= need and rank < len(self.hosts)]
        return sorted({self.hosts[rank] for rank in ranks})
