"""Rank 0's plain files in the run dir (config.yaml, test_metrics.json) and the lines it prints.

The trainer writes through one of these and never asks which rank it is on: rank 0 gets RunFiles,
every other rank NullRunFiles (DESIGN §9, "decide rank roles once").
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import yaml

from disttrain import dist, fs
from disttrain.config import Config, dump_yaml, to_dict
from disttrain.rundir import TEST_METRICS, RunDir


class RunFiles:
    def __init__(self, run_dir: str):
        self.layout = RunDir(run_dir)

    def create(self) -> None:
        fs.makedirs(self.layout.path)

    def write_config(self, cfg: Config) -> list[str]:
        """Write config.yaml; returns `key: old -> new` for every key that differs from the one an
        earlier segment wrote (empty on a fresh run)."""
        changes = self._changes(cfg)
        fs.atomic_write(self.layout.config, dump_yaml(cfg))
        return changes

    def _changes(self, cfg: Config) -> list[str]:
        if not fs.exists(self.layout.config):
            return []
        old = self._earlier_config()
        if old is None:
            return []
        new = flatten(to_dict(cfg))
        keys = sorted(set(old) | set(new))
        return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]

    def _earlier_config(self) -> dict[str, Any] | None:
        """The config an earlier segment wrote, flattened; None when it is damaged (not YAML, not a
        mapping: a hand edit, a torn copy). A damaged one is set aside, never fatal: it only feeds the
        `config changed` note, and keys a checkpoint depends on are checked against its manifest."""
        try:
            old = yaml.safe_load(fs.read_text(self.layout.config))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            problem = f"is not YAML ({fs.first_line(err)})"
        else:
            if isinstance(old, dict) or old is None:
                return flatten(old or {})
            problem = f"holds a {type(old).__name__}, not a mapping of config keys"
        aside = f"{self.layout.config}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        fs.rename(self.layout.config, aside)
        self.warn(
            f"disttrain: warning: {self.layout.config} {problem}; set aside as {fs.basename(aside)} and "
            "written anew (changes since the checkpoint cannot be listed this once)"
        )
        return None

    def write_test_metrics(self, record: dict[str, Any]) -> None:
        self.create()
        fs.atomic_write(self.layout.file(TEST_METRICS), json.dumps(record, indent=2) + "\n")

    def say(self, text: str) -> None:
        print(text, flush=True)

    def warn(self, text: str) -> None:
        """A line for the operator (requeue decisions and the like): stderr, the job's .err log."""
        print(text, file=sys.stderr, flush=True)


class NullRunFiles(RunFiles):
    """What ranks other than 0 write to: nothing."""

    def create(self) -> None:
        pass

    def write_config(self, cfg: Config) -> list[str]:
        return []

    def write_test_metrics(self, record: dict[str, Any]) -> None:
        pass

    def say(self, text: str) -> None:
        pass

    def warn(self, text: str) -> None:
        pass


def build_run_files(run_dir: str) -> RunFiles:
    return RunFiles(run_dir) if dist.is_main() else NullRunFiles(run_dir)


def flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config data as {"dotted.key": value}; `pipeline.args` stays one value."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and key != "args":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
