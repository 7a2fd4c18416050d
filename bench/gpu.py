"""Section 6 (GPU, one device): `python -m bench --gpu`; refuses to run without a CUDA device.

  peak  the device's measured bf16 matmul rate (8192^3 matmuls in a loop): the MFU denominator.
  step  tiny_gpt as configs/tiny_gpt_gpu.yaml sizes it (12 layers, d_model 768, 1024 tokens, batch 64,
        bf16, fused AdamW, 2 loader workers): the Trainer (A) against bench/plain.py's loop (B),
        alternated A B A B, eager; then one run of each with torch.compile. A step is the wall time over
        the timed steps between two synchronize() calls, so the CPU may run ahead of the GPU as in real
        training. Tokens/s, and MFU from 6N + 12*L*d*T FLOPs per token (N without the embeddings).
  ckpt  the trained model's state (weights and AdamW moments, on the GPU): sections 2 and 3's figures.

`--gpu-smoke` runs the same code on the CPU with a toy model, to check the harness where no GPU is.
Worker: python -m bench.gpu SPEC.json OUT.json
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from bench.ckpt import async_row, host_tensors, io_rows, measure_async, measure_io
from bench.common import Row, Section, median, ratio_row, run_worker, train_cfg, worker_main
from disttrain.pipelines.tiny_gpt import TinyGPTPipeline

GPU_CONFIG = "configs/tiny_gpt_gpu.yaml"
SMOKE_ARGS = ["pipeline.args.n_layer=1", "pipeline.args.d_model=64", "pipeline.args.n_head=2",
              "pipeline.args.block_size=32", "data.batch_size=8", "data.num_workers=0"]  # fmt: skip


def run(quick: bool, smoke: bool = False, compile_model: bool = True) -> Section:
    sec = Section("gpu", "6. GPU: tiny_gpt_gpu throughput, MFU, step overhead, checkpoint I/O (one device)")
    spec = {"smoke": smoke, "warmup": 3 if smoke else 5, "steps": 4 if smoke else (10 if quick else 20),
            "reps": 2 if (smoke or quick) else 3, "ckpt_reps": 2, "compile": compile_model and not smoke}  # fmt: skip
    [out] = run_worker("bench.gpu", spec, threads=8, timeout=1800)
    sec.extra.update(out)
    peak, fpt, tps = out["peak_flops"], out["flops_per_token"], out["tokens_per_step"]
    sec.notes.append(f"device: {out['device']}; measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s; "
                     f"{fpt / 1e6:.0f} MFLOP per token, {tps} tokens per step")  # fmt: skip
    runs = {"eager": (out["a"], out["b"]), "torch.compile": (out["a_compiled"], out["b_compiled"])}
    for label, (a, b) in runs.items():
        if not a:
            continue
        sec.rows.append(ratio_row(f"time per step: Trainer vs plain loop ({label})", a, b, "ms", "<= 1.01",
                                  lambda r: r <= 1.01, scale=1e3,
                                  note=f"overhead {(median(a) - median(b)) * 1e6:+.0f} us/step"))  # fmt: skip
        toks = tps / median(a)
        sec.rows.append(Row(f"Trainer {label}: tokens/s; ratio = MFU (model FLOP/s / measured peak)", toks,
                            peak / fpt, "tokens/s", toks * fpt / peak, "(context)", None, f"n={len(a)}"))  # fmt: skip
    if out.get("a_sync"):
        sec.rows.append(ratio_row("time per step: trainer.nonfinite=skip (a device read a step) vs the plain loop",
                                  out["a_sync"], out["b"], "ms", "(context)", None, scale=1e3,
                                  note="stop, the default, reads the verdict a step late: no read"))  # fmt: skip
    label = f"{out['ckpt_bytes'] / 1e6:.0f} MB GPU state"
    sec.rows += [*io_rows(label, out["ckpt_bytes"], out["ckpt"]), async_row(label, out["async"])]
    return sec


# ------------------------------------------------------------------------------------ worker side


class CompiledTinyGPT(TinyGPTPipeline):
    """tiny_gpt whose model is torch.compile'd (the trainer takes any nn.Module a pipeline builds)."""

    def build_model(self) -> Any:
        import torch

        return torch.compile(super().build_model())


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_peak(device: Any, n: int, iters: int) -> float:
    """Dense bf16 matmul FLOP/s of this device, the best of 3 timings."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best


def _per_step(stamps: list[float], warmup: int) -> float:
    return (stamps[-1] - stamps[warmup]) / (len(stamps) - 1 - warmup)


def run_trainer(cfg: Any, warmup: int, compile_model: bool) -> tuple[float, Any]:
    """Seconds per step of Trainer.fit over the steps after `warmup`, and the trainer."""
    from disttrain.cluster import detect
    from disttrain.hooks import Hook
    from disttrain.trainer import build_trainer

    stamps: list[float] = []
    last = cfg.trainer.max_steps - 1  # the before_step of the last step closes the window

    class Stamp(Hook):
        def before_step(self, trainer: Any) -> None:
            if len(stamps) in (warmup, last):
                _sync(trainer.strategy.device)
            stamps.append(time.perf_counter())

    if compile_model:
        cfg.pipeline.target = "bench.gpu:CompiledTinyGPT"
    trainer = build_trainer(cfg, detect(), hooks=[Stamp()])
    trainer.fit()
    return _per_step(stamps, warmup), trainer


def run_plain(cfg: Any, warmup: int, compile_model: bool, device: Any) -> float:
    """Seconds per step of the plain loop over the same window as run_trainer's."""
    from bench.plain import PlainLoop

    loop, stamps = PlainLoop(cfg, device, compile_model), []
    for i in range(cfg.trainer.max_steps - 1):
        if i == warmup:
            _sync(device)
        stamps.append(time.perf_counter())
        loop.step()
    _sync(device)
    stamps.append(time.perf_counter())
    return _per_step(stamps, warmup)


def model_flops_per_token(model: Any, cfg: Any) -> float:
    args = cfg.pipeline.args
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("tok.", "pos.")))
    return 6 * n + 12 * args["n_layer"] * args["d_model"] * args["block_size"]


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    smoke = spec["smoke"]
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("bench --gpu: no CUDA device here (torch.cuda.is_available() is False)")
    device = torch.device("cpu" if smoke else "cuda")
    out: dict[str, Any] = {"device": "cpu (smoke)" if smoke else torch.cuda.get_device_name(0),
                           "peak_flops": measure_peak(device, 256 if smoke else 8192, 5 if smoke else 50),
                           "a": [], "b": [], "a_sync": [], "a_compiled": [], "b_compiled": []}  # fmt: skip
    base = {"config": GPU_CONFIG, "steps": spec["warmup"] + spec["steps"] + 1,
            "overrides": [*(SMOKE_ARGS if smoke else []), f"trainer.cpu={str(smoke).lower()}",
                          "scheduler.warmup_steps=2"]}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as root:

        def cfg(name: str) -> Any:
            return train_cfg(base, os.path.join(root, name))

        w = spec["warmup"]
        for i in range(spec["reps"]):
            a, trainer = run_trainer(cfg(f"a{i}"), w, False)
            out["a"].append(a)
            out["b"].append(run_plain(cfg(f"b{i}"), w, False, device))
            skip = cfg(f"s{i}")  # the guard deciding at the step: one device read a step
            skip.trainer.nonfinite = "skip"
            out["a_sync"].append(run_trainer(skip, w, False)[0])
        c = cfg("flops")
        out["flops_per_token"] = model_flops_per_token(trainer.module, c)
        out["tokens_per_step"] = c.data.batch_size * c.pipeline.args["block_size"]
        state_io(trainer, spec["ckpt_reps"], root, out)
        del trainer
        if spec["compile"]:
            out["a_compiled"].append(run_trainer(cfg("ac"), w, True)[0])
            out["b_compiled"].append(run_plain(cfg("bc"), w, True, device))
    return out


def state_io(trainer: Any, reps: int, root: str, out: dict[str, Any]) -> None:
    """Sections 2 and 3's measurements on the trained model's state, where it lives (the GPU)."""
    app, ranks, _ = trainer.checkpointing.capture()
    out["ckpt_bytes"] = float(sum(t.nbytes for t in host_tensors(app)))
    out["ckpt"] = measure_io(app, ranks, reps, root)
    out["async"] = measure_async(app, ranks, reps, root)


if __name__ == "__main__":
    worker_main(worker)
