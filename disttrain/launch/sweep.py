"""Sweeps: from `--sweep KEY=V1,V2` axes and a `--sweep-file` of explicit rows to the list of tasks of one
SLURM job array, each with its overrides and its own run dir under the sweep dir (what the sweep dir
then holds, sweep.json and the task run dirs, is disttrain.sweepdir's).

Stdlib + yaml only (no torch, no submitit): `--dry-run` and `disttrain status SWEEP_DIR` answer at once on
a login node. Bad input raises ConfigError with one line that names the flag and says what to write.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from disttrain.config import parse_override, plain_value
from disttrain.errors import ConfigError
from disttrain.secrets import is_secret_key

# Keys a sweep may not vary: the sweep dir decides each task's run_dir.
UNSWEEPABLE = ("run_dir",)
MAX_NAME_CHARS = 120  # a run dir's name stays well under the 255 bytes filesystems allow
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-\[\]]")


@dataclass(frozen=True)
class Task:
    """One combination: its index in the array, the overrides it adds, and its run dir's name."""

    index: int
    overrides: tuple[str, ...]
    name: str


# ------------------------------------------------------------------------------------ the spec


def split_values(text: str) -> list[str]:
    """`1e-3,3e-4` -> ["1e-3", "3e-4"]; commas inside [...] or {...} stay (`[0.9,0.95],[0.8,0.9]`)."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return values + [current]


def parse_axis(text: str) -> tuple[str, list[str]]:
    """`optim.lr=1e-3,3e-4` -> ("optim.lr", ["1e-3", "3e-4"]). Raises ConfigError."""
    key, sep, rest = text.partition("=")
    key = key.strip()
    example = "e.g. --sweep optim.lr=1e-3,3e-4"
    if not sep or not key:
        raise ConfigError(f"--sweep {text!r}: write KEY=VALUE1,VALUE2,... ({example})")
    values = [v.strip() for v in split_values(rest)]
    if not rest.strip() or any(not v for v in values):
        raise ConfigError(f"--sweep {text!r}: an empty value; give comma-separated values ({example})")
    for i, value in enumerate(values):
        twin = next((v for v in values[:i] if _same(_parsed(v), _parsed(value))), None)
        if twin is not None:
            same = "" if twin == value else f" ({twin!r} and {value!r} are the same value)"
            raise ConfigError(f"--sweep {text!r}: a value is given twice{same}; list each value once")
    return key, values


def _parsed(text: str) -> Any:
    """A swept value as the config reads it: YAML, with `1e-3` a number (config.plain_value)."""
    return plain_value(parse_override(f"x={text}")[1])


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: 1e-3 == 0.001 == 1.0e-3 and 1 == 1.0, but true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


def read_sweep_file(path: str) -> list[dict[str, str]]:
    """A YAML list of mappings, one per task: `- {optim.lr: 1.0e-3, seed: 1}`. Values as override text."""
    if not os.path.isfile(path):
        raise ConfigError(
            f"--sweep-file {path!r} not found: give a YAML list such as `- {{optim.lr: 1.0e-3}}`"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            rows = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"--sweep-file {path}: malformed YAML ({str(err).splitlines()[0]}); fix the file"
        ) from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and r for r in rows):
        raise ConfigError(
            f"--sweep-file {path}: expected a non-empty list of mappings, one per task, such as "
            "`- {optim.lr: 1.0e-3, seed: 1}`"
        )
    return [{str(k): _override_text(v) for k, v in row.items()} for row in rows]


def _override_text(value: Any) -> str:
    """A YAML value as the text of an override that reads back as the same value."""
    if isinstance(value, str) and yaml.safe_load(value) == value:
        return value
    return json.dumps(value, separators=(",", ":"))  # JSON is YAML: types survive ("1" stays a string)


def expand(
    axes: Sequence[str], file_rows: Sequence[dict[str, str]] = (), base: Sequence[str] = ()
) -> list[Task]:
    """Every task of a sweep: the rows of the sweep file (or one empty row) crossed with the cartesian
    product of the axes, in that order. `base` is the plain overrides, which a sweep may not repeat.
    Raises ConfigError for a spec that cannot be one job array."""
    parsed = [parse_axis(a) for a in axes]
    keys = [k for k, _ in parsed]
    row_keys = list(dict.fromkeys(k for row in file_rows for k in row))
    _check_keys(keys, row_keys, base)
    tasks: list[Task] = []
    for row in file_rows or [{}]:
        for combo in itertools.product(*(values for _, values in parsed)):
            overrides = tuple(f"{k}={v}" for k, v in [*row.items(), *zip(keys, combo)])
            tasks.append(Task(len(tasks), overrides, task_name(overrides)))
    _check_names(tasks)
    return tasks


def _check_keys(axis_keys: list[str], row_keys: list[str], base: Sequence[str]) -> None:
    repeated = sorted({k for k in axis_keys if axis_keys.count(k) > 1} | (set(axis_keys) & set(row_keys)))
    if repeated:
        raise ConfigError(f"{repeated[0]} is swept twice (--sweep or --sweep-file); give its values once")
    base_keys = {item.partition("=")[0].strip() for item in base}
    for key in axis_keys + row_keys:
        if key in UNSWEEPABLE:
            raise ConfigError(f"--sweep {key}: the sweep decides each task's {key} (SWEEP_DIR/<overrides>)")
        if is_secret_key(key):
            raise ConfigError(
                f"--sweep {key}: a secret cannot be swept (it would name a run dir); pass it as one override"
            )
        if key in base_keys:
            raise ConfigError(f"{key} is both swept and given as an override; drop one of them")


def task_name(overrides: Sequence[str]) -> str:
    """The run dir name of a task: its overrides, `optim.lr=1e-3,seed=1`, with characters a shell or a
    filesystem would trip on replaced by `_`; a long one is cut and keeps a hash of the whole."""
    name = _UNSAFE.sub("_", ",".join(overrides)) or "base"
    if len(name) > MAX_NAME_CHARS:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME_CHARS - 9]}-{digest}"
    return name


def _check_names(tasks: list[Task]) -> None:
    seen: dict[str, Task] = {}
    for task in tasks:
        if task.name in seen:
            raise ConfigError(
                f"sweep tasks {seen[task.name].index} and {task.index} would share the run dir {task.name!r}; "
                "give each combination once"
            )
        seen[task.name] = task
