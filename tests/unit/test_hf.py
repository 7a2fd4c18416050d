"""The HuggingFace CausalLM pipeline in one process: bad arguments are refused with one line before
anything is built, tied weights stay one tensor through a checkpoint's save and load, an export
refuses a checkpoint whose tied tensors differ, a user's own pipeline of a transformers model exports
without code of its own, and the pipeline reports tokens and FLOPs without transformers' warning."""

from __future__ import annotations

import json

import pytest
import torch

from disttrain.ckpt_format import publish, read_checkpoint, write_files
from disttrain.config import PipelineConfig
from disttrain.errors import ConfigError
from disttrain.manifest import build as build_manifest
from disttrain.parallel import load_whole
from disttrain.pipelines import load_pipeline
from disttrain.pipelines.hf import CausalLM
from tests.conftest import FAST, read_jsonl, run_main
from tests.unit.test_main import assert_refused

TINY = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 32, "vocab_size": 256}


def pipeline(**args):
    return load_pipeline(PipelineConfig(target="disttrain.pipelines.hf:CausalLM", args=args))


@pytest.mark.parametrize(
    "args, message",
    [
        ({}, "give exactly one of model="),
        ({"model": TINY, "pretrained": "/x"}, "give exactly one of model="),
        (
            {"model": {**TINY, "model_type": "gtp2"}},
            "'gtp2' is not a transformers model type; did you mean gpt2?",
        ),
        (
            {"model": {**TINY, "n_lyer": 2}},
            "pipeline.args.model.n_lyer: gpt2 configs have no key 'n_lyer'; did you mean n_layer?",
        ),
        ({"model": TINY, "block_size": 64}, "block_size: 64 is more than the model's 32 positions"),
        (
            {"model": TINY, "train": "/nonexistent.jsonl"},
            "pipeline.args.train: '/nonexistent.jsonl' does not exist",
        ),
        ({"pretrained": "/nonexistent"}, "'/nonexistent' has no config.json"),
        ({"model": {**TINY, "vocab_size": 100}, "block_size": 32}, "give the model vocab_size >= 256"),
    ],
)
def test_bad_arguments_are_refused_with_what_to_write(args, message):
    with pytest.raises(ConfigError) as err:
        pipeline(**args)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_typo_in_the_model_config_exits_2_before_anything_is_created(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_main(f"run_dir={run_dir}", "pipeline.target=disttrain.pipelines.hf:CausalLM",
                    "pipeline.args.model.model_type=gpt2", "pipeline.args.model.n_embed=32", *FAST)  # fmt: skip
    assert_refused(proc, "pipeline.args.model.n_embed", "did you mean n_embd?")
    assert not run_dir.exists()


def test_tied_weights_stay_tied_through_a_checkpoint(tmp_path):
    """safetensors stores the tied lm_head as a copy of its own; loading must copy into the one shared
    tensor the model has, not replace it (which would give lm_head a life of its own)."""
    torch.manual_seed(0)
    trained = pipeline(model=TINY, block_size=32).build_model()
    work, step_dir = str(tmp_path / "work"), str(tmp_path / "step")
    publish(
        work, step_dir, build_manifest(1, 1, write_files(work, {"model": trained.state_dict()}, [{}]), {})
    )
    app, _ = read_checkpoint(step_dir)
    assert app["model"]["lm_head.weight"].data_ptr() != app["model"]["transformer.wte.weight"].data_ptr()
    torch.manual_seed(1)
    fresh = pipeline(model=TINY, block_size=32).build_model()
    load_whole(fresh, app["model"], step_dir)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.transformer.wte.weight, trained.transformer.wte.weight)


def test_an_export_refuses_tied_tensors_that_differ(tmp_path):
    torch.manual_seed(0)
    weights = {
        k: v.clone() for k, v in pipeline(model=TINY, block_size=32).build_model().state_dict().items()
    }
    weights["lm_head.weight"] += 1
    with pytest.raises(
        ValueError, match="lm_head.weight and transformer.wte.weight are tied in the model but differ"
    ):
        CausalLM.export_pretrained({"model": TINY}, weights, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_token_records_become_fixed_blocks_from_each_data_source(tmp_path):
    """JSON lines (streamed), a save_to_disk folder (map-style) and a HF streaming data set give the same
    samples: truncated to block_size, or padded with the padding masked and labelled -100."""
    from datasets import Dataset

    records = [{"input_ids": list(range(1, 1 + n))} for n in (3, 40, 8)]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    Dataset.from_list(records).save_to_disk(str(tmp_path / "disk"))
    sources = {
        "jsonl": pipeline(model=TINY, block_size=32, train=str(jsonl)),
        "disk": pipeline(model=TINY, block_size=32, train=str(tmp_path / "disk")),
        "hf": pipeline(model=TINY, block_size=32, train_hf={"path": "json", "data_files": str(jsonl)}),
    }
    samples = {}
    for name, p in sources.items():
        train = p.datasets()["train"]
        samples[name] = [train[i] for i in range(3)] if name == "disk" else [s for s in train]
    first, long = samples["jsonl"][0], samples["jsonl"][1]
    assert first["input_ids"][:4].tolist() == [1, 2, 3, 0] and first["attention_mask"].sum() == 3
    assert first["labels"][2:4].tolist() == [3, -100]
    assert long["input_ids"].tolist() == list(range(1, 33)) and bool(long["attention_mask"].all())
    for name in ("disk", "hf"):
        for a, b in zip(samples[name], samples["jsonl"]):
            assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("config", ["digits", "none"])
def test_an_hf_export_of_a_run_it_cannot_rebuild_exits_2_with_one_line(tmp_path, capsys, config):
    from disttrain.ckpt_write import CheckpointManager
    from disttrain.commands.ckpt import main as ckpt_main
    from disttrain.config import CheckpointConfig, dump_yaml, load_config

    run = tmp_path / "run"
    CheckpointManager(str(run), CheckpointConfig()).save(1, {"model": {"w": torch.zeros(2)}}, {})
    if config == "digits":
        (run / "config.yaml").write_text(dump_yaml(load_config()))
    assert ckpt_main(["export", str(run), "--hf", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (
        "DigitsPipeline builds a DigitsCNN, not a transformers PreTrainedModel"
        if config == "digits"
        else "no readable config.yaml"
    ) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("built_from", ["config", "pretrained"])
def test_a_users_own_hf_pipeline_exports_without_export_pretrained(tmp_path, built_from):
    """`ckpt export --hf` of a pipeline that only builds a transformers model: built on the meta device,
    or for real where from_pretrained refuses the meta device; loads strictly, tied."""
    from transformers import GPT2LMHeadModel

    from disttrain.ckpt_write import CheckpointManager
    from disttrain.commands.ckpt import main as ckpt_main
    from disttrain.config import CheckpointConfig, dump_yaml, load_config
    from tests.pipelines import UserGPT2

    args = {"pretrained": str(tmp_path / "base")} if built_from == "pretrained" else {}
    UserGPT2().build_model().save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    trained = UserGPT2().build_model()
    run = tmp_path / "run"
    CheckpointManager(str(run), CheckpointConfig()).save(1, {"model": trained.state_dict()}, {})
    pipe = ["pipeline.target=tests.pipelines:UserGPT2", *(f"pipeline.args.{k}={v}" for k, v in args.items())]
    (run / "config.yaml").write_text(dump_yaml(load_config(None, pipe)))
    assert ckpt_main(["export", str(run), "--hf", "--out", str(tmp_path / "out")]) == 0
    model, info = GPT2LMHeadModel.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not any(info.values()), info
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())


def test_tokens_and_flops_are_counted_from_the_batch_and_the_config():
    p = pipeline(model={**TINY, "n_layer": 2, "n_embd": 32}, block_size=32)
    batch = p.datasets()["train"][0]
    padded = {k: torch.stack([v, v]) for k, v in batch.items()}
    padded["attention_mask"][1, 20:] = 0
    assert int(p.num_tokens(padded)) == 32 + 20
    # Per token: 12 d^2 of matmul weights a block, the d x vocab head, attention's 12 x layers x T x d.
    d, layers, vocab, t = 32, 2, 256, 32
    assert p.flops_per_sample() == t * (6 * (layers * 12 * d * d + d * vocab) + 12 * layers * t * d)


def test_a_run_logs_tokens_per_sec_without_transformers_loss_type_warning(tmp_path):
    run_dir = tmp_path / "run"
    model = [
        f"pipeline.args.model.{k}={v}" for k, v in {**TINY, "bos_token_id": 0, "eos_token_id": 0}.items()
    ]
    proc = run_main(f"run_dir={run_dir}", "pipeline.target=disttrain.pipelines.hf:CausalLM", *model,
                    "pipeline.args.block_size=32", "data.batch_size=4", "trainer.max_steps=2", "trainer.log_every=1",
                    "trainer.eval_every=0", "scheduler.warmup_steps=0", *FAST)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss_type" not in proc.stdout + proc.stderr
    logged = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert len(logged) == 2
    for r in logged:  # the shipped corpus has no padding: 32 tokens a sample
        assert r["train/tokens_per_sec"] == pytest.approx(32 * r["train/samples_per_sec"], rel=1e-9)
