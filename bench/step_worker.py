"""One rank of the step-overhead benchmark (section 1); bench/step.py launches it on N ranks.

In one pair of processes it trains the same job several times, alternating variants (a spec's
`order`; a name other than A and B is a proposed patch from bench/patches.py):

  A  disttrain: `Trainer(cfg, detect(), hooks=[stamp]).fit()` — the real trainer, unmodified; the only
     addition is a hook whose before_step records a timestamp.
  B  plain: a hand-written torch DDP loop over gloo doing the same math: init via the pipeline's
     build_model after torch.manual_seed(seed), AdamW with the same parameter groups, the same LR
     schedule function, clip_grad_norm_, the same global sample order (disttrain.data.epoch_order),
     per-rank reseeding after the model is built exactly as the trainer does.

A step is the interval between consecutive before-step timestamps, so it includes everything the loop
does per step (hooks, agreement, cursor) and excludes the end-of-run eval. The first `warmup` steps of
every run are dropped. The first run in the process is also the memory measurement: the process's RSS
high-water mark before any other run adds to it (a fresh process per order, see bench/step.py).

Usage: python -m bench.step_worker SPEC.json OUT.json   (under bench.common.launch_ranks)
"""

from __future__ import annotations

import cProfile
import gc
import hashlib
import io
import json
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

from bench.common import rss_now_mib, rss_peak_mib


def _seed_all(seed: int) -> None:  # what the trainer's _seed_all does
    random.seed(seed)
    np.random.seed(seed % 2**32)
    import torch

    torch.manual_seed(seed)


def weights_sha256(model: Any) -> str:
    """sha256 over the state_dict's names and raw tensor bytes, in order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(dtype=_u8()).numpy().tobytes())
    return h.hexdigest()


def _u8() -> Any:
    import torch

    return torch.uint8


def load_cfg(spec: dict[str, Any], run_dir: str) -> Any:
    from disttrain.config import load_config

    fair = [
        f"run_dir={run_dir}", f"trainer.max_steps={spec['steps']}", "trainer.eval_every=0",
        f"trainer.log_every={10**9}", "trainer.progress=none", "checkpoint.every_steps=0",
        "checkpoint.save_final=false", "log.plot=false", "log.console=false", "resume=never",
    ]  # fmt: skip
    return load_config(spec.get("config"), [*spec.get("overrides", []), *fair])


# ------------------------------------------------------------------------------------ A: disttrain


def run_disttrain(
    cfg: Any, tick: Any = None, trainer_cls: Any = None
) -> tuple[list[float], list[float], str]:
    from disttrain.cluster import detect
    from disttrain.hooks import Hook
    from disttrain.trainer import Trainer

    stamps: list[float] = []
    cpu: list[float] = []

    class Stamp(Hook):
        def before_step(self, trainer: Any) -> None:
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
            if tick is not None:
                tick(len(stamps))

    trainer = (trainer_cls or Trainer)(cfg, detect(), hooks=[Stamp()])
    trainer.fit()
    digest = weights_sha256(trainer.accelerator.unwrap_model(trainer.model))
    del trainer
    return stamps, cpu, digest


# ------------------------------------------------------------------------------------ B: plain loop


class GlobalOrderBatches:
    """This rank's slice of each global batch, in disttrain's global order (grad_accum 1)."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, shuffle: bool):
        self.n, self.batch, self.rank, self.world, self.seed, self.shuffle = (
            n,
            batch,
            rank,
            world,
            seed,
            shuffle,
        )

    def __iter__(self):  # noqa: ANN204
        from disttrain.data import epoch_order

        micro, epoch = self.batch // self.world, 0
        while True:
            order = epoch_order(self.n, self.seed, epoch, self.shuffle)
            for begin in range(0, (self.n // self.batch) * self.batch, self.batch):
                yield order[begin + self.rank * micro : begin + (self.rank + 1) * micro].tolist()
            epoch += 1


class PlainLoop:
    """The baseline: a hand-written torch DDP loop, built and stepped exactly as the trainer does."""

    def __init__(self, cfg: Any):
        import torch
        import torch.distributed as tdist
        from torch.nn.parallel import DistributedDataParallel as DDP
        from torch.utils.data import DataLoader
        from torch.utils.data._utils.collate import default_collate

        from disttrain.optim import lr_factor
        from disttrain.pipelines import load_pipeline

        assert (
            cfg.trainer.grad_accum == 1 and cfg.optim.name == "adamw" and cfg.trainer.mixed_precision == "no"
        )
        if not tdist.is_initialized():
            tdist.init_process_group("gloo")
        rank, world = tdist.get_rank(), tdist.get_world_size()
        self.pipeline = load_pipeline(cfg.pipeline)
        train = self.pipeline.datasets()["train"]
        _seed_all(cfg.seed)
        self.model = self.pipeline.build_model()
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
        self.ddp = DDP(self.model)
        max_steps = cfg.trainer.max_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(cfg.scheduler, max_steps, s)
        )
        _seed_all(cfg.seed * 1000 + 1 + rank)
        sampler = GlobalOrderBatches(len(train), cfg.data.batch_size, rank, world, cfg.seed, cfg.data.shuffle)
        # A private generator: a DataLoader iterator otherwise draws its base seed from the global RNG,
        # which would shift the dropout stream (disttrain's make_loader does the same, for exact resume).
        loader = DataLoader(train, batch_sampler=sampler, collate_fn=default_collate,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        self.batches = iter(loader)
        self.clip = cfg.trainer.grad_clip
        self.clip_grad_norm_ = torch.nn.utils.clip_grad_norm_
        self.ddp.train()

    def step(self) -> None:
        loss = self.pipeline.loss(self.ddp, next(self.batches))
        loss.backward()
        if self.clip > 0:
            self.clip_grad_norm_(self.ddp.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()


def run_plain(cfg: Any, tick: Any = None) -> tuple[list[float], list[float], str]:
    loop = PlainLoop(cfg)
    stamps: list[float] = []
    cpu: list[float] = []
    for _ in range(cfg.trainer.max_steps):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        if tick is not None:
            tick(len(stamps))
        loop.step()
    return stamps, cpu, weights_sha256(loop.model)


# ------------------------------------------------------------------------------------ driver


def step_times(stamps: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]


def run_one(variant: str, spec: dict[str, Any], root: str, i: int, tick: Any = None) -> dict[str, Any]:
    """variant "B": the plain loop; "A": the stock trainer; another name: a patched trainer.
    Times are wall-clock ("times") and this process's CPU time, all threads ("cpu"), per step;
    "peak_rss_mib" is the process's RSS high-water mark when the last step starts (before the trainer's
    end-of-run eval, which the plain loop does not have)."""
    cfg = load_cfg(spec, os.path.join(root, f"{variant}{i}"))
    peak: list[float] = []

    def on_step(n: int) -> None:
        if n == cfg.trainer.max_steps:
            peak.append(rss_peak_mib())
        if tick is not None:
            tick(n)

    if variant == "B":
        stamps, cpu, digest = run_plain(cfg, on_step)
    else:
        stamps, cpu, digest = run_disttrain(
            cfg, on_step, trainer_class("stock" if variant == "A" else variant)
        )
    gc.collect()
    w = spec["warmup"]
    return {"variant": variant, "times": step_times(stamps, w), "cpu": step_times(cpu, w), "sha256": digest,
            "peak_rss_mib": peak[0], "peak_rss_end_mib": rss_peak_mib()}  # fmt: skip


def profile_one(variant: str, spec: dict[str, Any], root: str) -> dict[str, Any]:
    """cProfile the timed steps of one run (from the first timed step's start to the last's end, so
    setup and the end-of-run eval are left out); per-function time per step. The profiler inflates
    Python-heavy code: use it to rank what costs, the timings above for how much."""
    prof = cProfile.Profile()
    first, last = spec["warmup"] + 1, spec["steps"]  # stamp numbers bounding the timed steps

    def tick(n: int) -> None:
        if n == first:
            prof.enable()
        elif n == last:
            prof.disable()

    out = run_one(variant, spec, root, 999, tick)
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    funcs = {}
    for (file, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        funcs[f"{_short(file)}:{line}({name})"] = {"calls": nc, "tottime": tt, "cumtime": ct}
    return {"variant": variant, "steps": last - first, "funcs": funcs, "times": out["times"]}


def _short(file: str) -> str:
    for marker in ("site-packages/", "/disttrain/", "/bench/", "lib/python"):
        if marker in file:
            return (
                file.split(marker, 1)[1]
                if marker != "/disttrain/"
                else "disttrain/" + file.split(marker, 1)[1]
            )
    return file


def components(spec: dict[str, Any], root: str) -> list[dict[str, Any]]:
    """What the trainer's per-step extras cost, call by call, on the real objects after a run: each
    accelerate wrapper against the torch call it wraps (blocks of 50 calls, alternated, fastest of 9), and
    the stop agreement as it runs inside training (its hook timed at every step, median). Must run on all
    ranks."""
    import torch

    from disttrain.cluster import detect
    from disttrain.hooks import StopHook
    from disttrain.trainer import Trainer

    poll_times: list[float] = []

    class TimedStop(StopHook):
        def after_step(self, trainer: Any) -> None:
            t0 = time.perf_counter()
            super().after_step(trainer)
            poll_times.append(time.perf_counter() - t0)

    tr = Trainer(load_cfg(spec, os.path.join(root, "components")), detect())
    tr.hooks = [TimedStop() if isinstance(h, StopHook) else h for h in tr.hooks]
    tr.fit()
    acc, opt, model = tr.accelerator, tr.optimizer, tr.model
    batch = next(iter(tr._train_loader()))
    tr.pipeline.loss(model, batch).backward()  # gradients for clipping and stepping

    def accumulate() -> None:
        with acc.accumulate(model):
            pass

    hooks = [h for h in tr.hooks if not isinstance(h, StopHook)]
    pairs = [
        ("optimizer.step: accelerate wrapper vs torch", lambda: opt.step(), lambda: opt.optimizer.step()),
        ("optimizer.zero_grad: accelerate wrapper vs torch",
         lambda: opt.zero_grad(set_to_none=True), lambda: opt.optimizer.zero_grad(set_to_none=True)),
        ("clip_grad_norm_: accelerate vs torch",
         lambda: acc.clip_grad_norm_(model.parameters(), 1.0),
         lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)),
        ("model.train() every step (plain loop: once)", lambda: model.train(), lambda: None),
        ("accelerator.accumulate() context", accumulate, lambda: None),
        ("the other hooks' after_step (log, eval, checkpoint, progress)",
         lambda: [h.after_step(tr) for h in hooks], lambda: None),
    ]  # fmt: skip
    tr.step = 1  # a step where no hook is due
    out = []
    for label, fa, fb in pairs:
        da, db = [], []
        for _ in range(9):
            for f, acc_list in ((fa, da), (fb, db)):
                t0 = time.perf_counter()
                for _ in range(50):
                    f()
                acc_list.append((time.perf_counter() - t0) / 50)
        # the fastest block of each: other processes only ever add time (what timeit recommends)
        out.append({"component": label, "a_us": min(da) * 1e6, "b_us": min(db) * 1e6})
    w = spec["warmup"]
    out.append({"component": "stop agreement poll at each step (one async all-reduce), in training",
                "a_us": statistics.median(poll_times[w:]) * 1e6, "b_us": 0.0})  # fmt: skip
    for row in out:
        row["extra_us"] = row["a_us"] - row["b_us"]
    return out


def trainer_class(name: str) -> Any:
    """ "stock": disttrain's Trainer as it is; other names: a proposed patch (bench/patches.py)."""
    if name == "stock":
        from disttrain.trainer import Trainer

        return Trainer
    from bench import patches

    return patches.TRAINERS[name]


def separate_runs(spec: dict[str, Any], root: str, result: dict[str, Any]) -> None:
    """Whole runs A B A B (or B A B A); the first run of the process is the memory measurement."""
    for _ in range(spec["reps"]):
        for variant in spec["order"]:
            run = run_one(variant, spec, root, len(result["runs"]))
            result["runs"].append(run)
            if len(result["runs"]) == 1:
                result["memory"] = {"variant": variant, "peak_rss_mib": run["peak_rss_mib"],
                                    "peak_rss_end_mib": run["peak_rss_end_mib"],
                                    "rss_after_import_mib": result["rss_after_import_mib"]}  # fmt: skip


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    rank = int(os.environ.get("RANK", 0))
    if (spec.get("order") or ["A"])[0] != "B":
        import disttrain.trainer  # noqa: F401 - what a disttrain run imports
    else:
        import torch.nn.parallel  # noqa: F401

        import disttrain.optim  # noqa: F401
        import disttrain.pipelines  # noqa: F401
    result: dict[str, Any] = {"rank": rank, "runs": [], "profile": []}
    result["rss_after_import_mib"] = rss_now_mib()
    with tempfile.TemporaryDirectory(prefix="bench-step-") as root:
        separate_runs(spec, root, result)
        if spec.get("components"):
            result["components"] = components(spec, root)
        if spec.get("profile_steps"):
            pspec = {**spec, "steps": spec["profile_steps"]}
            if rank == 0:
                result["profile"] = [profile_one(v, pspec, root) for v in "ABAB"]
            else:  # the other ranks run the same collectives, unprofiled
                for v in "ABAB":
                    run_one(v, pspec, root, 999)
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
