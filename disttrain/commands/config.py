"""`disttrain config`: every config key with its default and one-line meaning (the README's reference)."""

from __future__ import annotations

from collections.abc import Sequence

from disttrain.config import field_docs


def reference_table() -> str:
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, doc in field_docs():
        rows.append(f"| `{key}` | `{default!r}` | {doc} |")
    return "\n".join(rows) + "\n"


def main(argv: Sequence[str]) -> int:
    print(reference_table(), end="")
    return 0
