"""Test stages: every test belongs to the stage of its folder under tests/ (unit, multiproc, storage,
cluster, ...), carries that stage as a marker (`-m multiproc` runs one stage), and runs in stage order
(cheap and fast first, so a broken unit fails before the slow suites start). The terminal summary has
one line per stage: tests, outcomes and wall time. CI runs README's one test command and reads these.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# Order of the stages; a folder not listed runs after these, in name order.
ORDER = ("unit", "multiproc", "storage", "cluster", "adversarial", "gpu")


def stage_of(path: Path) -> str:
    rel = Path(path).resolve().relative_to(TESTS)
    return rel.parts[0] if len(rel.parts) > 1 else "unit"


def _rank(stage: str) -> tuple[int, str]:
    return (ORDER.index(stage) if stage in ORDER else len(ORDER), stage)


class _Clock:
    def __init__(self) -> None:
        self.span: dict[str, list[float]] = {}
        self.outcomes: dict[str, Counter] = defaultdict(Counter)
        self.current: str | None = None


_CLOCK = _Clock()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(getattr(pytest.mark, stage_of(item.path)))
    items.sort(key=lambda item: _rank(stage_of(item.path)))  # stable: file order kept inside a stage


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    stage = stage_of(TESTS.parent / location[0])
    now = time.monotonic()
    _CLOCK.span.setdefault(stage, [now, now])
    _CLOCK.current = stage


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    stage = stage_of(TESTS.parent / report.location[0])
    if stage in _CLOCK.span:
        _CLOCK.span[stage][1] = time.monotonic()
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _CLOCK.outcomes[stage][report.outcome] += 1


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _CLOCK.span:
        return
    terminalreporter.section("stages")
    for stage in sorted(_CLOCK.span, key=_rank):
        start, end = _CLOCK.span[stage]
        counts = ", ".join(f"{n} {what}" for what, n in sorted(_CLOCK.outcomes[stage].items()))
        terminalreporter.write_line(f"{stage:<12} {end - start:7.1f} s   {counts}")
