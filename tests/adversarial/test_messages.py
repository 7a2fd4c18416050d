"""What a failing run prints (issue 11, smaller items): known secret values are masked in everything
disttrain prints, stderr and tracebacks included; a failure before the trainer exists names the real
collective timeout; gloo's wording for a peer that hung during eval is recognised."""

from __future__ import annotations

from disttrain import dist, run
from disttrain.cluster import ClusterEnv
from disttrain.config import Config
from tests.conftest import FAST, child_env, run_main

TOKEN = "tok-7Hq2Lw9Zp3Xv"
WANDB_KEY = "wandb-k3y-5RtY8uIo"


def test_secrets_quoted_by_an_exception_are_masked_in_the_output(tmp_path):
    proc = run_main(f"run_dir={tmp_path / 'run'}", "pipeline.target=tests.adversarial.pipelines:LeakyFailure",
                    f"pipeline.args.api_token={TOKEN}", "trainer.max_steps=5", *FAST,
                    env=child_env(WANDB_API_KEY=WANDB_KEY), timeout=180)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" in proc.stderr, out[-3000:]  # the user's error, reported
    assert "bucket refused token ***REDACTED*** (key ***REDACTED***)" in proc.stderr, out[-3000:]
    assert TOKEN not in out and WANDB_KEY not in out
    assert proc.stderr.strip().splitlines()[-1].startswith("disttrain: rank 0: training failed: RuntimeError")


def test_a_failure_before_the_trainer_exists_names_the_configured_timeout(capsys):
    cfg = Config()
    cfg.trainer.collective_timeout_s = 7.0
    err = RuntimeError("Connection closed by peer [127.0.0.1]:29500")
    result = run._failed(None, cfg, ClusterEnv(launcher="torchrun"), err)
    assert result.exit_code() == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "another rank died or hangs (trainer.collective_timeout_s=7.0)" in line and "None" not in line


def test_a_pair_closed_by_gloo_on_timeout_is_a_collective_failure():
    err = RuntimeError("[../third_party/gloo/gloo/pair.cc:601] Application timeout caused pair closure")
    assert dist.is_collective_failure(err)
