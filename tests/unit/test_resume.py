"""Resume as a user meets it on one process: auto, never, an explicit path, config changes, fallback."""

from __future__ import annotations

import json

from tests.conftest import FAST, read_jsonl, run_main

SHORT = [
    "trainer.max_steps=12",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "checkpoint.every_steps=4",
    "scheduler.name=constant",
    *FAST,
]


def train(run_dir, *extra):
    proc = run_main(f"run_dir={run_dir}", *SHORT, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_auto_resume_logs_and_records_it(tmp_path):
    train(tmp_path, "trainer.max_steps=8")
    proc = train(tmp_path)
    assert "resumed from step 8" in proc.stdout
    assert (
        "note: config changed since the checkpoint, applied from step 8: trainer.max_steps: 8 -> 12"
        in proc.stdout
    )
    events = read_jsonl(tmp_path / "events.jsonl")
    resume = [e for e in events if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 8
    saved = [e for e in events if e["event"] == "checkpoint"]
    assert [e["step"] for e in saved] == [4, 8, 12] and all(
        e["bytes"] > 100_000 and e["seconds"] > 0 for e in saved
    )
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r] == list(
        range(1, 13)
    )


def test_resume_never_refuses_a_run_dir_with_checkpoints(tmp_path):
    train(tmp_path, "trainer.max_steps=4")
    before = (tmp_path / "config.yaml").read_text()
    proc = run_main(f"run_dir={tmp_path}", *SHORT, "resume=never")
    assert proc.returncode == 2 and "resume=never but" in proc.stderr and "step_00000004" in proc.stderr
    assert (tmp_path / "config.yaml").read_text() == before


def test_resume_never_ignores_a_half_written_save(tmp_path):
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)  # no manifest: never committed
    train(tmp_path, "trainer.max_steps=4", "resume=never")


def test_incompatible_change_is_refused_and_named(tmp_path):
    train(tmp_path, "trainer.max_steps=4")
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    proc = run_main(f"run_dir={tmp_path}", *SHORT, "data.batch_size=32", "pipeline.args.width=16")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "data.batch_size: 64 -> 32" in line and "pipeline.args" in line and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_resume_from_an_explicit_checkpoint_path(tmp_path):
    src = tmp_path / "src"
    train(src, "trainer.max_steps=8")
    dst = tmp_path / "dst"
    proc = train(dst, f"resume={src / 'checkpoints' / 'step_00000004'}")
    assert "resumed from step 4" in proc.stdout
    assert [r["step"] for r in read_jsonl(dst / "metrics.jsonl") if "train/loss" in r] == list(range(5, 13))


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    train(tmp_path, "trainer.max_steps=8")
    weights = tmp_path / "checkpoints" / "step_00000008" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = train(tmp_path)
    assert "resumed from step 4" in proc.stdout
    assert "step_00000008" in proc.stderr and "model.safetensors" in proc.stderr
    final = json.loads((tmp_path / "checkpoints" / "step_00000012" / "manifest.json").read_text())
    assert final["step"] == 12
