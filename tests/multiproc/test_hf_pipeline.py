"""The built-in HuggingFace pipeline (a tiny random-init GPT-2 from its config, tokenised JSON-lines data
streamed) on 2 ranks: stopped by SIGTERM to one rank and resumed, it is bitwise identical to a run never
stopped; `disttrain ckpt export --hf` writes a folder `from_pretrained` loads with lm_head still tied to
the embedding; and a new run started from that folder (`pretrained=`) scores what the first run logged."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import safetensors.torch
import torch

from disttrain.pipelines.hf import CORPUS
from tests.conftest import FAST, child_env, computed, main_cmd, read_jsonl, run_main
from tests.multiproc.test_exact_resume import sigterm_worker_after

pytestmark = pytest.mark.multiproc

STEPS = 12
MODEL = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32, "vocab_size": 256,
         "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip
COMMON = ["trainer.max_steps=12", "trainer.log_every=1", "trainer.eval_every=6", "checkpoint.every_steps=4",
          "data.batch_size=8", "data.eval_batch_size=16", "pipeline.args.block_size=32", *FAST]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The shipped corpus as byte tokens, cut into records of 10 to 49 tokens: longer than block_size
    (truncated) and shorter (padded and masked)."""
    root = tmp_path_factory.mktemp("tokens")
    tokens = list(Path(CORPUS).read_bytes()[:40_000])
    records, at = [], 0
    while at < len(tokens):
        n = 10 + len(records) * 7 % 40
        records.append({"input_ids": tokens[at : at + n]})
        at += n
    out = {"train": root / "train.jsonl", "eval": root / "eval.jsonl"}
    out["train"].write_text("".join(json.dumps(r) + "\n" for r in records[:-40]))
    out["eval"].write_text("".join(json.dumps(r) + "\n" for r in records[-40:]))
    return out


def args(data: dict[str, Path], run_dir: Path) -> list[str]:
    model = [f"pipeline.args.model.{k}={v}" for k, v in MODEL.items()]
    return [f"run_dir={run_dir}", "pipeline.target=tests.pipelines:SlowCausalLM", "pipeline.args.step_delay=0.05",
            f"pipeline.args.train={data['train']}", f"pipeline.args.eval={data['eval']}", *model, *COMMON]  # fmt: skip


def outcome(run_dir: Path) -> dict:
    metrics = computed(read_jsonl(run_dir / "metrics.jsonl"))
    manifest = json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").read_text())
    return {"metrics": metrics, "weights": manifest["files"]["model.safetensors"]["sha256"]}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("hf") / "reference"
    proc = run_main(*args(data, run_dir), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_a_stopped_hf_run_resumes_bitwise_identical(data, reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(main_cmd(*args(data, run_dir), nproc=2), env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out = sigterm_worker_after(proc, run_dir, 5)
    stops = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "stopped"]
    assert stops and stops[-1]["step"] < STEPS, out[-3000:]
    resumed = run_main(*args(data, run_dir), nproc=2)
    assert resumed.returncode == 0 and "resumed from step" in resumed.stdout, resumed.stderr[-3000:]
    assert outcome(run_dir) == outcome(reference)


@pytest.fixture(scope="module")
def exported(reference, tmp_path_factory) -> Path:
    """`disttrain ckpt export RUN --hf --out DIR`, through the command's own main()."""
    from disttrain.commands.ckpt import main as ckpt_main

    out = tmp_path_factory.mktemp("export") / "gpt2"
    assert ckpt_main(["export", str(reference), "--hf", "--out", str(out)]) == 0
    return out


def test_the_export_loads_with_from_pretrained_tied_and_equal_to_the_checkpoint(reference, exported):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(exported), local_files_only=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    saved = safetensors.torch.load_file(
        str(reference / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    )
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
    assert torch.equal(model.lm_head.weight, saved["lm_head.weight"])


def test_a_run_from_the_exported_weights_scores_what_the_run_logged(data, reference, exported, tmp_path):
    pretrained = [a for a in args(data, tmp_path / "new") if not a.startswith("pipeline.args.model.")]
    proc = run_main(*pretrained, f"pipeline.args.pretrained={exported}", "resume=never", "--test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tested = json.loads((tmp_path / "new" / "test_metrics.json").read_text())
    logged = [r for r in read_jsonl(reference / "metrics.jsonl") if "eval/loss" in r][-1]
    assert logged["step"] == STEPS
    assert tested["test/loss"] == pytest.approx(logged["eval/loss"], rel=1e-5)
    assert tested["test/accuracy"] == pytest.approx(logged["eval/accuracy"], abs=1e-9)
