"""A run whose run_dir is on S3 (a real S3 protocol server, moto, on loopback): status, plot, and the
TensorBoard and wandb files that are staged locally and copied up."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install 'moto[server]'")
pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'disttrain[s3]'")

import fsspec  # noqa: E402

from disttrain import cli, fs  # noqa: E402
from disttrain.writers import STEP_KEY, wandb_history  # noqa: E402
from tests.conftest import child_env, run_main  # noqa: E402

pytestmark = pytest.mark.storage
BUCKET = "runs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def s3_run(s3_env):
    fsspec.filesystem("s3").mkdir(BUCKET)
    run_dir = f"s3://{BUCKET}/digits"
    args = (
        "trainer.max_steps=30",
        "trainer.log_every=5",
        "trainer.eval_every=10",
        "checkpoint.every_steps=10",
    )
    logs = ("log.wandb=true", "log.tensorboard=true", "log.plot=true", "trainer.progress=plain")
    proc = run_main(f"run_dir={run_dir}", *args, *logs, env=child_env(**s3_env), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_status_json_of_an_s3_run(s3_run, capsys):
    run_dir, _ = s3_run
    assert cli.main(["status", run_dir, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["state"] == "finished" and report["step"] == report["max_steps"] == 30
    assert [c["step"] for c in report["checkpoints"]] == [10, 20, 30]
    assert all(c["bytes"] > 100_000 for c in report["checkpoints"])
    assert report["last_eval"]["step"] == 30 and report["interruptions"] == []
    g = report["goodput"]  # from the events on S3 alone
    assert 0 < g["goodput"] < 1 and g["queued_s"] == 0 and len(g["segments"]) == 1
    assert (
        g["segments"][0]["ended"] == "finish" and g["startup"]["imports"] > 0 and g["lost"]["checkpoint"] > 0
    )
    assert cli.main(["status", run_dir]) == 0 and "finished" in capsys.readouterr().out
    assert cli.main(["status", f"s3://{BUCKET}/missing"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_curves_on_s3(s3_run, capsys):
    run_dir, _ = s3_run
    assert fs.read_bytes(fs.join(run_dir, "curves.png"))[:8] == PNG_MAGIC  # drawn at the end of the run
    out = f"s3://{BUCKET}/plots/loss.png"
    assert cli.main(["plot", run_dir, "--out", out, "--metrics", "train/loss"]) == 0
    data = fs.read_bytes(out)
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_wandb_and_tensorboard_files_are_copied_up(s3_run, tmp_path):
    run_dir, proc = s3_run
    run_id = fs.read_text(fs.join(run_dir, "wandb_id.txt")).strip()
    assert f"wandb: run {run_id} (offline); staged in" in proc.stdout
    files = list(fs.walk_files(fs.join(run_dir, "wandb")))
    (log,) = [f for f in files if f.endswith(f"/run-{run_id}.wandb")]
    rows = [row for _, row in wandb_history(fs.read_bytes(log))]
    assert [row[STEP_KEY] for row in rows if "train/loss" in row] == [5, 10, 15, 20, 25, 30]
    (events,) = [f for f in fs.walk_files(fs.join(run_dir, "tb")) if "tfevents" in f]
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    (tmp_path / "events.out.tfevents.copy").write_bytes(fs.read_bytes(events))
    acc = accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [5, 10, 15, 20, 25, 30]
