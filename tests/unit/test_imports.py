"""The import structure DESIGN §2 asks for and lint-imports cannot see: no import cycle among disttrain's
modules (imports inside functions included: a lazy import is still a dependency), no command module
that another module uses as its library, and login-node commands that import no torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from disttrain.cli import COMMANDS
from tests.conftest import REPO, child_env

PACKAGE = REPO / "disttrain"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The disttrain modules `path` imports anywhere in its body (not under `if TYPE_CHECKING:`, which
    never runs). `from pkg import name` counts as pkg.name when that is a module, else as pkg."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.update(
                    f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in known else child.module
                    for a in child.names
                )
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name in known}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(path, known) - {name} for name, path in known.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start)):
            return found
    return None


def test_no_import_cycle_lazy_imports_included():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()) or [])


def test_the_cycle_finder_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    graph = _graph()
    graph["disttrain.errors"] = {"disttrain.commands.status"}  # what one lazy import there would do
    assert _cycle(graph) is not None


def test_no_command_is_another_modules_library():
    """`disttrain X` modules (cli.COMMANDS) are entry points: shared code lives in a module of its own."""
    commands = {module for module, _ in COMMANDS.values()}
    users = {name: deps & commands for name, deps in _graph().items() if deps & commands}
    assert not users, users  # cli itself imports them by name, with importlib


def test_login_node_commands_import_no_torch(tmp_path):
    """`disttrain status` (a run and a sweep) and `submit --wait`'s event reading answer on a login node
    without torch (DESIGN §2)."""
    run_dir = tmp_path / "sweep" / "seed=1"
    run_dir.mkdir(parents=True)
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({"tasks": [{"name": "seed=1", "job_id": ""}]}))
    records = [{"time": 1.0, "event": "start", "step": 0}, {"time": 2.0, "event": "finish", "step": 5}]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code = (
        "import io, sys\n"
        "from disttrain import cli\n"
        "from disttrain.launch.follow import EventTail, _verdict\n"
        f"assert cli.main(['status', {str(run_dir)!r}]) == 0\n"
        f"assert cli.main(['status', {str(tmp_path / 'sweep')!r}, '--json']) == 0\n"
        f"assert _verdict(EventTail({str(run_dir)!r}), 'COMPLETED', io.StringIO()) == 0\n"
        "heavy = [m for m in ('torch', 'disttrain.dist', 'disttrain.trainer') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
