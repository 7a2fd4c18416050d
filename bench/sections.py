"""Sections of bench/RESULTS.md that other commands own (`python -m bench.goodput`, `python -m
bench.startup`): each lives between `<!-- KEY:start -->` and `<!-- KEY:end -->`, is replaced in place by
its own command, and is carried over unchanged when `python -m bench` rewrites the rest."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- {key}:start -->", f"<!-- {key}:end -->"


def replace_section(path: str | Path, key: str, body: str) -> None:
    """Put `body` between KEY's markers in the file (appended at the end the first time)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    start, end = _markers(key)
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    path.write_text(text.rstrip() + "\n", encoding="utf-8")


def owned_sections(path: str | Path) -> str:
    """Every marked section of the file, as text to append to a rewritten report ('' if none)."""
    path = Path(path)
    if not path.exists():
        return ""
    found = re.finditer(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", path.read_text(encoding="utf-8"), re.S)
    return "\n\n".join(match.group(0) for match in found)


def write_owned(
    out: str | Path, sec: Any, info: dict[str, Any], command: str, seconds: float, extra: str = ""
) -> None:
    """A command's own section of RESULTS.md: its title, one line saying when, where, what and how long
    (`extra` appended), and its table."""
    from bench.report import TABLE_HEAD, _row_line

    head = (
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {info['nproc']} CPUs "
        f"({info['cpu_model']}, no GPU), torch {info['torch']}, commit {info['git_commit']}; "
        f"`{command}`, {seconds:.0f} s; load average "
        f"{'/'.join(f'{x:.2f}' for x in info['load_avg_at_start'])} at start.{extra}"
    )
    table = "\n".join([*TABLE_HEAD, *(_row_line(r) for r in sec.rows)])
    replace_section(out, sec.key, f"## {sec.title}\n\n{head}\n\n{table}")
