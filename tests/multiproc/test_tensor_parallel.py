"""Tensor parallel x FSDP (parallel.tp, issue 22) on 2 ranks over gloo: DDP's numbers to float rounding,
bit-identical resume at tp=2, checkpoints that reshard between tp=2, tp=1, ddp and one rank exactly and
with every sample seen once, transformers' Llama and GPT-2 (tied) under tp=2, and bad tp refused."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, MEASURED, REPO, child_env, free_port, main_cmd, read_jsonl, run_main
from tests.multiproc.test_exact_resume import (
    BASE,
    after_checkpoint,
    interrupt,
    logged_step,
    outcome,
    reference,
    resume,
    sigterm_worker_after,
)
from tests.multiproc.test_fsdp import before_groups, saved_tensors

pytestmark = pytest.mark.multiproc

TP = ("trainer.strategy=fsdp", "parallel.tp=2")
TP_DIGITS = "pipeline.target=tests.multiproc.tp_pipelines:TPDigits"
TINY_GPT = [
    "pipeline.target=disttrain.pipelines.tiny_gpt:TinyGPTPipeline", "pipeline.args.n_layer=2",
    "pipeline.args.n_head=4", "pipeline.args.d_model=32", "pipeline.args.block_size=16", "data.batch_size=8",
    "data.eval_batch_size=8", "trainer.max_steps=8", "trainer.log_every=1", "trainer.eval_every=4",
    "checkpoint.every_steps=4", *FAST,
]  # fmt: skip


def close_records(got: list[dict], want: list[dict], rel: float) -> None:
    assert len(got) == len(want) > 4
    for a, b in zip(want, got):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for key in a.keys() - {"step", *MEASURED}:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-7), (a["step"], key)


def export(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    cmd = [sys.executable, "-m", "disttrain", "ckpt", "export", str(run_dir), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return load_file(str(out))


@pytest.fixture(scope="module")
def tiny_gpt_runs(tmp_path_factory) -> dict[str, Path]:
    """tiny_gpt for 8 steps on 2 ranks under ddp, tp=2 (fused qkv cut per part) and fsdp, saved at 4 and 8."""
    runs = {}
    for name, extra in (("ddp", ()), ("tp", TP), ("fsdp", ("trainer.strategy=fsdp",))):
        runs[name] = tmp_path_factory.mktemp("tiny_gpt") / name
        proc = run_main(f"run_dir={runs[name]}", *TINY_GPT, *extra, nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return runs


def test_tp_trains_like_ddp_and_exports_the_same_weights(tiny_gpt_runs, tmp_path):
    ddp, tp = (read_jsonl(tiny_gpt_runs[k] / "metrics.jsonl") for k in ("ddp", "tp"))
    close_records(tp, ddp, rel=1e-5)  # loss, grad norm, lr, eval: one computation, other reduction order
    want, got = (export(tiny_gpt_runs[k], tmp_path / f"{k}.safetensors") for k in ("ddp", "tp"))
    assert want.keys() == got.keys() and any("qkv" in k for k in got)
    for key in want:
        assert got[key].shape == want[key].shape
        torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4, msg=key)


def test_gradient_accumulation_under_tp_equals_ddp(tmp_path):
    """Two micro-batches a step: FSDP defers its reduce-scatter to the last one; the tp halves of each
    layer accumulate locally. No dropout: a tp group is one data-parallel rank, whose masks differ from
    those of ddp's two ranks."""
    args = [*BASE, TP_DIGITS, "trainer.grad_accum=2", "trainer.max_steps=6", "trainer.eval_every=0",
            "pipeline.args.dropout=0.0"]  # fmt: skip
    logs = {}
    for name, extra in (("ddp", ()), ("tp", TP)):
        proc = run_main(f"run_dir={tmp_path / name}", *args, *extra, nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[name] = read_jsonl(tmp_path / name / "metrics.jsonl")
    close_records(logs["tp"], logs["ddp"], rel=1e-5)


def round_trip(src: Path, dst: Path, world: int, *args: str, pipeline: list[str] = TINY_GPT) -> None:
    """Load `src` at `world` ranks with `args` and save it again at once (fsdp_probe): every tensor of the
    model and optimizer must come back bit for bit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(REPO / "tests/multiproc/fsdp_probe.py"),
           f"run_dir={dst}", f"resume={src}", *pipeline, *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    copy = dst / "checkpoints" / src.name
    sharded = src if (src / "shard_00000.safetensors").exists() else copy  # optimizer state keyed by name
    names = [n for group in before_groups(sharded) for n in group["params"]]
    before, after = saved_tensors(src, names), saved_tensors(copy, names)
    assert before.keys() == after.keys() and len(before) > 20
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize(
    "source, world, args",
    [
        ("tp", 1, ("trainer.strategy=ddp",)),
        ("tp", 2, ("trainer.strategy=fsdp",)),
        ("ddp", 2, TP),
        ("fsdp", 2, TP),
    ],
    ids=["tp2-to-one-rank", "tp2-to-fsdp", "ddp-to-tp2", "fsdp-to-tp2"],
)
def test_a_load_and_save_round_trip_across_layouts_is_exact(tiny_gpt_runs, tmp_path, source, world, args):
    round_trip(tiny_gpt_runs[source] / "checkpoints" / "step_00000008", tmp_path / "copy", world, *args)


def test_interrupted_tp_run_is_bitwise_identical(tmp_path, tmp_path_factory):
    extra = [TP_DIGITS, *TP]
    expected = reference(tmp_path_factory, tuple(extra))
    run_dir = tmp_path / "tp"
    interrupt(run_dir, extra, after_checkpoint(8))
    resume(run_dir, extra)
    got = outcome(run_dir)
    assert got["records"] == expected["records"] and got["weights"] == expected["weights"]


def test_interrupted_2x2_run_is_bitwise_identical_and_reshards_to_1x2_exactly(tmp_path):
    """The one 4-process test: dp 2 x tp 2 (FSDP's dp cut of a tp-sharded weight is a strided placement),
    SIGTERM to one worker after step 8 and a restart log what a run never stopped logs; its checkpoint
    loads at dp 1 x tp 2 and saves back every tensor bit for bit."""
    extra = [*BASE, TP_DIGITS, *TP]
    proc = run_main(f"run_dir={tmp_path / 'ref'}", *extra, nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    cmd = main_cmd(f"run_dir={run_dir}", *extra, nproc=4)
    started = subprocess.Popen(
        cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sigterm_worker_after(started, run_dir, 8)
    proc = run_main(f"run_dir={run_dir}", *extra, nproc=4)
    assert proc.returncode == 0 and "resumed from step" in proc.stdout, proc.stderr[-3000:]
    assert outcome(run_dir) == outcome(tmp_path / "ref")
    src = run_dir / "checkpoints" / "step_00000024"
    round_trip(src, tmp_path / "copy", 2, *TP, pipeline=[*BASE, TP_DIGITS])


def test_hybrid_sharding_trains_like_ddp_resumes_bitwise_and_reshards_to_fsdp(tmp_path, tmp_path_factory):
    """parallel.dp_replicate=2 on 2 ranks: two replica groups of one shard each (HSDP: gradients all-reduced
    across the groups, parameters Replicate x Shard(0) on the mesh)."""
    hybrid = ["trainer.strategy=fsdp", "parallel.dp_replicate=2"]
    expected = reference(tmp_path_factory, tuple(hybrid))
    close_records(expected["records"], reference(tmp_path_factory, ())["records"], rel=1e-5)
    run_dir = tmp_path / "hsdp"
    interrupt(run_dir, hybrid, after_checkpoint(8))
    resume(run_dir, hybrid)
    assert outcome(run_dir) == expected
    manifest = json.loads((run_dir / "checkpoints" / "step_00000024" / "manifest.json").read_text())
    files = {p["file"] for e in manifest["layout"].values() for p in e.get("shards", [])}
    assert files == {"shard_00000.safetensors"}, "the second replica group writes nothing (a replica, once)"
    round_trip(
        run_dir / "checkpoints" / "step_00000024",
        tmp_path / "copy",
        2,
        "trainer.strategy=fsdp",
        pipeline=BASE,
    )


def test_ddp_then_tp2_then_one_rank_sees_every_sample_once(tmp_path):
    """Two topology changes in one epoch: ddp (2 ranks, 2 data-parallel) stopped, resumed at tp=2 (2 ranks,
    1 data-parallel: both read the same batch), stopped, finished on one rank."""
    record = tmp_path / "samples"
    record.mkdir()
    from disttrain.pipelines.digits import DigitsPipeline

    steps_per_epoch = len(DigitsPipeline().datasets()["train"]) // 64
    args = [TP_DIGITS, f"pipeline.args.record_dir={record}", f"trainer.max_steps={steps_per_epoch}",
            "trainer.eval_every=0", "checkpoint.every_steps=2"]  # fmt: skip
    run_dir = tmp_path / "run"
    interrupt(run_dir, args, logged_step(4))
    at_tp = len(read_jsonl(run_dir / "metrics.jsonl"))
    interrupt(run_dir, [*args, *TP], logged_step(at_tp + 4))
    proc = run_main(f"run_dir={run_dir}", *BASE, *args, nproc=1)
    assert proc.returncode == 0 and "resumed from step" in proc.stdout, proc.stderr[-3000:]
    files = [f.read_text() for f in record.iterdir()]
    # Both ranks of the tp segment read the same batches (one data-parallel rank): their records are
    # equal, and count once. The ddp segment's ranks read different halves.
    distinct = set(files)
    assert len(files) - len(distinct) == 1, "the two tp ranks read the same samples"
    seen = Counter(int(i) for text in distinct for line in text.split("\n") for i in line.split())
    assert set(seen.values()) == {1}, "no sample repeated"
    assert sum(seen.values()) == steps_per_epoch * 64, "no sample skipped"


HF = ["pipeline.target=disttrain.pipelines.hf:CausalLM", "pipeline.args.block_size=16", "data.batch_size=4",
      "data.eval_batch_size=8", "trainer.max_steps=4", "trainer.log_every=1", "trainer.eval_every=4",
      "checkpoint.every_steps=0", *FAST]  # fmt: skip
GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 16, "vocab_size": 256,
        "bos_token_id": 0, "eos_token_id": 0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # fmt: skip
LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 16, "vocab_size": 256,
         "bos_token_id": 0, "eos_token_id": 0}  # fmt: skip


@pytest.mark.parametrize("model", [GPT2, LLAMA], ids=["gpt2-tied", "llama"])
def test_transformers_models_train_under_tp_like_ddp(tmp_path, model):
    """GPT-2 (Conv1D layers, fused c_attn, lm_head tied to wte) and a Llama (GQA: 4 heads, 2 kv heads) on
    the shipped corpus: tp=2 logs DDP's numbers, and the tp export keeps GPT-2's tie."""
    args = [*HF, *(f"pipeline.args.model.{k}={v}" for k, v in model.items())]
    logs = {}
    for name, extra in (("ddp", ()), ("tp", TP)):
        proc = run_main(f"run_dir={tmp_path / name}", *args, *extra, nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[name] = read_jsonl(tmp_path / name / "metrics.jsonl")
    close_records(logs["tp"], logs["ddp"], rel=1e-5)
    weights = export(tmp_path / "tp", tmp_path / "tp.safetensors")
    if model is GPT2:
        assert torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])


def test_bad_tensor_parallel_settings_exit_2_with_one_line_and_write_nothing(tmp_path):
    cases = [
        (1, ["trainer.strategy=fsdp", "parallel.tp=2"], "x parallel.tp=2 does not divide the world size 1"),
        (1, ["parallel.tp=2"], "parallel.tp=2 needs trainer.strategy=fsdp"),
        (2, ["pipeline.target=tests.pipelines:ProbeDigits", *TP], "has no tensor-parallel plan"),
        (2, [*TINY_GPT, "pipeline.args.n_head=3", "pipeline.args.d_model=48", *TP],
         "pipeline.args.n_head=3 does not divide by parallel.tp=2"),
    ]  # fmt: skip
    for i, (nproc, args, line) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        proc = run_main(f"run_dir={run_dir}", *FAST, *args, nproc=nproc)
        errors = [x for x in proc.stderr.splitlines() if x.startswith("disttrain: error:")]
        assert errors and all(line in x for x in errors), proc.stderr[-3000:]
        # one process exits 2 itself; under torchrun each worker does (torchrun then reports a failure)
        assert proc.returncode == 2 if nproc == 1 else "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
        assert not run_dir.exists()


def test_hybrid_sharding_over_two_torchrun_agents_equals_one_agent(tmp_path, tmp_path_factory):
    """dp_replicate=2 as on two nodes: two torchrun agents on loopback (static rendezvous, one worker
    each), so each replica group is one agent's. Every logged number and the final weights equal the
    same run under one agent with two workers."""
    hybrid = ["trainer.strategy=fsdp", "parallel.dp_replicate=2"]
    expected = reference(tmp_path_factory, tuple(hybrid))
    run_dir, port = tmp_path / "two_agents", str(free_port())
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(node),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                "-m",
                "disttrain.main",
                f"run_dir={run_dir}",
                *BASE,
                *hybrid,
            ],
            env=child_env(),
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    logs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert outcome(run_dir) == expected
