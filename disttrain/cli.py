"""The `disttrain` command: `disttrain train|ckpt|status|plot|submit|config ...`.

Subcommands import lazily so `disttrain --help` and `disttrain status` stay fast on a login node.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "train": ("disttrain.main", "train a config (same as python -m disttrain.main)"),
    "ckpt": ("disttrain.commands.ckpt", "list, verify and export checkpoints of a run dir"),
    "status": (
        "disttrain.commands.status",
        "state, progress, checkpoints and requeue history of a run (or each task of a sweep)",
    ),
    "plot": (
        "disttrain.commands.plot",
        "draw the curves of a run, or overlay several runs or a sweep, as a PNG",
    ),
    "submit": ("disttrain.launch.submit", "submit a run to SLURM through submitit"),
    "config": ("disttrain.commands.config", "print every config key with its default and meaning"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<8} {doc}" for name, (_, doc) in COMMANDS.items())
    return f"usage: disttrain COMMAND [ARGS]\n\ncommands:\n{rows}\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(
            f"disttrain: error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as err:
        print(f"disttrain: error: `{name}` is not available in this install ({err})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
