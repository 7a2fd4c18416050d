"""What a user sees when a one-process run is stopped, resumed and tested: SIGTERM leaves one line that
says where it stopped, which checkpoint is committed and how to resume, and that line's promise holds
(the same command resumes from there); `--test` prints the metrics it writes to test_metrics.json."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from tests.conftest import FAST, child_env, main_cmd, read_jsonl, run_main

ARGS = ("pipeline.target=tests.pipelines:ProbeDigits", "pipeline.args.step_delay=0.05", "trainer.max_steps=30",
        "trainer.log_every=1", "trainer.eval_every=0", "checkpoint.every_steps=0", *FAST)  # fmt: skip


def test_sigterm_says_where_it_stopped_the_same_command_resumes_there_and_test_prints_metrics(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(main_cmd(f"run_dir={run_dir}", *ARGS), env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() or len(read_jsonl(run_dir / "metrics.jsonl")) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, "never reached step 5"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    step = next(e["step"] for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "stopped")
    step_dir = run_dir / "checkpoints" / f"step_{step:08d}"
    expected = (f"disttrain: stopped by SIGTERM at step {step}; checkpoint {step_dir} is committed; "
                "run the same command again to resume from it (exit 143)")  # fmt: skip
    assert err.strip().splitlines() == [expected], "one line, and nothing else on stderr"
    assert (step_dir / "manifest.json").exists() and 5 <= step < 30

    again = run_main(f"run_dir={run_dir}", *ARGS)
    assert again.returncode == 0, again.stderr
    assert f"resumed from step {step}\n" in again.stdout

    tested = run_main(f"run_dir={run_dir}", *ARGS, "--test")  # prints what it writes to test_metrics.json
    assert tested.returncode == 0, tested.stderr
    saved = json.loads((run_dir / "test_metrics.json").read_text())
    expected = f"step 30 | test/accuracy {saved['test/accuracy']:.4f} | test/loss {saved['test/loss']:.4f}"
    assert tested.stdout.strip().splitlines()[-1] == expected
