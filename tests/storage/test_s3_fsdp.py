"""A sharded (fsdp) run whose run_dir is on S3 (moto on loopback): every rank writes its shard into
the step directory in place, rank 0 commits the manifest last; verify, resume and export work there."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install 'moto[server]'")
pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'disttrain[s3]'")

import fsspec  # noqa: E402

from tests.conftest import FAST, child_env, read_jsonl, run_main  # noqa: E402

pytestmark = pytest.mark.storage
BUCKET = "sharded"


def test_fsdp_run_on_s3_saves_shards_resumes_and_exports(s3_env, tmp_path):
    fsspec.filesystem("s3").mkdir(BUCKET)
    run_dir = f"s3://{BUCKET}/fsdp"
    args = (f"run_dir={run_dir}", "trainer.strategy=fsdp", "checkpoint.every_steps=4", "trainer.eval_every=0",
            "trainer.log_every=1", *FAST)  # fmt: skip
    env = child_env(**s3_env)
    first = run_main(*args, "trainer.max_steps=4", nproc=2, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    step_dir = f"{BUCKET}/fsdp/checkpoints/step_00000004"
    names = sorted(p.rsplit("/", 1)[1] for p in fsspec.filesystem("s3").ls(step_dir, refresh=True))
    assert names == [
        "manifest.json",
        "ranks.pt",
        "shard_00000.safetensors",
        "shard_00001.safetensors",
        "state.pt",
    ]

    cli = [sys.executable, "-m", "disttrain", "ckpt"]
    verify = subprocess.run([*cli, "verify", run_dir], capture_output=True, text=True, env=env, timeout=120)
    assert verify.returncode == 0 and "step 4: OK" in verify.stdout, verify.stdout + verify.stderr
    listed = subprocess.run([*cli, "ls", run_dir], capture_output=True, text=True, env=env, timeout=120)
    assert "fsdp, 2 shards" in listed.stdout and "yes" in listed.stdout, listed.stdout + listed.stderr
    second = run_main(*args, "trainer.max_steps=6", nproc=2, env=env)
    assert second.returncode == 0 and "resumed from step 4" in second.stdout, second.stderr[-3000:]
    out = tmp_path / "model.safetensors"
    export = subprocess.run([*cli, "export", run_dir, "--out", str(out)], capture_output=True, text=True, env=env,
                            timeout=120)  # fmt: skip
    assert export.returncode == 0 and "step 6" in export.stdout, export.stderr
    from safetensors.torch import load_file

    weights = load_file(out)
    assert weights["conv1.weight"].shape == (16, 1, 3, 3) and weights["fc2.bias"].shape == (10,)
    local = tmp_path / "metrics.jsonl"
    local.write_bytes(fsspec.filesystem("s3").cat(f"{BUCKET}/fsdp/metrics.jsonl"))
    assert [r["step"] for r in read_jsonl(local) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
