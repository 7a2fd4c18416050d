"""Config changes on resume (issue 11, cases 3-5): every key is either applied for real, with the
applied value in the logs, or refused with one line; and a log torn by a kill does not swallow the
record appended after the resume."""

from __future__ import annotations

import json

import pytest
import torch

from disttrain.config import RESUME_CRITICAL_KEYS
from tests.conftest import FAST, REPO, read_jsonl, run_main
from tests.unit.test_main import assert_refused

BASE = (
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "checkpoint.every_steps=2",
    "scheduler.name=constant",
    *FAST,
)
CHANGES = ("optim.lr=0.01", "optim.weight_decay=0.05", "optim.betas=[0.8,0.95]")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """4 steps; then torn last lines in metrics.jsonl and events.jsonl (a kill mid-append); then a
    resume to step 8 with new optimizer settings."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    first = run_main(f"run_dir={run_dir}", "trainer.max_steps=4", *BASE)
    assert first.returncode == 0, first.stderr[-3000:]
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "train/lo')
    with open(run_dir / "events.jsonl", "a") as fh:
        fh.write('{"time": 17000, "ev')
    second = run_main(f"run_dir={run_dir}", "trainer.max_steps=8", *BASE, *CHANGES)
    assert second.returncode == 0, second.stderr[-3000:]
    return run_dir, second


def test_changed_optimizer_settings_are_applied_and_logged(resumed):
    run_dir, proc = resumed
    note = next(line for line in proc.stdout.splitlines() if line.startswith("note: config changed"))
    assert (
        "applied from step 4" in note and "optim.lr: 0.003 -> 0.01" in note and "optim.weight_decay" in note
    )
    lrs = {r["step"]: r["train/lr"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/lr" in r}
    assert [lrs[s] for s in (1, 4)] == [0.003, 0.003] and [lrs[s] for s in range(5, 9)] == [0.01] * 4
    state = torch.load(run_dir / "checkpoints" / "step_00000008" / "state.pt", weights_only=True)
    decay, no_decay = state["optimizer"]["param_groups"]
    assert (decay["lr"], decay["initial_lr"], decay["weight_decay"], no_decay["weight_decay"]) == (
        0.01,
        0.01,
        0.05,
        0.0,
    )
    assert tuple(decay["betas"]) == (0.8, 0.95) and state["scheduler"]["base_lrs"] == [0.01, 0.01]


def test_a_torn_last_line_does_not_swallow_the_next_record(resumed):
    run_dir, _ = resumed
    for name in ("metrics.jsonl", "events.jsonl"):
        for line in (run_dir / name).read_text().splitlines():
            json.loads(line)  # every line is a whole record
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 9))
    events = [e["event"] for e in read_jsonl(run_dir / "events.jsonl")]
    assert events.count("start") == 2 and "resume" in events and events[-2:] == ["finish", "exit"]


def test_changing_the_shuffle_of_a_run_is_refused(resumed):
    run_dir, _ = resumed
    before = (run_dir / "metrics.jsonl").read_text()
    proc = run_main(f"run_dir={run_dir}", "trainer.max_steps=10", *BASE, *CHANGES, "data.shuffle=false")
    assert_refused(proc, "data.shuffle: True -> False", "start a new run_dir")
    assert (run_dir / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    "damaged, problem",
    [("42\n", "holds a int"), ("- a\n- b\n", "holds a list"), ("a: [1, 2\n", "is not YAML")],
)
def test_a_damaged_config_yaml_is_set_aside_and_the_run_resumes(tmp_path, damaged, problem):
    """Issue 19, adversarial 6: a scalar, a list or invalid YAML in RUN_DIR/config.yaml made every
    resume crash with a traceback until the file was deleted."""
    run_dir = tmp_path / "run"
    first = run_main(f"run_dir={run_dir}", "trainer.max_steps=2", *BASE)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir / "config.yaml").write_text(damaged)
    again = run_main(f"run_dir={run_dir}", "trainer.max_steps=4", *BASE)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-3000:]
    warning = next(line for line in again.stderr.splitlines() if "config.yaml" in line)
    aside = next(run_dir.glob("config.yaml.damaged-*"))
    assert (
        warning.startswith(f"disttrain: warning: {run_dir / 'config.yaml'} {problem}")
        and aside.name in warning
    )
    assert aside.read_text() == damaged and "max_steps: 4" in (run_dir / "config.yaml").read_text()


def test_readme_names_exactly_the_keys_refused_on_resume():
    """The rule lives in config.RESUME_CRITICAL_KEYS; README's reliability section must say the same."""
    readme = (REPO / "README.md").read_text()
    paragraph = readme.split("**Config changes on resume.**", 1)[1].split("\n\n", 1)[0]
    refused = paragraph.split("Refused", 1)[1].split("Every other key", 1)[0]
    named = {word.strip("`,.():") for word in refused.split() if word.startswith("`") and "=" not in word}
    assert named == set(RESUME_CRITICAL_KEYS), named ^ set(RESUME_CRITICAL_KEYS)
