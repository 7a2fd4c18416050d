"""Sweep specs (launch/sweep.py): axes, sweep files, the task list and names, and the best eval metric
a sweep's status ranks by. Submission, SLURM and the status of a real sweep: tests/cluster/test_sweep_array.py."""

from __future__ import annotations

import pytest

from disttrain.commands.sweep_status import best_metric
from disttrain.config import load_config
from disttrain.errors import ConfigError
from disttrain.launch.sweep import expand, read_sweep_file, split_values, task_name


def test_axes_give_the_cartesian_product_in_order():
    tasks = expand(["optim.lr=1e-3,3e-4", "seed=1,2"])
    assert [t.overrides for t in tasks] == [
        ("optim.lr=1e-3", "seed=1"), ("optim.lr=1e-3", "seed=2"), ("optim.lr=3e-4", "seed=1"), ("optim.lr=3e-4", "seed=2"),
    ]  # fmt: skip
    assert [t.index for t in tasks] == [0, 1, 2, 3] and tasks[0].name == "optim.lr=1e-3,seed=1"


def test_list_values_keep_their_commas():
    assert split_values("[0.9,0.95],[0.8,{a: 1, b: 2}],3") == ["[0.9,0.95]", "[0.8,{a: 1, b: 2}]", "3"]
    tasks = expand(["optim.betas=[0.9,0.95],[0.8,0.9]"])
    cfg = load_config(None, list(tasks[1].overrides))
    assert cfg.optim.betas == [0.8, 0.9]


def test_sweep_file_rows_cross_the_axes_and_keep_their_types(tmp_path):
    path = tmp_path / "rows.yaml"
    path.write_text("- {optim.lr: 1.0e-3, name: '1'}\n- {optim.lr: 3.0e-4, name: run b}\n")
    rows = read_sweep_file(str(path))
    tasks = expand(["seed=7,8"], rows)
    assert [t.overrides for t in tasks][1] == ("optim.lr=0.001", 'name="1"', "seed=8")
    assert load_config(None, list(tasks[1].overrides)).name == "1", "a quoted string stays a string"
    assert tasks[2].name == "optim.lr=0.0003,name=run_b,seed=7", "a space is no part of a run dir's name"


@pytest.mark.parametrize(
    "axes, base, needle",
    [
        (["seed=1,2", "seed=3"], [], "seed is swept twice"),
        (["seed=1,2"], ["seed=3"], "seed is both swept and given as an override"),
        (["run_dir=a,b"], [], "the sweep decides each task's run_dir"),
        (["log.wandb_api_key=a,b"], [], "a secret cannot be swept"),
        (["x=a/b,a_b"], [], "would share the run dir 'x=a_b'"),
        (["seed"], [], "write KEY=VALUE1,VALUE2"),
        (["seed=1,2,1"], [], "a value is given twice; list each value once"),
        (
            ["optim.lr=1e-3,0.001,1.0e-3"],
            [],
            "a value is given twice ('1e-3' and '0.001' are the same value)",
        ),
        (["optim.betas=[0.9,0.95],[0.9, 0.950]"], [], "are the same value"),
    ],
)
def test_specs_that_cannot_be_one_array_are_refused(axes, base, needle):
    with pytest.raises(ConfigError) as err:
        expand(axes, base=base)
    assert needle in str(err.value)


def test_a_long_name_is_cut_but_stays_unique():
    a, b = task_name(["init_from=/" + "x" * 200 + "/a"]), task_name(["init_from=/" + "x" * 200 + "/b"])
    assert len(a) == len(b) == 120 and a != b


def test_best_metric_is_the_highest_accuracy_or_the_lowest_loss():
    records = [{"step": 10, "eval/accuracy": 0.8, "eval/loss": 0.5}, {"step": 20, "eval/accuracy": 0.9, "eval/loss": 0.6},
               {"step": 30, "train/loss": 0.1}]  # fmt: skip
    assert best_metric(records) == {"metric": "eval/accuracy", "value": 0.9, "step": 20, "mode": "max"}
    assert best_metric(records, "eval/loss") == {
        "metric": "eval/loss",
        "value": 0.5,
        "step": 10,
        "mode": "min",
    }
    assert best_metric([{"step": 5, "eval/loss": 2.0}])["metric"] == "eval/loss"
    assert best_metric([{"step": 5, "train/loss": 2.0}]) is None


def test_equal_values_that_read_differently_are_still_distinct_when_they_differ():
    assert [t.overrides for t in expand(["seed=1,true"])] == [("seed=1",), ("seed=true",)]  # 1 is not true
    assert len(expand(["optim.lr=1e-3,1e-4"])) == 2


def test_two_sweep_file_rows_that_resolve_to_one_config_are_refused(tmp_path):
    """`1e-3` (a string to YAML) and `0.001` name different run dirs but train the same run."""
    from disttrain.launch import array
    from disttrain.launch.options import parse

    rows = tmp_path / "rows.yaml"
    rows.write_text("- {optim.lr: 1e-3}\n- {optim.lr: 0.001}\n")
    with pytest.raises(ConfigError) as err:
        array.prepare(parse(["--dry-run", "--sweep-file", str(rows), f"run_dir={tmp_path / 'sweep'}"]))
    assert "sweep tasks 0 (optim.lr=1e-3) and 1 (optim.lr=0.001) resolve to the same config" in str(err.value)
    assert not (tmp_path / "sweep").exists()
