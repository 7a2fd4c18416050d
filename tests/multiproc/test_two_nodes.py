"""Multi-node torchrun as two "nodes" on this machine: two torchrun agents (`--nnodes 2 --nproc_per_node 1`)
meeting through a c10d rendezvous. One node is stopped with SIGTERM (what a scheduler sends a node's
launcher): its torchrun shuts its worker down with SIGTERM and exits 1; the worker on the other node learns
of the stop through the per-step agreement, both save at the same step and exit 143; the surviving
agent restarts its worker (`--max-restarts 1`) and waits in the rendezvous until a replacement node,
started with the same command, joins. The run resumes from the stop checkpoint and ends bit-identical to
a single-node run of the same world size (test_exact_resume's reference).

TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with torch 2.13's default (workers share the agent's rendezvous
store), a surviving rank-0 agent does not publish the store's address again in the new rendezvous round
and the replacement waits for it until it times out (seen here: both agents fail after 60 s).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import child_env, free_port, read_jsonl
from tests.multiproc.test_exact_resume import BASE, STEPS, logged_step, outcome, reference

pytestmark = pytest.mark.multiproc


def node(run_dir: Path, port: int, host: bool, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
        # Both "nodes" match the endpoint's address (on real nodes only the endpoint's host would). A node
        # that died without leaving the rendezvous holds its place until its heartbeat has been missed
        # keep_alive_max_attempt times: 1 s x 3 here rather than the default 5 s x 3.
        "--rdzv-conf", f"is_host={int(host)},keep_alive_interval=1,keep_alive_max_attempt=3", "--max-restarts", "1",
        "-m", "disttrain.main", f"run_dir={run_dir}", *BASE,
    ]  # fmt: skip
    env = child_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def test_a_node_stopped_by_sigterm_is_replaced_and_the_run_matches_one_node(tmp_path, tmp_path_factory):
    expected = reference(tmp_path_factory, ())
    run_dir, port = tmp_path / "run", free_port()
    logs = [tmp_path / f"node{i}.log" for i in range(3)]
    nodes = [node(run_dir, port, True, logs[0]), node(run_dir, port, False, logs[1])]
    try:
        deadline = time.monotonic() + 120
        while not logged_step(6)(run_dir):
            assert all(n.poll() is None for n in nodes) and time.monotonic() < deadline, _tail(logs)
            time.sleep(0.05)
        nodes[1].send_signal(signal.SIGTERM)
        assert nodes[1].wait(timeout=60) == 1, "torchrun exits 1 when it is signalled"
        assert "Received 15 death signal, shutting down workers" in logs[1].read_text()
        nodes.append(node(run_dir, port, False, logs[2]))  # the replacement joins the waiting node
        codes = [nodes[0].wait(timeout=180), nodes[2].wait(timeout=180)]
    finally:
        for n in nodes:
            n.kill()
    assert codes == [0, 0], _tail(logs)

    events = read_jsonl(run_dir / "events.jsonl")
    stopped = next(e for e in events if e["event"] == "stopped")
    assert stopped["signal"] == "SIGTERM" and 6 <= stopped["step"] < STEPS
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["step"] == stopped["step"] and [e["event"] for e in events][-2:] == ["finish", "exit"]
    line = f"disttrain: stopped by SIGTERM at step {stopped['step']}; checkpoint "
    assert any(line in log.read_text() for log in logs[:2]), "rank 0 says where it stopped"
    assert outcome(run_dir) == expected


def _tail(logs: list[Path]) -> str:
    return "\n".join(f"== {p.name}\n" + p.read_text()[-2000:] for p in logs if p.exists())
