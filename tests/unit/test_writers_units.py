"""Writer pieces in-process: the .wandb log reader, secret masking, staging to a remote dir."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from disttrain import fs
from disttrain.config import load_config
from disttrain.errors import ConfigError
from disttrain.run import check_writers
from disttrain.secrets import REDACTED, redact_argv, secret_values
from disttrain.writers import EventLog, Staging, _logged_floors, truncate_after, wandb_history, wandb_run_id
from tests.conftest import child_env

WRITE_WANDB_LOG = """
import sys, wandb
run = wandb.init(project="p", id="blocks", dir=sys.argv[1], mode="offline",
                 settings=wandb.Settings(console="off", silent=True))
for step in range(1, 601):
    run.log({"loss": 1.0 / step, "note": "x" * 200}, step=step)  # ~150 KB: rows span 32 KiB blocks
run.finish()
"""


@pytest.fixture(scope="module")
def wandb_log(tmp_path_factory) -> bytes:
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wandb_blocks")
    subprocess.run(
        [sys.executable, "-c", WRITE_WANDB_LOG, str(root)], check=True, env=child_env(), timeout=120
    )
    (path,) = root.glob("wandb/offline-run-*/run-blocks.wandb")
    return path.read_bytes()


def test_wandb_reader_reads_every_row_across_blocks(wandb_log):
    assert len(wandb_log) > 3 * 32768
    rows = wandb_history(wandb_log)
    assert [step for step, _ in rows] == list(range(1, 601))
    assert rows[9][1]["loss"] == pytest.approx(0.1) and rows[9][1]["_step"] == 10


def test_wandb_reader_stops_at_a_torn_tail(wandb_log):
    cut = wandb_log[: len(wandb_log) // 2 + 123]  # what a kill -9 mid-write leaves
    steps = [step for step, _ in wandb_history(cut)]
    assert steps == list(range(1, len(steps) + 1)) and 100 < len(steps) < 600
    flipped = bytearray(wandb_log)
    flipped[40000] ^= 0xFF  # a corrupt chunk: its CRC fails, the scan ends before it
    assert len(wandb_history(bytes(flipped))) < 600
    with pytest.raises(ValueError, match="not a version-0"):
        wandb_history(b"SQLite format 3\0")


def test_wandb_run_id_is_created_once(tmp_path):
    first = wandb_run_id(str(tmp_path))
    assert wandb_run_id(str(tmp_path)) == first == (tmp_path / "wandb_id.txt").read_text().strip()


def test_secret_values_come_from_the_environment_and_secret_config_keys(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh12345")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # short: not masked everywhere
    monkeypatch.setenv("SOME_PATH", "/not/a/secret/at/all")
    cfg = load_config(None, ["pipeline.args.api_token=tok-0123456789", "pipeline.args.hidden=123456789"])
    values = secret_values(cfg)
    assert "hf_abcdefgh12345" in values and "tok-0123456789" in values
    assert "false" not in values and "/not/a/secret/at/all" not in values and "123456789" not in values


def test_redact_argv_masks_secret_overrides_flags_and_known_values():
    argv = [
        "--config",
        "c.yaml",
        "pipeline.args.api_token=abc",
        "--hf-token",
        "xyz",
        "--x=hunter2hunter2",
        "lr=3",
    ]
    assert redact_argv(argv, ["hunter2hunter2"]) == [
        "--config", "c.yaml", f"pipeline.args.api_token={REDACTED}", "--hf-token", REDACTED, f"--x={REDACTED}", "lr=3",
    ]  # fmt: skip


def test_event_log_masks_secrets_in_free_text(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    cfg = load_config(None, ["pipeline.args.password=p4ssw0rd-long"])
    log = EventLog(str(tmp_path), "job1", 0, cfg=cfg)
    log.emit("error", step=3, error="S3 refused wJalrXUtnFEMI/K7MDENG and p4ssw0rd-long")
    record = json.loads((tmp_path / "events.jsonl").read_text())
    assert record["error"] == f"S3 refused {REDACTED} and {REDACTED}" and record["job_id"] == "job1"


def test_truncate_after_returns_the_last_step_before(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (5, 10, 15)) + '{"step": 2')
    assert truncate_after(str(path), 10) == 15
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()[:2]] == [5, 10]


def test_staging_copies_new_and_changed_files_to_a_remote_dir(tmp_path):
    stage = Staging("memory://bucket/run/tb")
    local = stage.local
    (tmp_path / "elsewhere").write_text("x")
    with open(f"{local}/events.1", "w") as fh:
        fh.write("a")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "link").rename(f"{local}/latest-run")  # wandb's shortcut links are not copied
    stage.sync()
    with open(f"{local}/events.1", "a") as fh:
        fh.write("bc")
    stage.close()
    assert fs.read_text("memory://bucket/run/tb/events.1") == "abc"
    assert not fs.exists("memory://bucket/run/tb/latest-run")
    assert not fs.exists(local), "the staging folder is removed at close"


def test_the_wandb_floor_is_read_from_a_remote_run_dir(wandb_log):
    # A segment on another node finds what earlier segments copied up to s3:// (memory:// here).
    fs.write_bytes("memory://floor/run/wandb/offline-run-20260101_000000-blocks/run-blocks.wandb", wandb_log)
    fs.write_bytes("memory://floor/run/wandb/offline-run-20260101_000000-other/run-other.wandb", b"junk")
    assert _logged_floors("memory://floor/run/wandb", "blocks", None) == ({"loss": 600, "note": 600}, -1)
    assert _logged_floors("memory://floor/run/wandb", "missing", None) == ({}, -1)
    # an unreadable log (a future format): every metric's floor is metrics.jsonl's last step
    assert _logged_floors("memory://floor/run/wandb", "other", 42) == ({}, 42)


def test_a_writer_that_is_not_installed_is_refused_with_a_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    check_writers(load_config(None, ["log.tensorboard=true"]))
    with pytest.raises(
        ConfigError, match=r"log.wandb=true but wandb is not installed: pip install 'disttrain\[wandb\]'"
    ):
        check_writers(load_config(None, ["log.wandb=true"]))
