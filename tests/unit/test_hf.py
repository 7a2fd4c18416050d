"""The HuggingFace CausalLM pipeline in one process: bad arguments are refused with one line before
anything is built, tied weights stay one tensor through a checkpoint's save and load, and an export
refuses a checkpoint whose tied tensors differ."""

from __future__ import annotations

import pytest
import torch

from disttrain.ckpt_format import manifest, publish, read_checkpoint, write_files
from disttrain.config import ConfigError, PipelineConfig
from disttrain.pipelines import load_pipeline
from disttrain.pipelines.hf import CausalLM
from disttrain.trainer import _load_model
from tests.conftest import FAST, run_main
from tests.unit.test_main import assert_refused

TINY = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 32, "vocab_size": 256}


def pipeline(**args):
    return load_pipeline(PipelineConfig(target="disttrain.pipelines.hf:CausalLM", args=args))


@pytest.mark.parametrize(
    "args, message",
    [
        ({}, "give exactly one of model="),
        ({"model": TINY, "pretrained": "/x"}, "give exactly one of model="),
        ({"model": {**TINY, "model_type": "gtp2"}}, "'gtp2' is not a transformers model type; did you mean gpt2?"),
        ({"model": {**TINY, "n_lyer": 2}}, "pipeline.args.model.n_lyer: gpt2 configs have no key 'n_lyer'; did you mean n_layer?"),
        ({"model": TINY, "block_size": 64}, "block_size: 64 is more than the model's 32 positions"),
        ({"model": TINY, "train": "/nonexistent.jsonl"}, "pipeline.args.train: '/nonexistent.jsonl' does not exist"),
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
    publish(work, step_dir, manifest(1, 1, write_files(work, {"model": trained.state_dict()}, [{}]), {}))
    app, _ = read_checkpoint(step_dir)
    assert app["model"]["lm_head.weight"].data_ptr() != app["model"]["transformer.wte.weight"].data_ptr()
    torch.manual_seed(1)
    fresh = pipeline(model=TINY, block_size=32).build_model()
    _load_model(fresh, app["model"], step_dir)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.transformer.wte.weight, trained.transformer.wte.weight)


def test_an_export_refuses_tied_tensors_that_differ(tmp_path):
    torch.manual_seed(0)
    weights = {k: v.clone() for k, v in pipeline(model=TINY, block_size=32).build_model().state_dict().items()}
    weights["lm_head.weight"] += 1
    with pytest.raises(ValueError, match="lm_head.weight and transformer.wte.weight are tied in the model but differ"):
        CausalLM.export_pretrained({"model": TINY}, weights, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
