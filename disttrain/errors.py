"""The errors every layer raises for the entry points to map, and the exit codes they map to (DESIGN §9:
errors carry a hint and become exit codes at the entry point: 2 for bad input, 1 for failure).

Stdlib only: the lowest layer, so `config`, the launcher and the checkpoint code can all raise these
without importing each other (or torch).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # the run (or the submission) failed: see its one-line error and events.jsonl
EXIT_BAD_INPUT = 2  # refused before anything was created or submitted


class ConfigError(ValueError):
    """Bad user input; the entry point prints the message on one line and exits with code 2."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, read or trusted; the message names the file and the problem."""
