"""What a run dir may hold besides disttrain's own files (issue 11, case 2 and the leftover temp
files): retention never deletes through a symlink or outside the run dir, a stray entry never stops
saves, and a `latest` being replaced when a save was killed is cleaned up."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import FAST, read_jsonl, run_main
from tests.unit.test_main import assert_refused


def test_symlinked_step_dirs_are_neither_followed_nor_allowed_to_wedge_saves(tmp_path):
    outside_ckpt = tmp_path / "elsewhere" / "precious"
    outside_ckpt.mkdir(parents=True)
    manifest = json.dumps({"step": 2, "note": "someone else's checkpoint"})
    (outside_ckpt / "manifest.json").write_text(manifest)
    (outside_ckpt / "model.safetensors").write_bytes(b"weights")
    outside_empty = tmp_path / "elsewhere" / "no_manifest"
    outside_empty.mkdir()
    (outside_empty / "data.bin").write_bytes(b"data")

    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    os.symlink(outside_ckpt, ckpts / "step_00000002")  # looks committed: it has a manifest
    os.symlink(outside_empty, ckpts / "step_00000004")  # a step dir a save of step 4 would collide with
    (ckpts / ".latest.k2j4h6g8.tmp").write_text("step_00000001")  # a killed save's `latest` in progress

    proc = run_main(f"run_dir={run_dir}", "trainer.max_steps=8", "trainer.eval_every=0",
                    "checkpoint.every_steps=2", "checkpoint.keep_last=1", *FAST, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert (outside_ckpt / "manifest.json").read_text() == manifest  # never deleted through the link
    assert (outside_ckpt / "model.safetensors").read_bytes() == b"weights"
    assert (outside_empty / "data.bin").read_bytes() == b"data"
    saved = [e["step"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "checkpoint"]
    assert saved == [2, 4, 6, 8], "every save went through"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000008"]
    assert not any(p.is_symlink() for p in ckpts.iterdir())


@pytest.mark.parametrize("name", ["lease.json", "events.jsonl", "metrics.jsonl"])
def test_a_symlinked_run_dir_file_is_refused_and_never_written_through(tmp_path, name):
    """Issue 19, adversarial 5: lease.json as a symlink had its target outside the run dir truncated and
    overwritten; events.jsonl as a symlink was appended through."""
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("not disttrain's\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink(outside, run_dir / name)
    proc = run_main(f"run_dir={run_dir}", "trainer.max_steps=2", "trainer.eval_every=0", *FAST, timeout=180)
    assert_refused(proc, f"run_dir: {run_dir / name} is a symbolic link (to {outside})", "remove it")
    assert outside.read_text() == "not disttrain's\n"
    assert sorted(p.name for p in run_dir.iterdir()) == [name]
