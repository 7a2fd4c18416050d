"""Trainer construction, fresh vs resumed, in one process (no imports or interpreter start in the
figure, so the noise of a shared machine's process start-up stays out): alternately build
`Trainer(cfg)` on an empty run_dir and on one holding a checkpoint, and time CheckpointManager.load()
of that checkpoint after each, and latest_verified() (the full verification a resume runs before
loading). The page cache is dropped before each resume, load and verification.

Usage: python -m bench.resume_worker SPEC.json OUT.json
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time

from bench.ckpt import drop_cache, manager


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    from disttrain.cluster import detect
    from disttrain.config import load_config
    from disttrain.trainer import Trainer

    src, root = spec["checkpointed_run_dir"], spec["root"]

    out: dict[str, list[float]] = {
        "fresh": [],
        "resumed": [],
        "load": [],
        "verify": [],
    }
    for i in range(spec["reps"] + 1):  # the first round warms up lazy initialisation; dropped below
        fresh_dir = os.path.join(root, f"ctor_fresh{i}")
        cfg = load_config(spec["config"], [*spec["overrides"], f"run_dir={fresh_dir}"])
        t0 = time.perf_counter()
        trainer = Trainer(cfg, detect())
        out["fresh"].append(time.perf_counter() - t0)
        assert trainer.resumed_from is None
        del trainer
        gc.collect()
        shutil.rmtree(fresh_dir, ignore_errors=True)
        drop_cache(src)
        cfg = load_config(spec["config"], [*spec["overrides"], f"run_dir={src}"])
        t0 = time.perf_counter()
        trainer = Trainer(cfg, detect())
        out["resumed"].append(time.perf_counter() - t0)
        assert trainer.resumed_from == spec["step"], trainer.resumed_from
        del trainer
        gc.collect()
        drop_cache(src)
        t0 = time.perf_counter()
        manager(src).load(spec["step"])
        out["load"].append(time.perf_counter() - t0)
        drop_cache(src)
        t0 = time.perf_counter()
        manager(src).latest_verified()  # what a resume runs before load(): read and hash every file
        out["verify"].append(time.perf_counter() - t0)
        gc.collect()
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump({k: v[1:] for k, v in out.items()}, fh)


if __name__ == "__main__":
    main(*sys.argv[1:3])
