"""Eval on several ranks is the eval of the saved model, also for a model with buffers (BatchNorm
running statistics drift apart between ranks in training; the checkpoint holds rank 0's)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST, read_jsonl, run_main


def test_logged_eval_equals_a_single_process_test_of_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = (
        f"run_dir={run_dir}",
        "pipeline.target=tests.pipelines:BatchNormDigits",
        "data.eval_batch_size=64",
        *FAST,
    )
    proc = run_main(*args, "trainer.max_steps=20", "trainer.eval_every=0", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/loss" in r][-1]
    assert logged["step"] == 20
    tested = run_main(*args, "--test")  # one process, the final checkpoint, the same split
    assert tested.returncode == 0, tested.stderr[-3000:]
    result = json.loads((run_dir / "test_metrics.json").read_text())
    assert result["step"] == 20
    # Float32 sums in other batch groupings differ in the last bits only; other buffers differ by far more.
    assert result["test/loss"] == pytest.approx(logged["eval/loss"], rel=1e-6, abs=0)
    assert result["test/accuracy"] == logged["eval/accuracy"]
