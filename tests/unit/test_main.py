"""The entry point as a user meets it: bad input exits 2 with one line and leaves nothing behind."""

from __future__ import annotations

import pytest

from tests.conftest import child_env, run_main


def assert_refused(proc, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{proc.stderr}"
    assert lines[0].startswith("disttrain: error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["trainer.max_stepz=5"], ["trainer.max_stepz", "did you mean trainer.max_steps?"]),
        (["trainer.max_steps=abc"], ["trainer.max_steps: expected an integer"]),
        (["optim.lr=-3"], ["optim.lr", "below the minimum"]),
        (["trainer.max_steps"], ["has no '='", "key=value"]),
        (["--config", "missing.yaml"], ["missing.yaml", "not found"]),
        (["--bogus-flag"], ["unrecognized arguments: --bogus-flag"]),
        (["pipeline.target=nosuch.module:Pipe"], ["pipeline.target", "nosuch.module"]),
        (["pipeline.args.widht=8"], ["pipeline.args.widht", "did you mean pipeline.args.width?"]),
        (["data.batch_size=63", "trainer.grad_accum=2"], ["data.batch_size: 63", "use a multiple of 2"]),
        (["resume=/no/such/ckpt"], ["resume", "does not exist"]),
        (["run_dir=nosuchproto://bucket/run"], ["cannot open", "nosuchproto"]),
    ],
)
def test_bad_input_exits_2_and_creates_nothing(tmp_path, args, needles):
    run_dir = tmp_path / "run"
    proc = run_main(f"run_dir={run_dir}", *args, timeout=120)
    assert_refused(proc, *needles)
    assert not run_dir.exists()


def test_malformed_yaml_names_file_and_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trainer:\n  max_steps: 5\n  log_every: [1\n")
    proc = run_main("--config", str(cfg), f"run_dir={tmp_path / 'run'}")
    assert_refused(proc, "c.yaml:", "malformed YAML")
    assert not (tmp_path / "run").exists()


def test_run_dir_that_is_a_file(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    assert_refused(run_main(f"run_dir={target}"), "is a file")
    assert target.read_text() == "x"


def test_batch_that_does_not_divide_across_ranks(tmp_path):
    # The world size comes from the launcher's environment; the check runs before any process group.
    env = child_env(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    proc = run_main(f"run_dir={tmp_path / 'run'}", "data.batch_size=64", env=env)
    assert_refused(proc, "does not divide into 3 rank(s)", "data.batch_size=66")
    assert not (tmp_path / "run").exists()


def test_cli_unknown_command():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "disttrain", "frobnicate"], capture_output=True, text=True,
                          env=child_env())  # fmt: skip
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr
