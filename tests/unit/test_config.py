"""Config: typed loading, inheritance, overrides, and every class of bad input a user can make."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from disttrain.config import (
    Config,
    check_batch_divides,
    dump_yaml,
    field_docs,
    load_config,
    parse_override,
)
from disttrain.errors import ConfigError
from disttrain.resume import fingerprint
from tests.conftest import REPO


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_default_yaml_equals_builtin_default():
    # `python -m disttrain.main` without --config must train exactly what configs/default.yaml says.
    assert load_config(str(REPO / "configs" / "default.yaml")) == Config()


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name.startswith("slurm"):
            continue  # SLURM profiles are read by launch/submit.py, not the trainer
        load_config(str(path))


def test_public_contract_keys_exist():
    keys = {k for k, _, _ in field_docs()}
    contract = {
        "run_dir", "seed", "resume", "trainer.max_steps", "trainer.eval_every", "trainer.log_every",
        "trainer.grad_accum", "trainer.mixed_precision", "trainer.grad_clip", "data.batch_size", "optim.name",
        "optim.lr", "optim.weight_decay", "scheduler.name", "scheduler.warmup_steps", "checkpoint.every_steps",
        "checkpoint.keep_last", "checkpoint.async_save", "log.wandb", "log.tensorboard",
    }  # fmt: skip
    assert contract <= keys
    assert all(doc for _, _, doc in field_docs()), "every key documents itself in one line"


def test_overrides_are_yaml_typed():
    cfg = load_config(None, ["optim.lr=3e-4", "trainer.max_steps=200", "run_dir=/tmp/x", "log.wandb=true",
                             "optim.betas=[0.8, 0.9]", "pipeline.args.width=16"])  # fmt: skip
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.trainer.max_steps == 200 and cfg.run_dir == "/tmp/x" and cfg.log.wandb is True
    assert cfg.optim.betas == [0.8, 0.9] and cfg.pipeline.args == {"width": 16}


def test_base_inheritance_merges_sections(tmp_path):
    write(tmp_path, "parent.yaml", "seed: 3\ntrainer:\n  max_steps: 50\n  log_every: 5\n")
    child = write(tmp_path, "child.yaml", "base: parent.yaml\ntrainer:\n  max_steps: 70\n")
    cfg = load_config(child)
    assert (cfg.seed, cfg.trainer.max_steps, cfg.trainer.log_every) == (3, 70, 5)


def test_scientific_notation_in_yaml_file(tmp_path):
    assert load_config(write(tmp_path, "c.yaml", "optim:\n  lr: 3e-4\n")).optim.lr == pytest.approx(3e-4)


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["trainer.max_steps=7", "pipeline.args.width=8"])
    again = load_config(write(tmp_path, "resolved.yaml", dump_yaml(cfg)))
    assert again == cfg


def test_secret_looking_keys_are_redacted_in_dump():
    cfg = load_config(None, ["pipeline.args.api_token=hunter2", "pipeline.args.width=8"])
    text = dump_yaml(cfg)
    assert "hunter2" not in text and "width: 8" in text


def test_resume_fingerprint_tracks_model_and_batch():
    a, b = Config(), load_config(None, ["data.batch_size=32"])
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) == fingerprint(load_config(None, ["trainer.max_steps=999"]))


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "trainer:\n  max_step: 10\n",
            "unknown config key trainer.max_step: did you mean trainer.max_steps?",
        ),
        ("trainer:\n  max_steps: ten\n", "trainer.max_steps: expected an integer, got 'ten'"),
        ("trainer:\n  max_steps: 0\n", "trainer.max_steps: 0 is below the minimum 1"),
        (
            "trainer:\n  mixed_precision: fp8\n",
            "trainer.mixed_precision: 'fp8' is not one of no | bf16 | fp16",
        ),
        ("optim:\n  lr: -1.0\n", "optim.lr: -1.0 is below the minimum 0.0"),
        ("trainer: 5\n", "trainer: expected a section (mapping)"),
        ("log:\n  wandb: yes please\n", "log.wandb: expected true or false"),
        ("optim:\n  betas: [0.9]\n", "optim.betas: expected two numbers"),
        ("scheduler:\n  warmup_steps: 500\n", "scheduler.warmup_steps: 500 exceeds trainer.max_steps"),
        (
            "pipeline:\n  target: nocolon\n",
            "pipeline.target: 'nocolon' must look like package.module:ClassName",
        ),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, expected):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "broken.yaml", "seed: 1\ntrainer:\n  max_steps: [1, 2\n  log_every: 3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+:\d+: malformed YAML"):
        load_config(path)


def test_tab_indentation_names_the_line(tmp_path):
    path = write(tmp_path, "tabs.yaml", "trainer:\n\tmax_steps: 3\n")
    with pytest.raises(ConfigError, match=r"tabs\.yaml:2: malformed YAML: tab"):
        load_config(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))


def test_base_cycle_is_refused(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize("item", ["trainer.max_steps", "=3", "max_steps:5"])
def test_override_without_equals(item):
    with pytest.raises(ConfigError, match="has no '='"):
        parse_override(item)


def test_unknown_override_key_suggests():
    with pytest.raises(ConfigError, match="did you mean optim.lr"):
        load_config(None, ["optim.lrr=0.1"])


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match="seed: expected an integer"):
        load_config(None, ["seed.x=1"])
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        load_config(None, ["seed=1", "seed.x=1"])


def test_batch_must_divide_over_ranks_and_accumulation():
    cfg = load_config(None, ["data.batch_size=30", "trainer.grad_accum=4"])
    with pytest.raises(
        ConfigError,
        match=r"data.batch_size: 30 does not divide into 2 rank\(s\) x trainer.grad_accum=4; use a multiple of 8",
    ):
        check_batch_divides(cfg, world_size=2)
    check_batch_divides(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=32)), 2)


def test_field_reference_covers_sections():
    keys = [k for k, _, _ in field_docs()]
    assert len(keys) == len(set(keys))
    assert yaml.safe_load(dump_yaml(Config()))["trainer"]["max_steps"] == Config().trainer.max_steps


@pytest.mark.parametrize(
    "overrides, file_text, source",
    [
        (["trainer.max_stepz=3"], "seed: 1\n", "[command line]"),  # a typo on the command line
        (["trainer={max_stepz: 3}"], "seed: 1\n", "[command line]"),  # in a section an override replaced
        (["optim.lr=fast"], "seed: 1\n", "[command line]"),
        (["trainer.max_steps=5", "scheduler.warmup_steps=9"], "seed: 1\n", "[command line]"),  # cross-field
        (["trainer.max_steps=5"], "trainer:\n  max_stepz: 3\n", "[FILE]"),  # the file's typo stays the file's
        (["seed=2"], "optim:\n  lr: fast\n", "[FILE]"),
    ],
)
def test_an_error_names_where_the_bad_value_came_from(tmp_path, overrides, file_text, source):
    """A typo in an override is the command line's, not the config file's or the built-in default's."""
    path = write(tmp_path, "c.yaml", file_text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert str(err.value).endswith(source.replace("FILE", path)), err.value
    with pytest.raises(ConfigError) as err:
        load_config(None, ["trainer.max_stepz=3"])
    assert str(err.value).endswith("[command line]") and "built-in default" not in str(err.value)
