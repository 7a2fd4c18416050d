"""A deliberately slow filesystem for tests, and an entry point that trains on it (no tests here).

`slowfile:///abs/path` is the local filesystem through fsspec, except that writing a checkpoint's
weights for step N first sleeps SLOWFS_DELAYS[N] seconds (`SLOWFS_DELAYS="8:6,12:40"`): a save as slow
as a congested parallel filesystem or object store, without FUSE. Being a URL, the run dir takes
disttrain's object-store path (files written in place, the manifest last).

    python -m tests.multiproc.slowfs run_dir=slowfile:///tmp/x ...   # = python -m disttrain.main, on it
"""

from __future__ import annotations

import os
import re
import sys
import time

import fsspec
from fsspec.implementations.local import LocalFileSystem

WEIGHTS = re.compile(r"/checkpoints/step_(\d+)[^/]*/model\.safetensors$")


def delays() -> dict[int, float]:
    pairs = (item.split(":") for item in os.environ.get("SLOWFS_DELAYS", "").split(",") if item)
    return {int(step): float(seconds) for step, seconds in pairs}


class SlowFileSystem(LocalFileSystem):
    protocol = ("slowfile",)

    def _open(self, path, mode="rb", **kwargs):
        match = WEIGHTS.search(path)
        if "w" in mode and match:
            time.sleep(delays().get(int(match.group(1)), 0.0))
        return super()._open(path, mode=mode, **kwargs)


def main() -> int:
    fsspec.register_implementation("slowfile", SlowFileSystem, clobber=True)
    from disttrain.main import main as train

    return train(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
