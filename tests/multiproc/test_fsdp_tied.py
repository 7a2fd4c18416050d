"""Sharded training of a model with tied weights (a tiny random-init HF GPT-2, `lm_head.weight` is
`transformer.wte.weight`) on 2 ranks over gloo: the tie is saved once and stays one Parameter through a
SIGTERM and resume (bitwise identical to a run never stopped), a resume at one rank (no window repeated
or skipped), a round trip through ddp, and `disttrain ckpt export` (both kinds)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.conftest import FAST, REPO, child_env, computed, free_port, main_cmd, read_jsonl, run_main
from tests.multiproc.test_exact_resume import sigterm_worker_after
from tests.multiproc.test_fsdp import before_groups, saved_tensors

pytestmark = pytest.mark.multiproc

STEPS = 12
TIE = {"lm_head.weight": "transformer.wte.weight"}
MODEL = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32, "vocab_size": 256,
         "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip
COMMON = [f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.eval_every=6", "checkpoint.every_steps=4",
          "checkpoint.keep_last=5", "data.batch_size=8", "data.eval_batch_size=64", "pipeline.args.block_size=32",
          "pipeline.target=tests.pipelines:ProbeCausalLM", "pipeline.args.step_delay=0.05",
          "scheduler.warmup_steps=2", *FAST]  # fmt: skip


def args(run_dir: Path, record_dir: Path, strategy: str = "fsdp") -> list[str]:
    model = [f"pipeline.args.model.{k}={v}" for k, v in MODEL.items()]
    return [f"run_dir={run_dir}", f"trainer.strategy={strategy}", f"pipeline.args.record_dir={record_dir}",
            *model, *COMMON]  # fmt: skip


def step_dir(run_dir: Path, step: int = STEPS) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def outcome(run_dir: Path) -> dict:
    """Every logged number but the machine's (time, memory), and the final shard files' hashes."""
    manifest = json.loads((step_dir(run_dir) / "manifest.json").read_text())
    shards = {k: v["sha256"] for k, v in manifest["files"].items() if k.endswith(".safetensors")}
    return {"metrics": computed(read_jsonl(run_dir / "metrics.jsonl")), "shards": shards}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A 2-rank fsdp run never stopped; its samples recorded under RUN_DIR/../samples."""
    root = tmp_path_factory.mktemp("tied")
    (root / "samples").mkdir()
    proc = run_main(*args(root / "run", root / "samples"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss_type" not in proc.stdout + proc.stderr  # transformers' warning, fixed in the pipeline
    return root / "run"


def test_the_tie_is_saved_once_and_recorded(reference):
    manifest = json.loads((step_dir(reference) / "manifest.json").read_text())
    layout = manifest["layout"]
    assert layout["model/lm_head.weight"] == {"tied_to": "model/transformer.wte.weight"}
    assert [s["rows"] for s in layout["model/transformer.wte.weight"]["shards"]] == [[0, 128], [128, 256]]
    assert "optim/transformer.wte.weight/exp_avg" in layout and not any("optim/lm_head" in k for k in layout)
    shard = safetensors.torch.load_file(str(step_dir(reference) / "shard_00000.safetensors"))
    assert "model/transformer.wte.weight" in shard and "model/lm_head.weight" not in shard
    tokens = [r["train/tokens_per_sec"] for r in read_jsonl(reference / "metrics.jsonl") if "train/loss" in r]
    assert len(tokens) == STEPS and all(t > 0 for t in tokens)


def test_a_stopped_tied_fsdp_run_resumes_bitwise_identical(reference, tmp_path):
    run_dir, record = tmp_path / "run", tmp_path / "samples"
    record.mkdir()
    proc = subprocess.Popen(main_cmd(*args(run_dir, record), nproc=2), env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out = sigterm_worker_after(proc, run_dir, 5)
    stops = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "stopped"]
    assert stops and 5 <= stops[-1]["step"] < STEPS, out[-3000:]
    resumed = run_main(*args(run_dir, record), nproc=2)
    assert resumed.returncode == 0 and "resumed from step" in resumed.stdout, resumed.stderr[-3000:]
    assert outcome(run_dir) == outcome(reference)


def test_resuming_at_one_rank_trains_on_every_window_once(reference, tmp_path):
    """The reference's step-4 checkpoint (2 shards) resumed by one process: steps 5-12 train on exactly
    the windows the 2-rank run trained on, step by step, and its checkpoint exports with the tie."""
    record = reference.parent / "samples"
    before = {p: p.read_text().splitlines() for p in record.iterdir()}
    run_dir = tmp_path / "one"
    proc = run_main(*args(run_dir, record), f"resume={step_dir(reference, 4)}", "trainer.eval_every=0")
    assert proc.returncode == 0 and "resumed from step 4" in proc.stdout, proc.stderr[-3000:]
    (mine,) = [p.read_text().splitlines() for p in record.iterdir() if p not in before]
    assert len(mine) == STEPS - 4 and all(len(lines) == STEPS for lines in before.values())
    for step, line in enumerate(mine, start=5):
        theirs = Counter(i for lines in before.values() for i in lines[step - 1].split())
        assert Counter(line.split()) == theirs, step
    manifest = json.loads((step_dir(run_dir) / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["layout"]["model/lm_head.weight"]["tied_to"]
    assert_loads_tied(export(run_dir, tmp_path / "hf", "--hf"))


def probe(src: Path, dst: Path, strategy: str, record: Path) -> dict:
    """Load `src` under `strategy` on 2 ranks and save it again at once into `dst`; the loaded model's
    ties (the same on both ranks)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "tests/multiproc/fsdp_probe.py"),
           *args(dst, record, strategy), f"resume={src}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ties = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if line.startswith("ties "))
    assert ties.keys() == {"ties 0", "ties 1"} and len(set(ties.values())) == 1, proc.stdout[-3000:]
    return json.loads(ties["ties 0"])


def test_fsdp_to_ddp_and_back_keeps_the_tie_and_every_tensor_exactly(reference, tmp_path):
    src = step_dir(reference)
    record = reference.parent / "samples"
    assert probe(src, tmp_path / "ddp", "ddp", record) == TIE
    names = [n for group in before_groups(src) for n in group["params"]]
    fsdp, ddp = saved_tensors(src), saved_tensors(step_dir(tmp_path / "ddp"), names)
    # The replicated format holds every state_dict key: the tied one as a copy of its own.
    assert ddp.keys() == fsdp.keys() | {"model/lm_head.weight"}
    assert torch.equal(ddp["model/lm_head.weight"], fsdp["model/transformer.wte.weight"])
    assert all(torch.equal(fsdp[k], ddp[k]) for k in fsdp)
    assert probe(step_dir(tmp_path / "ddp"), tmp_path / "back", "fsdp", record) == TIE
    back = saved_tensors(step_dir(tmp_path / "back"))
    assert back.keys() == fsdp.keys() and all(torch.equal(fsdp[k], back[k]) for k in fsdp)
    layout = json.loads((step_dir(tmp_path / "back") / "manifest.json").read_text())["layout"]
    assert layout["model/lm_head.weight"] == {"tied_to": "model/transformer.wte.weight"}


def export(run_dir: Path, out: Path, *flags: str) -> Path:
    """`disttrain ckpt export RUN_DIR --out OUT [FLAGS]`, through the command's own main()."""
    from disttrain.commands.ckpt import main as ckpt_main

    assert ckpt_main(["export", str(run_dir), "--out", str(out), *flags]) == 0
    return out


def assert_loads_tied(folder: Path) -> torch.nn.Module:
    from transformers import GPT2LMHeadModel

    model, info = GPT2LMHeadModel.from_pretrained(
        str(folder), local_files_only=True, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def test_exports_load_strictly_into_the_transformers_class_with_the_tie(reference, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = assert_loads_tied(export(reference, tmp_path / "hf", "--hf"))
    saved = saved_tensors(step_dir(reference))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[f"model/{TIE.get(name, name)}"]), name
    weights = safetensors.torch.load_file(str(export(reference, tmp_path / "w.safetensors")))
    assert torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
    plain = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in MODEL.items() if k != "model_type"}))
    plain.load_state_dict(weights, strict=True)  # every key, as a ddp checkpoint's export
    assert plain.lm_head.weight is plain.transformer.wte.weight
    assert torch.equal(plain.lm_head.weight, model.lm_head.weight)
