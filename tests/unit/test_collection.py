"""A test that never runs protects nothing: README's test command must collect every test module
under tests/ (pytest silently skips folders named like `dist` or `build`; the whole multi-process
suite once sat unrun in tests/dist/)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

from tests.conftest import REPO, child_env


def readme_test_command() -> list[str]:
    """The pytest part of README's Quick start test line (`pip install ... && python -m pytest ...`)."""
    out = subprocess.run(
        [sys.executable, ".ci/quickstart.py", "test"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    pytest_part = out.stdout.strip().split("&&")[-1]
    argv = shlex.split(pytest_part)
    assert argv[:3] == ["python", "-m", "pytest"], (
        f"README's test command does not end in python -m pytest: {out.stdout}"
    )
    return [sys.executable, *argv[1:]]


def test_readme_test_command_collects_every_test_module():
    on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / "tests").rglob("test_*.py")}
    on_disk = {p for p in on_disk if "/experiments/" not in p}  # scripts run by hand, documented in NOTES.md
    proc = subprocess.run(
        [*readme_test_command(), "--collect-only", "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = {re.split(r"::", line)[0] for line in proc.stdout.splitlines() if "::" in line}
    missing = sorted(on_disk - collected)
    assert not missing, f"README's test command does not collect {missing}"
    assert len(on_disk) > 20  # the walk itself found the suite


def test_every_stage_folder_has_a_marker():
    """`-m STAGE` selects a folder's tests; a folder without a registered marker would warn or vanish."""
    import tomllib

    markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    names = {m.split(":")[0] for m in markers}
    folders = {p.name for p in (REPO / "tests").iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert folders <= names, f"folders without a stage marker: {sorted(folders - names)}"
