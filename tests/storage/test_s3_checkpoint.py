"""Checkpoints on S3: a real S3 protocol server (moto) on loopback, reached through s3fs exactly as a
run with `run_dir: s3://bucket/prefix` reaches AWS, with the endpoint from AWS_ENDPOINT_URL."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install 'moto[server]'")
pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'disttrain[s3]'")

import fsspec  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

from disttrain.ckpt_write import CheckpointManager  # noqa: E402
from disttrain.commands.ckpt import main as ckpt_main  # noqa: E402
from disttrain.config import CheckpointConfig  # noqa: E402
from disttrain.errors import CheckpointError
from disttrain.state import capture_rank_state  # noqa: E402
from tests.conftest import child_env  # noqa: E402

pytestmark = pytest.mark.storage
BUCKET = "ckpts"


@pytest.fixture(scope="module")
def s3_server(s3_env):
    fsspec.filesystem("s3").mkdir(BUCKET)
    return s3_env


@pytest.fixture
def run_dir(s3_server, request):
    return f"s3://{BUCKET}/{request.node.name.replace('[', '_').rstrip(']')}"


def _s3():
    return fsspec.filesystem("s3")


def _model_state(step: int):
    torch.manual_seed(step)
    model = torch.nn.Linear(32, 8)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "trainer": {"step": step}}


def _save(mgr, steps):
    states = {}
    for step in steps:
        states[step] = _model_state(step)
        mgr.save(step, states[step], {"rng": capture_rank_state()})
    mgr.wait()
    return states


def test_save_retention_corruption_fallback_load(run_dir, caplog):
    mgr = CheckpointManager(run_dir, CheckpointConfig(keep_last=2, async_save=True))
    states = _save(mgr, [10, 20, 30, 40])
    assert [i.step for i in mgr.list()] == [40, 30]
    prefix = run_dir.removeprefix("s3://")
    assert sorted(p.rsplit("/", 1)[-1] for p in _s3().ls(f"{prefix}/checkpoints", refresh=True)) == [
        "latest",
        "step_00000030",
        "step_00000040",
    ]
    assert _s3().cat(f"{prefix}/checkpoints/latest") == b"step_00000040"

    obj = f"{prefix}/checkpoints/step_00000040/state.pt"
    data = bytearray(_s3().cat(obj))
    data[len(data) // 2] ^= 0xFF
    _s3().pipe(obj, bytes(data))
    assert "state.pt" in mgr.verify(40) and "sha256" in mgr.verify(40)
    with caplog.at_level(logging.WARNING, logger="disttrain.checkpoint"):
        assert mgr.latest_verified().step == 30
    assert "skipping checkpoint step 40" in caplog.text and "state.pt" in caplog.text
    app, rank = CheckpointManager(run_dir, CheckpointConfig(load_mode="broadcast")).load()
    assert app["trainer"]["step"] == 30 and "rng" in rank
    for name, tensor in states[30]["model"].items():
        assert torch.equal(app["model"][name], tensor)
    with pytest.raises(CheckpointError, match="step_00000040/state.pt"):
        mgr.load(40)


def test_cli_on_s3(run_dir, tmp_path, capsys):
    mgr = CheckpointManager(run_dir, CheckpointConfig())
    states = _save(mgr, [1, 2])
    assert ckpt_main(["ls", run_dir]) == 0
    out = capsys.readouterr().out
    assert out.count("yes") == 2 and "1" in out and "2" in out
    assert ckpt_main(["verify", run_dir]) == 0
    out_file = tmp_path / "model.safetensors"
    assert ckpt_main(["export", run_dir, "--out", str(out_file)]) == 0
    exported = safetensors.torch.load_file(out_file)
    assert all(torch.equal(exported[k], v) for k, v in states[2]["model"].items())
    _s3().rm(f"{run_dir.removeprefix('s3://')}/checkpoints/step_00000002/ranks.pt")
    capsys.readouterr()
    assert ckpt_main(["verify", run_dir]) == 1
    assert "ranks.pt: missing" in capsys.readouterr().out
    assert ckpt_main(["ls", f"s3://{BUCKET}/no-such-run"]) == 2


CHILD = textwrap.dedent(
    """
    import sys, torch
    from disttrain.ckpt_write import CheckpointManager
    from disttrain.state import capture_rank_state
    from disttrain.config import CheckpointConfig
    mgr = CheckpointManager(sys.argv[1], CheckpointConfig(every_steps=1, keep_last=2, async_save=True))
    model = torch.nn.Linear(256, 256)
    step = 0
    while True:
        step += 1
        mgr.maybe_save(step, lambda: {"model": model.state_dict(), "trainer": {"step": step}},
                       lambda: {"rng": capture_rank_state()})
    """
)


def test_kill_9_while_saving_then_resume(run_dir):
    """A writer on S3 killed mid-save leaves at most a manifest-less prefix: invisible, then cleaned."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, run_dir],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": child_env()["PYTHONPATH"]},
    )
    mgr = CheckpointManager(run_dir, CheckpointConfig(keep_last=2))
    try:
        deadline = time.monotonic() + 60
        while len(mgr.list()) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(0.13)  # a moment inside the next save, most likely
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    infos = mgr.list()
    assert len(infos) >= 1 and all(mgr.verify(i.step) is None for i in infos)
    newest = mgr.latest_verified()
    assert newest.step == infos[0].step
    app, _ = mgr.load()
    assert app["trainer"]["step"] == newest.step
    mgr.save(newest.step + 1, app, {"rng": capture_rank_state()})  # the next run's first save cleans up
    names = _s3().ls(f"{run_dir.removeprefix('s3://')}/checkpoints", refresh=True)
    assert all(_s3().exists(f"{p}/manifest.json") for p in names if not p.endswith("/latest"))
