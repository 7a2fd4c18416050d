"""What a resume adds, disttrain against Lightning, side by side: `python -m bench.lightning_resume`.

The same model (tiny_gpt widened to ~25M parameters: 8 layers, d_model 512; ~300 MB of weights and AdamW
state), the same data and optimizer, one CPU process. In each framework's worker process: fit one step
from scratch, then fit one step resumed from that framework's own checkpoint of the same state,
alternated REPS + 1 times (the first round, warm-up, dropped); what a resume adds is median(resumed) -
median(fresh). disttrain verifies every file of the checkpoint (sha256 against its manifest) before it
unpickles anything; Lightning's `torch.load` does not verify. The two frameworks' workers alternate too.
The page cache is warm (the checkpoint was just written or read): the cost measured is reading, verifying
and deserialising, not the disk. The corpus is the bundled one's first 40,000 characters, so that the
eval disttrain runs at the end of every fit (Lightning's loop here has none) stays small; it is the same
in the fresh and the resumed fit, so it cancels out of the difference.

Lightning is not a dependency of disttrain: give a Python that has it (`--lightning-python`; e.g. a venv
made with --system-site-packages and `pip install lightning`). Results: the `lightning-resume` section of
bench/RESULTS.md, raw numbers in bench/RESULTS_lightning_resume.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, child_env, machine_info, median, spread
from bench.sections import replace_section

DIMS = {"n_layer": 8, "n_head": 8, "d_model": 512, "block_size": 64}
BATCH, LR = 4, 1e-3
OURS = ("--config", "configs/tiny_gpt.yaml", *(f"pipeline.args.{k}={v}" for k, v in DIMS.items()),
        f"data.batch_size={BATCH}", "scheduler.warmup_steps=0", "trainer.eval_every=0", "trainer.log_every=1",
        "trainer.progress=none", "log.plot=false", "checkpoint.every_steps=0")  # fmt: skip


def run(reps: int, rounds: int, lightning_python: str, out: Path) -> dict[str, Any]:
    info = machine_info()
    results: dict[str, list[dict[str, Any]]] = {"disttrain": [], "lightning": []}
    with tempfile.TemporaryDirectory(prefix="bench-lresume-") as root:
        from disttrain.pipelines.tiny_gpt import DEFAULT_CORPUS

        corpus = os.path.join(root, "corpus.txt")
        Path(corpus).write_text(Path(DEFAULT_CORPUS).read_text(encoding="utf-8")[:40_000], encoding="utf-8")
        for r in range(rounds):
            order = ("disttrain", "lightning") if r % 2 == 0 else ("lightning", "disttrain")
            for framework in order:
                python = sys.executable if framework == "disttrain" else lightning_python
                spec = {"framework": framework, "root": os.path.join(root, f"{framework}{r}"), "reps": reps,
                        "corpus": corpus}  # fmt: skip
                results[framework].append(_worker(python, spec))
                last = results[framework][-1]
                print(f"round {r} {framework}: fresh {median(last['fresh']):.3f} s, resumed "
                      f"{median(last['resumed']):.3f} s, checkpoint {last['bytes'] / 1e6:.0f} MB", flush=True)  # fmt: skip
    info["load_avg_at_end"] = list(os.getloadavg())
    data = {"info": info, "reps": reps, "rounds": rounds, "results": results}
    (out.parent / "RESULTS_lightning_resume.json").write_text(json.dumps(data, indent=1))
    replace_section(out, "lightning-resume", report(data))
    return data


def _worker(python: str, spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-lw-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        Path(spec_path).write_text(json.dumps(spec))
        proc = subprocess.run([python, "-m", "bench.lightning_resume", spec_path, out_path], cwd=REPO,
                              env=child_env(2), capture_output=True, text=True, timeout=1800)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"{spec['framework']} worker failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(out_path).read_text())


def report(data: dict[str, Any]) -> str:
    info, res = data["info"], data["results"]

    def added(framework: str) -> list[float]:
        return [median(w["resumed"]) - median(w["fresh"]) for w in res[framework]]

    ours, theirs = added("disttrain"), added("lightning")
    ratios = [a / b for a, b in zip(ours, theirs)]
    lo, hi = spread(ratios)
    ratio = median(ours) / median(theirs)
    size = lambda f: f"{median([w['bytes'] for w in res[f]]) / 1e6:.0f} MB"  # noqa: E731
    lines = [
        "## What a resume adds: disttrain vs Lightning, side by side (issue 20)", "",
        f"`python -m bench.lightning_resume --reps {data['reps']} --rounds {data['rounds']}` on {info['date']}: "
        f"{info['nproc']} CPUs ({info['cpu_model']}), load average "
        f"{'/'.join(f'{x:.2f}' for x in info['load_avg_at_start'])} at start, "
        f"{'/'.join(f'{x:.2f}' for x in info['load_avg_at_end'])} at end, commit {info['git_commit']}, torch "
        f"{info['torch']}, Lightning {res['lightning'][0]['version']}. tiny_gpt at ~25M parameters, AdamW, one "
        "process with 2 threads; in each framework's worker, one step fitted fresh and one resumed, alternated; "
        "the frameworks' workers alternated; page cache warm.", "",
        "| framework | checkpoint | fresh: 1 step | resumed: 1 step | a resume adds | verified before unpickling |",
        "| --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for framework, verified in (("disttrain", "yes (sha256 of every file)"), ("lightning", "no")):
        fresh = median([median(w["fresh"]) for w in res[framework]])
        resumed = median([median(w["resumed"]) for w in res[framework]])
        lines.append(f"| {framework} | {size(framework)} | {fresh:.3f} s | {resumed:.3f} s | "
                     f"{median(added(framework)):.3f} s | {verified} |")  # fmt: skip
    verdict = "met" if ratio <= 1.0 else "missed"
    lines += ["", f"disttrain's added time / Lightning's: **{ratio:.2f}** (per round {lo:.2f}-{hi:.2f}, "
              f"n={len(ratios)}); goal <= 1.0: **{verdict}**."]  # fmt: skip
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ worker side


def _alternate(reps: int, fresh: Any, resumed: Any) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"fresh": [], "resumed": []}
    for _ in range(reps + 1):
        for name, fn in (("fresh", fresh), ("resumed", resumed)):
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return {k: v[1:] for k, v in out.items()}


def ours(spec: dict[str, Any]) -> dict[str, Any]:
    from disttrain.cluster import detect
    from disttrain.config import load_config
    from disttrain.trainer import build_trainer

    root = spec["root"]

    def fit(run_dir: str, steps: int, save: bool = False) -> None:
        cfg = load_config(str(REPO / OURS[1]), [*OURS[2:], f"run_dir={run_dir}", f"trainer.max_steps={steps}",
                                                f"checkpoint.save_final={str(save).lower()}",
                                                f"pipeline.args.corpus={spec['corpus']}"])  # fmt: skip
        build_trainer(cfg, detect()).fit()

    src = os.path.join(root, "src")
    fit(src, 1, save=True)  # its final checkpoint: step 1; the timed fits below save nothing

    def fresh() -> None:
        shutil.rmtree(os.path.join(root, "fresh"), ignore_errors=True)  # a few small files: events, metrics
        fit(os.path.join(root, "fresh"), 1)

    def resumed() -> None:
        fit(src, 2)

    step = os.path.join(src, "checkpoints", "step_00000001")
    size = sum(os.path.getsize(os.path.join(step, f)) for f in os.listdir(step))
    return {**_alternate(spec["reps"], fresh, resumed), "bytes": size}


def lightning(spec: dict[str, Any]) -> dict[str, Any]:
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from disttrain.pipelines.tiny_gpt import TinyGPTPipeline

    pipeline = TinyGPTPipeline(**DIMS, corpus=spec["corpus"])  # type: ignore[arg-type]

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = pipeline.build_model()

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            logits = self.model(x)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))

    data = DataLoader(pipeline.datasets()["train"], batch_size=BATCH, shuffle=True)
    root = spec["root"]
    os.makedirs(root, exist_ok=True)

    def trainer(steps: int) -> Any:
        return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)  # fmt: skip

    ckpt = os.path.join(root, "src.ckpt")
    first = trainer(1)
    first.fit(Module(), data)
    first.save_checkpoint(ckpt)

    def fresh() -> None:
        trainer(1).fit(Module(), data)

    def resumed() -> None:
        trainer(2).fit(Module(), data, ckpt_path=ckpt)

    return {
        **_alternate(spec["reps"], fresh, resumed),
        "bytes": os.path.getsize(ckpt),
        "version": L.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="fresh/resumed pairs in each worker")
    parser.add_argument("--rounds", type=int, default=2, help="workers per framework, alternated")
    parser.add_argument(
        "--lightning-python", default=sys.executable, help="a Python with lightning installed"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    check = subprocess.run([args.lightning_python, "-c", "import lightning"], capture_output=True)
    if check.returncode != 0:
        raise SystemExit(f"bench.lightning_resume: {args.lightning_python} cannot import lightning; give "
                         "--lightning-python of a venv with it (pip install lightning)")  # fmt: skip
    run(args.reps, args.rounds, args.lightning_python, Path(args.out))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1].endswith(".json"):
        spec = json.loads(Path(sys.argv[1]).read_text())
        result = (ours if spec["framework"] == "disttrain" else lightning)(spec)
        Path(sys.argv[2]).write_text(json.dumps(result))
    else:
        main()
