"""The non-finite guard on 2 ranks over gloo: a loss that turns NaN on ONE rank (its gradient stays
finite, so DDP alone would never notice) must stop every rank at that step without saving, or be
skipped on every rank at that step, and a run with skips must resume bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from disttrain.ckpt_write import CheckpointManager
from disttrain.commands.run_status import collect
from disttrain.config import CheckpointConfig
from disttrain.data import epoch_order
from tests.conftest import FAST, REPO, read_jsonl, run_main
from tests.multiproc.test_exact_resume import BASE, interrupt, logged_step, outcome, resume

pytestmark = pytest.mark.multiproc

TRAIN_SIZE, BATCH = 1259, 64  # the digits train split; data.batch_size


def sample_at(step: int, rank: int, world: int = 2) -> int:
    """The first sample `rank` trains on at optimizer `step` (1-based): where a poison lands."""
    micro = BATCH // world
    return int(epoch_order(TRAIN_SIZE, 0, 0, True)[(step - 1) * BATCH + rank * micro])


def poison(*at: tuple[int, int]) -> str:
    return f"pipeline.args.poison=[{','.join(str(sample_at(s, r)) for s, r in at)}]"


def poisoned_steps(*at: tuple[int, int], steps: int = 24) -> list[int]:
    """Every step whose global batch holds a poisoned sample (it comes back each epoch)."""
    samples, per_epoch = {sample_at(s, r) for s, r in at}, TRAIN_SIZE // BATCH
    out = []
    for step in range(1, steps + 1):
        epoch, i = divmod(step - 1, per_epoch)
        if samples & set(epoch_order(TRAIN_SIZE, 0, epoch, True)[i * BATCH : (i + 1) * BATCH].tolist()):
            out.append(step)
    return out


def test_nan_loss_on_one_rank_stops_every_rank_at_that_step_without_saving(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_main(f"run_dir={run_dir}", "pipeline.target=tests.pipelines:PoisonDigits", poison((5, 1)),
                    "trainer.max_steps=8", "checkpoint.every_steps=2", "trainer.eval_every=0", *FAST, nproc=2)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("disttrain:")]
    assert len(ours) == 1 and "non-finite loss at step 5" in ours[0], proc.stderr
    assert str(REPO / "disttrain") not in proc.stderr, "no traceback from disttrain (torchrun prints its own)"
    events = read_jsonl(run_dir / "events.jsonl")
    assert [(e["step"], e["quantity"], e["action"]) for e in events if e["event"] == "nonfinite"] == [
        (5, "loss", "stop")
    ]
    assert not any(e["event"] in ("finish", "stopped", "requeue") for e in events)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004", (
        "step 4 stays the newest"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest",
        "step_00000002",
        "step_00000004",
    ]
    assert collect(str(run_dir))["state"] == "failed"
    app, _ = CheckpointManager(str(run_dir), CheckpointConfig()).load(4)  # verified against its manifest
    assert all(torch.isfinite(t).all() for t in app["model"].values())


POISON = ((3, 1), (4, 0), (13, 1))
EXTRA = ["pipeline.target=tests.pipelines:PoisonDigits", poison(*POISON), "trainer.nonfinite=skip",
         "ema.decay=0.9", "profile.steps=[2,3]"]  # fmt: skip


def test_skips_on_every_rank_at_the_same_step_and_resume_stays_bit_identical(tmp_path):
    ref_dir = tmp_path / "reference"
    proc = run_main(f"run_dir={ref_dir}", *BASE, *EXTRA, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = outcome(ref_dir)
    run_dir = tmp_path / "run"
    interrupt(run_dir, EXTRA, logged_step(7))
    resume(run_dir, EXTRA)
    got = outcome(run_dir)
    assert got["records"] == expected["records"] and got["weights"] == expected["weights"]
    assert _ema(run_dir) == _ema(ref_dir), "the EMA of the weights resumes exactly too"

    events = read_jsonl(run_dir / "events.jsonl")
    skips = [(e["step"], e["quantity"], e["action"]) for e in events if e["event"] == "nonfinite"]
    expected_steps = poisoned_steps(*POISON)
    assert expected_steps[:3] == [3, 4, 13] and skips == [(s, "loss", "skip") for s in expected_steps]
    last = [r for r in got["records"] if "train/loss" in r][-1]
    assert last["train/skipped"] == len(expected_steps) and all(
        r.get("train/loss") is not None for r in got["records"] if "train/loss" in r
    )
    assert "train/correct" in last and 0 <= last["train/correct"] <= 1, "the pipeline's own metric, reduced"
    traces = sorted(p.name for p in (run_dir / "profile" / "step_2-3").iterdir())
    assert traces == ["rank_0.pt.trace.json", "rank_1.pt.trace.json"]
    assert json.loads((run_dir / "profile" / "step_2-3" / traces[1]).read_text())["traceEvents"]
    status = collect(str(run_dir))
    assert status["profiles"][0]["path"].endswith("profile/step_2-3") and status["skipped_steps"] == len(
        skips
    )


def _ema(run_dir: Path) -> dict:
    state = torch.load(run_dir / "checkpoints" / "step_00000024" / "state.pt", weights_only=True)
    return {k: v.tolist() for k, v in state["hooks"]["EMAHook"]["shadow"].items()}


def test_a_head_without_gradient_needs_find_unused_parameters_and_the_error_says_so(tmp_path):
    args = ["pipeline.target=tests.pipelines:PoisonDigits", "pipeline.args.unused_head=true", "trainer.max_steps=3",
            "trainer.eval_every=0", "checkpoint.every_steps=0", *FAST]  # fmt: skip
    failed = run_main(f"run_dir={tmp_path / 'a'}", *args, nproc=2)
    assert failed.returncode == 1
    assert "set trainer.find_unused_parameters=true" in failed.stderr, failed.stderr[-3000:]
    fixed = run_main(f"run_dir={tmp_path / 'b'}", *args, "trainer.find_unused_parameters=true", nproc=2)
    assert fixed.returncode == 0, fixed.stderr[-3000:]


def test_compiled_ddp_model_checkpoints_under_its_own_names_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "trainer.eval_every=0",
        "checkpoint.every_steps=2",
        "trainer.grad_accum=2",
        "scheduler.name=constant",
        *FAST,
    ]
    first = run_main(f"run_dir={run_dir}", *args, "trainer.max_steps=4", "trainer.compile=true",
                     "trainer.compile_backend=aot_eager", nproc=2)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    from safetensors.torch import load_file

    names = list(load_file(run_dir / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert names and not any("_orig_mod" in n for n in names), names
    # Resumed uncompiled, on one rank: the checkpoint is the plain module's, whatever ran it.
    again = run_main(f"run_dir={run_dir}", *args, "trainer.max_steps=6", "trainer.grad_accum=4")
    assert again.returncode == 0 and "resumed from step 4" in again.stdout, again.stderr[-3000:]
