"""Peer copies of the local tier (issue 20, item 2) across two torchrun agents: two "nodes" on this machine
(`--nnodes 2 --nproc_per_node 1`, a c10d rendezvous), each with its own node-local folder, so each is its
own failure domain. Every local step, each rank also sends its piece to the rank on the other node
(`checkpoint.local.replicas=1`, the default), which keeps it.

One node's worker is frozen, its local folder wiped (the node's memory lost) and the worker killed -9; its
torchrun restarts both workers inside the same invocation (`--max-restarts 1`). The rank whose pieces are
gone gets them from the other node's copy over gloo: the resume says tier "peer" and the run ends
bit-identical to one never interrupted. With that node's own piece corrupted instead, the restart tries
it, finds the sha256 wrong, takes the peer copy, and records why (tier_fallback local -> peer).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import child_env, free_port, read_jsonl
from tests.multiproc.test_exact_resume import BASE, STEPS, outcome, reference

pytestmark = pytest.mark.multiproc

LOCAL_EVERY = 4


def node(run_dir: Path, local: Path, port: int, host: bool, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "peers",
        "--rdzv-conf", f"is_host={int(host)},keep_alive_interval=1,keep_alive_max_attempt=3", "--max-restarts", "1",
        "-m", "disttrain.main", f"run_dir={run_dir}", *BASE, "resume=never",
        # No durable checkpoint before the final one: only the local tier (own or peer) can serve.
        "checkpoint.every_steps=1000", f"checkpoint.local.every_steps={LOCAL_EVERY}", f"checkpoint.local.dir={local}",
    ]  # fmt: skip
    env = child_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # see test_two_nodes
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def steps(folder: Path) -> list[int]:
    """Committed pieces in one folder (a manifest makes one), oldest first."""
    return sorted(int(p.parent.name[5:]) for p in folder.glob("step_*/manifest.json") if ".tmp" not in str(p))


def worker(agent: subprocess.Popen) -> psutil.Process:
    (child,) = psutil.Process(agent.pid).children()
    return child


def run_and_break_node_b(tmp_path: Path, damage, spare: bool = False) -> tuple[Path, list[Path], int, int]:
    """Two agents; once node A keeps a copy of node B's piece of step 8 or later, freeze B's worker,
    `damage(a_dir, b_dir, b_rank, copied_step)`, kill -9 the worker; both agents finish. With `spare`, a
    third agent (node C) waits for a place in the rendezvous from the start of training, and node B's
    agent is killed with its worker (the node lost whole): A's restart takes C in instead. Returns the run
    dir, logs, B's rank before the kill and the newest step of B's piece node A held a copy of."""
    run_dir, port = tmp_path / "run", free_port()
    names = ["node_a", "node_b", "node_c"][: 3 if spare else 2]
    dirs = [tmp_path / name for name in names]
    logs = [tmp_path / f"{name}.log" for name in names]
    agents = [node(run_dir, dirs[i], port, i == 0, logs[i]) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while True:
            assert all(a.poll() is None for a in agents) and time.monotonic() < deadline, _tail(logs)
            if spare and len(agents) == 2 and steps_anywhere(dirs[0]):  # training: the round is full
                agents.append(node(run_dir, dirs[2], port, False, logs[2]))
            copies = [p for p in dirs[0].glob("peer_*") if steps(p) and steps(p)[-1] >= 2 * LOCAL_EVERY]
            if copies and len(agents) == len(names):
                break
            time.sleep(0.01)
        assert not dirs[-1].exists() or not spare, "the spare trained before a node was lost"
        victim = worker(agents[1])
        b_rank = int(victim.environ()["RANK"])
        victim.send_signal(signal.SIGSTOP)  # nothing more written by node B from here
        copied = steps(dirs[0] / f"peer_{b_rank:05d}")[-1]
        damage(dirs[0], dirs[1], b_rank, copied)
        if spare:
            agents[1].kill()  # the agent first: it must not restart its worker
            agents[1].wait()
        victim.send_signal(signal.SIGKILL)
        codes = [a.wait(timeout=180) for a in agents]
    finally:
        for a in agents:
            a.kill()
    expected = [0, -signal.SIGKILL, 0] if spare else [0, 0]
    assert codes == expected, _tail(logs)
    return run_dir, logs, b_rank, copied


def steps_anywhere(folder: Path) -> bool:
    return any(steps(p) for p in folder.glob("rank_*"))


def test_a_node_whose_local_folder_is_lost_resumes_from_the_peer_copy_bit_identical(
    tmp_path, tmp_path_factory
):
    expected = reference(tmp_path_factory, ())
    wipe = lambda a, b, rank, step: shutil.rmtree(b)  # noqa: E731
    run_dir, logs, _, copied = run_and_break_node_b(tmp_path, wipe)

    events = read_jsonl(run_dir / "events.jsonl")
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["tier"] == "peer" and resume["restart_count"] == 1, resume
    # The newest step both ranks had: node A's own piece and its copy of B's, which B was frozen after.
    assert resume["step"] == copied and 0 <= resume["interrupted_at"] - resume["step"] <= 2 * LOCAL_EVERY
    assert not [e for e in events if e["event"] == "tier_fallback"]
    assert [e["event"] for e in events][-2:] == ["finish", "exit"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [f"step_{STEPS:08d}"]
    assert any("(peer tier)" in log.read_text() for log in logs), _tail(logs)
    assert outcome(run_dir) == expected
    for folder in (tmp_path / "node_a", tmp_path / "node_b"):
        assert not list(folder.glob("*/step_*")), "a finished run leaves no local pieces, own or copies"


def test_a_corrupt_own_piece_is_refused_and_the_peer_copy_serves(tmp_path, tmp_path_factory):
    expected = reference(tmp_path_factory, ())

    def corrupt(a: Path, b: Path, rank: int, step: int) -> None:
        own = b / f"rank_{rank:05d}"
        for newer in [s for s in steps(own) if s > step]:  # what B wrote after its last copy reached A
            shutil.rmtree(own / f"step_{newer:08d}")
        target = own / f"step_{step:08d}" / "state.pt"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))

    run_dir, logs, b_rank, copied = run_and_break_node_b(tmp_path, corrupt)
    events = read_jsonl(run_dir / "events.jsonl")
    resume = next(e for e in events if e["event"] == "resume")
    fallback = next(e for e in events if e["event"] == "tier_fallback")
    assert resume["tier"] == "peer" and resume["step"] == copied, resume
    assert (fallback["tier"], fallback["served"], fallback["step"]) == ("local", "peer", copied), fallback
    assert "sha256" in fallback["reason"] and "state.pt" in fallback["reason"], fallback
    assert events.index(fallback) < events.index(resume)
    assert outcome(run_dir) == expected


def test_a_lost_node_is_replaced_by_a_waiting_spare_which_resumes_from_the_peer_copy(
    tmp_path, tmp_path_factory
):
    """Three agents for `--nnodes 2`: the third waits (torch's rendezvous keeps it as a spare). Node B is
    lost whole (agent and worker killed -9, its folder wiped); node A's restart admits the spare, whose
    rank has nothing of its own: it gets B's piece from A's copy, and the run ends bit-identical. The
    spare's torchrun counts no restart, yet continues the run as A does (resume.late_joiner): with
    `resume=never` it would otherwise start afresh and never reach the restore the others wait in."""
    expected = reference(tmp_path_factory, ())
    wipe = lambda a, b, rank, step: shutil.rmtree(b)  # noqa: E731
    run_dir, logs, _, copied = run_and_break_node_b(tmp_path, wipe, spare=True)

    events = read_jsonl(run_dir / "events.jsonl")
    resume = next(e for e in events if e["event"] == "resume")
    assert resume["tier"] == "peer" and resume["step"] == copied and resume["restart_count"] == 1, resume
    assert [e["event"] for e in events][-2:] == ["finish", "exit"]
    # Made by the spare's rank (empty again: a finished run drops its pieces); absent before node B was lost.
    assert (tmp_path / "node_c").is_dir(), "the spare's rank never ran"
    assert outcome(run_dir) == expected


def _tail(logs: list[Path]) -> str:
    return "\n".join(f"== {p.name}\n" + p.read_text()[-3000:] for p in logs if p.exists())
