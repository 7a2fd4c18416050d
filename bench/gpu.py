"""Section 6 (GPU, one device): `python -m bench --gpu`. Not run where there is no CUDA device.

  peak      the device's measured bf16 matmul rate: 8192^3 matmuls in a loop, timed with events.
  step      tiny_gpt as configs/tiny_gpt_gpu.yaml sizes it (12 layers, d_model 768, 1024 tokens, batch 64,
            bf16 autocast, fused AdamW, 2 loader workers): disttrain's Trainer (A) against a plain loop (B)
            doing the same (bf16 autocast, fused AdamW, clipping, the same sample order), alternated
            A B A B, eager; then both with torch.compile (one run each, after the eager pairs). A step
            is the wall time over the timed steps between two synchronize() calls, so the CPU may run
            ahead of the GPU as in real training. Tokens/s and model FLOPs utilisation (6N + 12·L·d·T
            FLOPs per token; N without the embeddings) against the measured peak.
  ckpt      the trained model's checkpoint state (weights + AdamW moments, on the GPU): sync save vs a raw
            write of the same bytes, async save's blocking time vs the sync save, load vs raw read.

`--gpu-smoke` runs the same code on the CPU with a toy model, to check the harness where no GPU is.
Usage as a worker: python -m bench.gpu SPEC.json OUT.json
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from bench.common import Row, Section, child_env, median, ratio_row, run_worker

GPU_CONFIG = "configs/tiny_gpt_gpu.yaml"
SMOKE_ARGS = ["pipeline.args.n_layer=1", "pipeline.args.d_model=64", "pipeline.args.n_head=2",
              "pipeline.args.block_size=32", "data.batch_size=8", "data.num_workers=0"]  # fmt: skip


# ------------------------------------------------------------------------------------ worker side


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_peak(device: Any, n: int, iters: int) -> float:
    """Dense bf16 matmul FLOP/s of this device (the MFU denominator)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best


def _cfg(spec: dict[str, Any], run_dir: str) -> Any:
    from bench.step_worker import load_cfg

    return load_cfg({**spec, "config": GPU_CONFIG}, run_dir)


def _window(stamps: list[float], warmup: int) -> float:
    return (stamps[-1] - stamps[warmup]) / (len(stamps) - 1 - warmup)


def run_trainer(cfg: Any, warmup: int, compile_model: bool) -> tuple[float, Any]:
    """Seconds per step of Trainer.fit over the steps after `warmup`; returns the trainer too."""
    from disttrain.cluster import detect
    from disttrain.hooks import Hook
    from disttrain.trainer import Trainer

    stamps: list[float] = []
    last = cfg.trainer.max_steps - 1  # the before_step of the last step closes the window

    class Stamp(Hook):
        def before_step(self, trainer: Any) -> None:
            if len(stamps) in (warmup, last):
                _sync(trainer.device)
            stamps.append(time.perf_counter())

    if compile_model:
        cfg.pipeline.target = "bench.gpu:CompiledTinyGPT"
    trainer = Trainer(cfg, detect(), hooks=[Stamp()])
    trainer.fit()
    return _window(stamps, warmup), trainer


def run_plain(cfg: Any, warmup: int, compile_model: bool, device: Any) -> float:
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data._utils.collate import default_collate

    from bench.step_worker import GlobalOrderBatches, _seed_all
    from disttrain.optim import lr_factor
    from disttrain.pipelines import load_pipeline

    pipeline = load_pipeline(cfg.pipeline)
    train = pipeline.datasets()["train"]
    _seed_all(cfg.seed)
    model = pipeline.build_model().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    fused = {"fused": True} if cfg.optim.fused and device.type == "cuda" else {}
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), **fused)
    steps = cfg.trainer.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg.scheduler, steps, s))
    _seed_all(cfg.seed * 1000 + 1)
    workers = cfg.data.num_workers
    loader = DataLoader(train, batch_sampler=GlobalOrderBatches(len(train), cfg.data.batch_size, 0, 1, cfg.seed,
                                                                cfg.data.shuffle),
                        num_workers=workers, collate_fn=default_collate, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(0))  # fmt: skip
    batches = iter(loader)
    net = torch.compile(model) if compile_model else model
    dtype = torch.bfloat16 if cfg.trainer.mixed_precision == "bf16" else torch.float32
    stamps: list[float] = []
    net.train()
    for i in range(steps - 1):  # the trainer's window also ends at the last step's start
        if i in (warmup, steps - 2):
            _sync(device)
        stamps.append(time.perf_counter())
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = pipeline.loss(net, (x, y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    _sync(device)
    stamps.append(time.perf_counter())
    return _window(stamps, warmup)


def model_flops_per_token(model: Any, cfg: Any) -> float:
    args = cfg.pipeline.args
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("tok.", "pos.")))
    return 6 * n + 12 * args["n_layer"] * args["d_model"] * args["block_size"]


def checkpoint_io(trainer: Any, reps: int, root: str) -> dict[str, list[float]]:
    from bench.ckpt import drop_cache, manager, raw_read_local, raw_write_local

    app, ranks = trainer.app_state(), trainer.rank_state()
    host = [t.detach().to("cpu") for t in _tensors(app)]
    out: dict[str, list[float]] = {k: [] for k in ("save", "raw_write", "async_block", "load", "raw_read")}
    out["bytes"] = [float(sum(t.numel() * t.element_size() for t in host))]
    for i in range(reps):
        d, raw = os.path.join(root, f"s{i}"), os.path.join(root, f"raw{i}.bin")
        mgr = manager(d)
        t0 = time.perf_counter()
        mgr.save(1, app, ranks, sync=True)
        out["save"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        raw_write_local(raw, host)
        out["raw_write"].append(time.perf_counter() - t0)
        amgr = manager(os.path.join(root, f"a{i}"), async_save=True)
        t0 = time.perf_counter()
        amgr.save(1, app, ranks, sync=False)
        out["async_block"].append(time.perf_counter() - t0)
        amgr.wait()
        drop_cache(d)
        t0 = time.perf_counter()
        mgr.load(1)
        out["load"].append(time.perf_counter() - t0)
        drop_cache(raw)
        t0 = time.perf_counter()
        raw_read_local(raw)
        out["raw_read"].append(time.perf_counter() - t0)
        for p in (d, os.path.join(root, f"a{i}")):
            shutil.rmtree(p)
        os.unlink(raw)
    return out


def _tensors(obj: Any) -> list[Any]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _compiled_tiny_gpt() -> Any:
    from disttrain.pipelines.tiny_gpt import TinyGPTPipeline

    class CompiledTinyGPT(TinyGPTPipeline):
        """tiny_gpt whose model is torch.compile'd (the trainer takes any nn.Module a pipeline builds)."""

        def build_model(self) -> Any:
            import torch

            return torch.compile(super().build_model())

    return CompiledTinyGPT


def __getattr__(name: str) -> Any:  # `pipeline.target: bench.gpu:CompiledTinyGPT`, built lazily
    if name == "CompiledTinyGPT":
        return _compiled_tiny_gpt()
    raise AttributeError(name)


def main(spec_path: str, out_path: str) -> None:
    import torch

    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    smoke = spec["smoke"]
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("bench --gpu: no CUDA device here (torch.cuda.is_available() is False)")
    device = torch.device("cpu" if smoke else "cuda")
    out: dict[str, Any] = {"device": "cpu (smoke)" if smoke else torch.cuda.get_device_name(0)}
    out["peak_flops"] = measure_peak(device, 256 if smoke else 8192, 5 if smoke else 50)
    warmup, reps = spec["warmup"], spec["reps"]
    base = {"overrides": [*(SMOKE_ARGS if smoke else []), f"trainer.cpu={str(smoke).lower()}",
                          "scheduler.warmup_steps=2"],
            "steps": warmup + spec["steps"] + 1}  # fmt: skip
    out["a"], out["b"], out["a_compiled"], out["b_compiled"] = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as root:
        trainer = None
        for i in range(reps):
            a, trainer = run_trainer(_cfg(base, os.path.join(root, f"a{i}")), warmup, False)
            out["a"].append(a)
            out["b"].append(run_plain(_cfg(base, os.path.join(root, f"b{i}")), warmup, False, device))
        cfg = _cfg(base, os.path.join(root, "flops"))
        out["flops_per_token"] = model_flops_per_token(trainer.accelerator.unwrap_model(trainer.model), cfg)
        out["tokens_per_step"] = cfg.data.batch_size * cfg.pipeline.args["block_size"]
        out["ckpt"] = checkpoint_io(trainer, spec["ckpt_reps"], root)
        del trainer
        if spec["compile"]:
            out["a_compiled"].append(run_trainer(_cfg(base, os.path.join(root, "ac")), warmup, True)[0])
            out["b_compiled"].append(run_plain(_cfg(base, os.path.join(root, "bc")), warmup, True, device))
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(out, fh)


# ------------------------------------------------------------------------------------ orchestrator


def run(quick: bool, smoke: bool = False, compile_model: bool = True) -> Section:
    sec = Section("gpu", "6. GPU: tiny_gpt_gpu throughput, MFU, step overhead, checkpoint I/O (one device)")
    spec = {"smoke": smoke, "warmup": 3 if smoke else 5, "steps": 4 if smoke else (10 if quick else 20),
            "reps": 2 if (smoke or quick) else 3, "ckpt_reps": 2, "compile": compile_model and not smoke}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        out = run_worker("bench.gpu", spec, tmp, child_env(OMP_NUM_THREADS="8"), timeout=1800)
    sec.extra.update(out)
    _gpu_rows(sec, out)
    return sec


def _gpu_rows(sec: Section, out: dict[str, Any]) -> None:
    peak, fpt, tps = out["peak_flops"], out["flops_per_token"], out["tokens_per_step"]
    sec.notes.append(f"device: {out['device']}; measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s; "
                     f"{fpt / 1e6:.0f} MFLOP per token, {tps} tokens per step")  # fmt: skip
    a, b = out["a"], out["b"]
    sec.rows.append(ratio_row("time per step: Trainer vs plain loop (eager)", a, b, "ms", "<= 1.01",
                              lambda r: r <= 1.01, scale=1e3,
                              note=f"overhead {(median(a) - median(b)) * 1e6:+.0f} us/step"))  # fmt: skip
    for label, xs in (("eager", a), ("torch.compile", out["a_compiled"])):
        if not xs:
            continue
        toks = tps / median(xs)
        mfu = toks * fpt / peak
        sec.rows.append(Row(f"Trainer {label}: tokens/s; ratio = MFU (model FLOP/s / measured peak)", toks,
                            peak / fpt, "tokens/s", mfu, "(context)", None, f"n={len(xs)}"))  # fmt: skip
    if out["a_compiled"] and out["b_compiled"]:
        ac, bc = out["a_compiled"], out["b_compiled"]
        sec.rows.append(ratio_row("time per step: Trainer vs plain loop (torch.compile)", ac, bc, "ms",
                                  "<= 1.01", lambda r: r <= 1.01, scale=1e3))  # fmt: skip
    c, n = out["ckpt"], out["ckpt"]["bytes"][0]
    mb = n / 1e6
    sec.rows.append(ratio_row(f"{mb:.0f} MB GPU state: save (sync) vs raw write", [n / 1e6 / t for t in c["save"]],
                              [n / 1e6 / t for t in c["raw_write"]], "MB/s", ">= 0.70", lambda r: r >= 0.70))  # fmt: skip
    sec.rows.append(ratio_row(f"{mb:.0f} MB GPU state: async save blocks vs sync save", c["async_block"], c["save"],
                              "s", "<= 0.05", lambda r: r <= 0.05))  # fmt: skip
    sec.rows.append(ratio_row(f"{mb:.0f} MB GPU state: load vs raw read", [n / 1e6 / t for t in c["load"]],
                              [n / 1e6 / t for t in c["raw_read"]], "MB/s", ">= 0.70", lambda r: r >= 0.70))  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:3])
