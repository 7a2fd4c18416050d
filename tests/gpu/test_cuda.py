"""CUDA / NCCL paths. Skipped on machines without a GPU (CI here has none); run them on a GPU box with
`python -m pytest tests/gpu -ra`."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import FAST, read_jsonl, run_main
from tests.unit.test_features import poisoned

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine"),
]


def test_default_example_on_gpu(tmp_path):
    proc = run_main(f"run_dir={tmp_path}", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = [m for m in read_jsonl(tmp_path / "metrics.jsonl") if "eval/accuracy" in m][-1]
    assert final["eval/accuracy"] >= 0.95


def test_tiny_gpt_bf16_fused_adamw_checkpoint_holds_cuda_rng(tmp_path):
    proc = run_main("--config", "configs/tiny_gpt.yaml", f"run_dir={tmp_path}", "trainer.mixed_precision=bf16",
                    "optim.fused=true", "trainer.max_steps=20", "checkpoint.every_steps=10", *FAST)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "checkpoints" / "step_00000020" / "manifest.json").read_text())
    assert manifest["step"] == 20
    ranks = torch.load(tmp_path / "checkpoints" / "step_00000020" / "ranks.pt", weights_only=True)
    assert "cuda" in ranks[0]["rng"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_two_gpu_nccl_run_is_reproducible(tmp_path):
    digests = []
    for name in ("a", "b"):
        proc = run_main(
            f"run_dir={tmp_path / name}", "trainer.max_steps=30", "trainer.log_every=1", *FAST, nproc=2
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests.append(
            [r["train/loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "train/loss" in r]
        )
    assert digests[0] == digests[1]


def test_tiny_gpt_fsdp_bf16_on_one_gpu_trains_saves_and_resumes(tmp_path):
    """FSDP2 over NCCL with a world of one (a single GPU): bf16 compute, fp32 reduction, a sharded
    checkpoint holding the CUDA RNG, and a resume from it."""
    args = (f"run_dir={tmp_path}", "--config", "configs/tiny_gpt_fsdp.yaml", "trainer.mixed_precision=bf16",
            "trainer.log_every=1", "checkpoint.every_steps=10", "trainer.eval_every=0", *FAST)  # fmt: skip
    first = run_main(*args, "trainer.max_steps=20")
    assert first.returncode == 0, first.stderr[-3000:]
    losses = [r["train/loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    step_dir = tmp_path / "checkpoints" / "step_00000020"
    assert json.loads((step_dir / "manifest.json").read_text())["strategy"] == "fsdp"
    assert "cuda" in torch.load(step_dir / "ranks.pt", weights_only=True)[0]["rng"]
    second = run_main(*args, "trainer.max_steps=30")
    assert second.returncode == 0 and "resumed from step 20" in second.stdout, second.stderr[-3000:]


def test_tiny_gpt_compiled_bf16_reports_mfu_and_saves_plain_names(tmp_path):
    """The compile + bf16 + MFU path (issue 14): train/mfu when the device is in the peak table, the
    guard reading one device value a step, and checkpoints under the module's own names."""
    from safetensors.torch import load_file

    from disttrain.features.metrics import peak_for

    proc = run_main("--config", "configs/tiny_gpt.yaml", f"run_dir={tmp_path}", "trainer.mixed_precision=bf16",
                    "trainer.compile=true", "trainer.max_steps=20", "trainer.log_every=5", "checkpoint.every_steps=20",
                    "ema.decay=0.99", *FAST)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r][-1]
    assert last["train/tokens_per_sec"] > 0 and last["train/grad_norm"] > 0 and last["train/max_mem_mb"] > 0
    known = peak_for(torch.cuda.get_device_name(0), "bf16") is not None
    assert ("train/mfu" in last) == known and (not known or 0 < last["train/mfu"] < 1)
    names = load_file(tmp_path / "checkpoints" / "step_00000020" / "model.safetensors")
    assert not any("_orig_mod" in k for k in names)


def test_nonfinite_loss_on_gpu_stops_naming_its_step_and_saves_nothing_after(tmp_path):
    """On a GPU the stop-mode verdict is read a step late (no device sync a step): the run still fails
    with exit 1 naming the step whose loss went NaN, and the checkpoint before it is the newest."""
    proc = run_main(f"run_dir={tmp_path}", "pipeline.target=tests.pipelines:PoisonDigits", poisoned(3),
                    "trainer.max_steps=10", "checkpoint.every_steps=2", *FAST)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "non-finite loss at step 3" in proc.stderr, proc.stderr[-3000:]
    events = read_jsonl(tmp_path / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2]
    assert [(e["step"], e["action"]) for e in events if e["event"] == "nonfinite"] == [(3, "stop")]
