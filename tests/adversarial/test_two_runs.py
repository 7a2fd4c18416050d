"""Two runs on one run dir (issue 11, case 8). Before: they adopted each other's checkpoints (even
with another lr), one died with a misleading error, and metrics rows were lost or doubled. Now the
first holds RUN_DIR/lease.json; the second exits 2 naming it; once the first is killed (kill -9), the
next run takes the run dir over, on local disks and on S3. (A torchrun restart of the same run:
tests/multiproc/test_torchrun_restart.py; a SLURM requeue: tests/cluster.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import fsspec
import pytest

from disttrain import fs
from disttrain.cluster import ClusterEnv
from disttrain.errors import ConfigError
from tests.conftest import FAST, child_env, main_cmd, read_jsonl, run_main
from tests.unit.test_main import assert_refused

ARGS = ("pipeline.target=tests.adversarial.pipelines:Slow", "trainer.log_every=1", "trainer.eval_every=0",
        "checkpoint.every_steps=2", *FAST)  # fmt: skip


def test_a_second_run_is_refused_naming_the_first_and_a_killed_one_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(main_cmd(f"run_dir={run_dir}", "trainer.max_steps=100000", *ARGS), env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "latest").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never saved"
            time.sleep(0.05)
        holder = json.loads((run_dir / "lease.json").read_text())
        assert holder["pid"] == first.pid

        second = run_main(
            f"run_dir={run_dir}", "trainer.max_steps=100000", "optim.lr=0.1", *ARGS, timeout=120
        )
        assert_refused(second, f"is in use by another run (pid {first.pid} on host", "choose another run_dir")
        assert first.poll() is None, "the refused run disturbed the first"
    finally:
        first.kill()  # kill -9: the lease is left behind, its lock is not
        first.wait()
    third = run_main(f"run_dir={run_dir}", "trainer.max_steps=1", *ARGS, timeout=120)
    assert third.returncode == 0 and "already reached step" in third.stdout, third.stderr[-3000:]
    assert not (run_dir / "lease.json").exists()  # released at the end
    starts = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "start"]
    assert len(starts) == 1, "only the first run started training in this run dir"


@pytest.fixture(scope="module")
def bucket(s3_env):
    fsspec.filesystem("s3").mkdir("leases")
    return "s3://leases"


def test_the_s3_lease_refuses_a_second_run_and_takes_over_a_dead_one(bucket):
    from disttrain.lease import RunLease, holder_record

    run_dir = f"{bucket}/dead-holder"
    env = ClusterEnv(launcher="single")
    first = RunLease(run_dir, env)
    first.acquire()
    with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on host"):
        RunLease(run_dir, env).acquire()
    first.release()
    assert not fs.exists(f"{run_dir}/lease.json")

    gone = subprocess.Popen(["true"])
    gone.wait()  # a process of this host that no longer runs: a run killed with kill -9
    stale = {**holder_record(env), "pid": gone.pid, "pid_start": None}
    fs.write_bytes(f"{run_dir}/lease.json", json.dumps(stale).encode())
    taker = RunLease(run_dir, env)
    taker.acquire()
    assert json.loads(fs.read_text(f"{run_dir}/lease.json"))["pid"] == os.getpid()
    taker.release()


def test_the_s3_lease_of_another_host_holds_until_its_ttl_runs_out(bucket, monkeypatch):
    from disttrain.lease import RunLease, holder_record

    run_dir = f"{bucket}/other-host"
    env = ClusterEnv(launcher="single")
    other = {**holder_record(env), "host": "node-elsewhere", "pid": 4242}
    fs.write_bytes(f"{run_dir}/lease.json", json.dumps(other).encode())
    with pytest.raises(ConfigError, match="pid 4242 on host node-elsewhere"):
        RunLease(run_dir, env).acquire()
    monkeypatch.setenv("DISTTRAIN_LEASE_TTL_S", "1")
    time.sleep(1.5)  # no renewal for longer than the TTL: its holder is gone
    lease = RunLease(run_dir, env)
    lease.acquire()
    lease.release()


@pytest.mark.parametrize("field", ["pid_ns", "boot_id"])
def test_an_s3_lease_from_another_pid_namespace_or_boot_on_this_host_is_not_judged_by_its_pid(bucket, field):
    """Issue 19, adversarial 3: two containers sharing a host name (`--network host`, hostNetwork
    pods) have pids of their own; a live holder in the other one was judged dead by its pid."""
    from disttrain.lease import RunLease, holder_record

    run_dir = f"{bucket}/other-{field}"
    env = ClusterEnv(launcher="single")
    gone = subprocess.Popen(["true"])
    gone.wait()  # no such pid here: in the holder's namespace it is a training run
    other = {**holder_record(env), "pid": gone.pid, "pid_start": None, field: "pid:[4026532999]"}
    fs.write_bytes(f"{run_dir}/lease.json", json.dumps(other).encode())  # renewed just now
    with pytest.raises(ConfigError, match=f"pid {gone.pid} on host"):
        RunLease(run_dir, env).acquire()
    assert json.loads(fs.read_text(f"{run_dir}/lease.json")) == other


def objects(prefix: str) -> dict[str, str]:
    s3 = fsspec.filesystem("s3")
    s3.invalidate_cache()
    return {
        k: v.get("ETag", "") for k, v in s3.find(prefix, detail=True).items() if not k.endswith("lease.json")
    }


def test_a_holder_frozen_past_the_s3_lease_ttl_stops_without_writing_again(bucket, s3_env):
    """Issue 19, adversarial 2: a holder frozen past the TTL said it had lost the lease and went on
    training and committing (steps 75, 75, 80, 80 from two writers). Now its first write after it wakes
    finds the lease older than the TTL: exit 1, and nothing more written."""
    from disttrain.lease import RunLease

    ttl_s = 6
    run_dir = f"{bucket}/frozen"
    env = child_env(**s3_env, DISTTRAIN_LEASE_TTL_S=str(ttl_s))
    holder = subprocess.Popen(main_cmd(f"run_dir={run_dir}", "trainer.max_steps=100000", *ARGS), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    taker = None
    try:
        lines = 0
        deadline = time.monotonic() + 120
        while lines < 4:  # freeze right after a write lands: the next one is a step away
            assert holder.poll() is None and time.monotonic() < deadline, holder.stderr.read()
            path = f"{run_dir}/metrics.jsonl"
            lines = len(fs.read_text(path).splitlines()) if objects(path) else 0
        holder.send_signal(signal.SIGSTOP)
        time.sleep(ttl_s + 1)
        os.environ["DISTTRAIN_LEASE_TTL_S"] = str(ttl_s)
        taker = RunLease(run_dir, ClusterEnv(launcher="single"))
        taker.acquire()  # the holder's process is alive here, but its lease ran out
        before = objects(run_dir)
        holder.send_signal(signal.SIGCONT)
        _, err = holder.communicate(timeout=60)
        assert holder.returncode == 1, err[-3000:]
        assert objects(run_dir) == before, "the frozen holder wrote after it woke"
        assert json.loads(fs.read_text(f"{run_dir}/lease.json"))["token"] == taker._lock.me["token"]
        assert "Traceback" not in err and "lost the run-dir lease" in err, err[-3000:]
        last = err.strip().splitlines()[-1]  # a metrics append or a checkpoint, whichever came first
        assert "rank 0: training failed:" in last and "lost the run-dir lease" in last, err
    finally:
        holder.kill()
        holder.wait()
        if taker is not None:
            taker.release()
        os.environ.pop("DISTTRAIN_LEASE_TTL_S", None)
