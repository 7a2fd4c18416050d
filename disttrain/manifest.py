"""A checkpoint's manifest.json (DESIGN §4), the record that makes a step directory a checkpoint: its
shape, the one validated reader, and the fields readers take from it. Torch-free: `disttrain status`
and the run's preflight read manifests on a login node; ckpt_format writes them and verifies the files
they list.

    {"format": 1 | 2, "step", "time", "world_size", "config_hash", "fingerprint" {resume-critical keys},
     "versions", "num_threads", ["strategy", "layout" (format 2: every sharded tensor's shards)],
     "files": {name: {"bytes", "sha256"}}}
"""

from __future__ import annotations

import json
import time
from typing import Any

from disttrain import fs
from disttrain.errors import CheckpointError
from disttrain.rundir import MANIFEST

Manifest = dict[str, Any]
FILES = ("model.safetensors", "state.pt", "ranks.pt")  # a replicated (format 1) checkpoint's files
FORMAT = 1


def build(step: int, world_size: int, files: dict[str, Any], meta: dict[str, Any]) -> Manifest:
    """The manifest of a step directory: what it is (step, time, world size, and `meta`: config hash,
    fingerprint, versions, thread count, a sharded layout) and the size and sha256 of every file."""
    return {
        "format": FORMAT,
        "step": step,
        "time": time.time(),
        "world_size": world_size,
        **meta,
        "files": files,
    }


def read(path: str) -> Manifest:
    """The manifest of the checkpoint (step directory) at `path`, checked for shape; raises
    CheckpointError naming the file and what is wrong with it."""
    where = fs.join(path, MANIFEST)
    try:
        m = json.loads(fs.read_text(where))
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing, so {path} is not a committed checkpoint") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{where}: unreadable ({err})") from None
    found = problem(m)
    if found is not None:
        raise CheckpointError(f"{where}: {found}")
    return m


def problem(m: Any) -> str | None:
    """What makes `m` not a disttrain manifest, or None."""
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
        return "not a disttrain manifest (no files table)"
    if not all(isinstance(m.get(key), (int, float)) for key in ("step", "time", "world_size")):
        return "step, time or world_size is missing or not a number"
    required = required_files(m)
    if any(name not in m["files"] for name in required):
        return f"does not list all of {', '.join(required)}"
    tie = bad_tie(m)
    if tie is not None:
        return tie
    for name, meta in m["files"].items():
        if "/" in name or name.startswith(".") or not isinstance(meta, dict):
            return f"bad file entry {name!r}"
        if not isinstance(meta.get("bytes"), int) or not isinstance(meta.get("sha256"), str):
            return f"file entry {name!r} lacks bytes or sha256"
    return None


def required_files(m: Manifest) -> list[str]:
    """The files a manifest must list: the replicated format's three, or state, ranks and every shard."""
    if int(m.get("format", 1)) < 2:
        return list(FILES)
    layout = m.get("layout")
    entries = layout.values() if isinstance(layout, dict) else []
    shards = {s["file"] for e in entries if isinstance(e, dict) for s in e.get("shards", [])}
    return ["state.pt", "ranks.pt", *sorted(shards)]


def bad_tie(m: Manifest) -> str | None:
    """A sharded layout's tie record (alias -> the tensor it is saved as, ckpt_sharded) must name a
    model tensor the layout holds."""
    layout = m.get("layout")
    if int(m.get("format", 1)) < 2 or not isinstance(layout, dict):
        return None
    for alias, entry in layout.items():
        if not (isinstance(entry, dict) and "tied_to" in entry):
            continue
        target = layout.get(entry["tied_to"]) if isinstance(entry["tied_to"], str) else None
        if not (str(alias).startswith("model/") and isinstance(target, dict) and "shards" in target):
            return f"layout entry {alias!r} is tied to {entry['tied_to']!r}, which the layout does not hold"
    return None


def total_bytes(m: Manifest) -> int:
    """The size of every file the (validated) manifest lists."""
    return sum(int(f["bytes"]) for f in m["files"].values())


def fingerprint(m: Manifest) -> dict[str, Any]:
    """The resume-critical config values the checkpoint was saved with (config.resume_fingerprint)."""
    return dict(m.get("fingerprint") or {})
