"""Which rank, which node (DESIGN §7b), with two real ranks under torchrun: a rank slowed by a known
sleep is named with its host, its section and a cost close to the delay, in the events and in what
`disttrain status` shows (goodput counting the wait as its own cause); an even run names nobody; a
rank stuck in its loss, or in its data loader, is named by the other's error line, the `hang` event,
the stack files and `status`, and the job ends within the documented bound."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from disttrain import cli
from tests.conftest import FAST, child_env, main_cmd, read_jsonl

pytestmark = pytest.mark.multiproc

HOST = socket.gethostname()


def _events(run_dir, name: str) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == name]


def _train(run_dir, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        main_cmd(f"run_dir={run_dir}", "pipeline.target=tests.pipelines:SlowRank", *FAST, *args, nproc=2),
        capture_output=True, text=True, timeout=timeout, env=child_env(),
    )  # fmt: skip


def _status(run_dir, capsys) -> tuple[dict, list[str]]:
    """What a user reads: `disttrain status --json`, and the human view's lines."""
    assert cli.main(["status", str(run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert cli.main(["status", str(run_dir)]) == 0
    return report, capsys.readouterr().out.splitlines()


def test_a_slow_rank_is_named_with_its_host_section_and_cost_and_an_even_run_names_nobody(tmp_path, capsys):
    delay, steps = 0.05, 40
    slow = _train(tmp_path / "slow", f"pipeline.args.delay={delay}", "pipeline.args.base=0.02",
                  f"trainer.max_steps={steps}", "trainer.log_every=5", "trainer.eval_every=0")  # fmt: skip
    assert slow.returncode == 0, slow.stderr[-3000:]
    found = _events(tmp_path / "slow", "straggler")
    assert found and {(e["rank"], e["host"], e["section"]) for e in found} == {(1, HOST, "forward")}, found
    waited = sum(e["waited_s"] for e in found)
    windows = sum(e["windows"] for e in found)
    assert windows >= 6, found  # the first window holds start-up: it may not be among them
    assert waited == pytest.approx(delay * 5 * windows, rel=0.25), (waited, windows)
    logged = [r for r in read_jsonl(tmp_path / "slow" / "metrics.jsonl") if "train/slowest_rank" in r]
    assert sum(r["train/slowest_rank"] == 1 for r in logged) >= len(logged) - 1, logged
    report, lines = _status(tmp_path / "slow", capsys)
    [named] = report["stragglers"]["ranks"]
    assert (named["rank"], named["host"], named["section"]) == (1, HOST, "forward") and named["ratio"] > 1.5
    assert named["waited_s"] == pytest.approx(waited, abs=1e-3)
    said = next((x for x in lines if x.startswith("stragglers   ")), "")
    assert (
        said.startswith(f"stragglers   rank 1 on {HOST}: the others waited ") and " in forward (" in said
    ), lines
    lost = report["goodput"]["lost"]
    assert lost["stragglers"] == pytest.approx(waited, rel=0.05), lost  # kept steps all: the whole wait
    assert lost["unexplained"] < lost["stragglers"], "the wait is no longer unexplained"

    even = _train(tmp_path / "even", "pipeline.args.base=0.02", f"trainer.max_steps={steps}", "trainer.log_every=5",
                  "trainer.eval_every=0")  # fmt: skip
    assert even.returncode == 0, even.stderr[-3000:]
    assert _events(tmp_path / "even", "straggler") == [], "no false straggler on an even run"
    report, lines = _status(tmp_path / "even", capsys)
    assert report["stragglers"]["ranks"] == [] and report["goodput"]["lost"]["stragglers"] == 0
    assert not [x for x in lines if x.startswith(("stragglers", "hang"))], lines


@pytest.mark.parametrize(
    "how, where",
    [
        ("pipeline.args.hang_at=10", "in section forward at"),
        ("pipeline.args.stall_data_at=10", "waiting for its data loader"),
    ],
    ids=["stuck-in-loss", "stuck-data-loader"],
)
def test_a_hung_rank_is_named_by_the_others_with_its_frame(tmp_path, capsys, how, where):
    timeout_s = 10
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    proc = _train(run_dir, how, "trainer.max_steps=40", "trainer.log_every=1", "trainer.eval_every=0",
                  f"trainer.collective_timeout_s={timeout_s}", timeout=180)  # fmt: skip
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    line = next((x for x in out.splitlines() if x.startswith("disttrain: rank 0: training failed")), "")
    assert f"rank 1 on {HOST} did not reach the gradient all-reduce" in line and where in line, out[-4000:]
    frame = "loss()" if "hang_at" in how else "__getitems__()"
    assert "tests/pipelines.py" in line and frame in line, line
    hang = _events(run_dir, "hang")
    assert hang and hang[-1]["ranks"][0]["rank"] == 1 and frame in hang[-1]["ranks"][0]["frame"], hang
    stack = json.loads((run_dir / "stacks" / "rank_1.json").read_text())
    assert stack["host"] == HOST and stack["step"] == 9 and frame.rstrip("()") in "".join(stack["stack"])
    assert (run_dir / "stacks" / "rank_0.json").exists(), "the waiting rank says where it waited, too"
    report, lines = _status(run_dir, capsys)
    assert report["state"] == "failed" and report["hangs"][-1]["ranks"][0]["host"] == HOST
    said = [x for x in lines if x.startswith("hang ")]
    assert len(said) == 1 and f"step 9: rank 1 on {HOST} did not reach the gradient all-reduce" in said[0], (
        lines
    )
    assert where in said[0] and "tests/pipelines.py" in said[0] and said[0].endswith(frame), said
    # The survivor's collective gives up at the timeout; the hung rank ends itself a margin later, and
    # torchrun's SIGTERM-to-SIGKILL wait is not needed for it: the job ends well before timeout + 30 s.
    assert took < 2 * timeout_s + 30, took
