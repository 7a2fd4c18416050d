"""Sharded training (trainer.strategy=fsdp) on 2 ranks over gloo: DDP's numbers to float rounding, exact
resume, resharding to other world sizes and strategies, and checkpoints that survive what DDP's do.
Tied weights: test_fsdp_tied.py."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch

from disttrain.ckpt_write import CheckpointManager
from disttrain.config import CheckpointConfig
from tests.conftest import FAST, MEASURED, REPO, child_env, free_port, main_cmd, read_jsonl, run_main
from tests.multiproc.test_exact_resume import (
    BASE,
    after_checkpoint,
    during_eval,
    interrupt,
    logged_step,
    outcome,
    reference,
    resume,
)

FSDP = "trainer.strategy=fsdp"


def saved_tensors(step_dir: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint of either format, whole and keyed by name (model and optimizer),
    plus the optimizer's plain values: what a round trip must preserve exactly. `names`: the parameter
    names in optimizer order, for a replicated checkpoint (whose optimizer state is keyed by index)."""
    from disttrain import ckpt_format as fmt
    from disttrain.ckpt_read import _read

    path = str(step_dir)
    manifest, plain, _ = _read(path)
    from disttrain.ckpt_sharded import SavedState

    saved = SavedState(path, manifest, plain, names=names)
    out = {k: saved.full(k) for k in saved.layout}
    for name, entries in saved.plain["optimizer"]["state"].items():
        out.update({f"optim/{name}/{k}": torch.as_tensor(v) for k, v in entries.items()})
    out.update({f"model/{k}": v for k, v in saved.plain.get("model", {}).items()})
    assert fmt.problem(path, full=True) is None
    return out


def before_groups(step_dir: Path) -> list[dict]:
    from disttrain import ckpt_format as fmt

    return fmt.read_state(str(step_dir), fmt.read_manifest(str(step_dir)))["optimizer"]["param_groups"]


def test_fsdp_trains_exactly_like_ddp_and_exports_the_same_weights(tmp_path):
    runs = {}
    for strategy in ("ddp", "fsdp"):
        run_dir = tmp_path / strategy
        proc = run_main(f"run_dir={run_dir}", *BASE, f"trainer.strategy={strategy}", "pipeline.args.step_delay=0",
                        "trainer.max_steps=12", nproc=2)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[strategy] = read_jsonl(run_dir / "metrics.jsonl")
        out = tmp_path / f"{strategy}.safetensors"
        export = subprocess.run([sys.executable, "-m", "disttrain", "ckpt", "export", str(run_dir), "--out", str(out)],
                                capture_output=True, text=True, env=child_env(), timeout=120)  # fmt: skip
        assert export.returncode == 0, export.stderr
    assert len(runs["fsdp"]) == len(runs["ddp"]) > 12
    for a, b in zip(runs["ddp"], runs["fsdp"]):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for key in a.keys() - {"step", *MEASURED}:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
    from safetensors.torch import load_file

    ddp, fsdp = load_file(tmp_path / "ddp.safetensors"), load_file(tmp_path / "fsdp.safetensors")
    assert ddp.keys() == fsdp.keys()
    assert all(torch.allclose(ddp[k], fsdp[k], rtol=1e-5, atol=1e-7) for k in ddp)
    shards = sorted(p.name for p in (tmp_path / "fsdp/checkpoints/step_00000012").iterdir())
    assert shards == [
        "manifest.json",
        "ranks.pt",
        "shard_00000.safetensors",
        "shard_00001.safetensors",
        "state.pt",
    ]


@pytest.mark.parametrize(
    "case, extra, ready",
    [
        ("mid_epoch_async_save", ["checkpoint.async_save=true"], logged_step(6)),
        ("right_after_save_grad_accum", ["trainer.grad_accum=2"], after_checkpoint(8)),
        # BatchNorm's buffers are not sharded and drift apart between ranks; dropout needs each rank's RNG.
        ("batchnorm_and_dropout", ["pipeline.target=tests.pipelines:BatchNormProbe"], logged_step(6)),
    ],
)
def test_interrupted_fsdp_run_is_bitwise_identical(tmp_path, tmp_path_factory, case, extra, ready):
    expected = reference(tmp_path_factory, (FSDP, *(e for e in extra if "grad_accum" in e or "target" in e)))
    run_dir = tmp_path / case
    interrupt(run_dir, [FSDP, *extra], ready)
    resume(run_dir, [FSDP, *extra])
    assert outcome(run_dir) == expected


def test_interrupted_during_eval_fsdp_redoes_it_exactly(tmp_path, tmp_path_factory):
    markers = tmp_path / "markers"
    markers.mkdir()
    slow_eval = [FSDP, f"pipeline.args.marker_dir={markers}", "pipeline.args.eval_delay=0.3"]
    run_dir = tmp_path / "run"
    interrupt(run_dir, slow_eval, during_eval(markers))
    resume(run_dir, slow_eval)
    assert outcome(run_dir) == reference(tmp_path_factory, (FSDP,))


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_reshards_and_sees_every_sample_once(tmp_path, first, second):
    record = tmp_path / "samples"
    record.mkdir()
    from disttrain.pipelines.digits import DigitsPipeline

    steps_per_epoch = len(DigitsPipeline().datasets()["train"]) // 64
    args = [
        FSDP,
        f"pipeline.args.record_dir={record}",
        f"trainer.max_steps={steps_per_epoch}",
        "trainer.eval_every=0",
    ]
    run_dir = tmp_path / "run"
    if first == 2:
        interrupt(run_dir, args, logged_step(7))
    else:  # one process, stopped by its step count at a committed checkpoint
        proc = run_main(f"run_dir={run_dir}", *BASE, *args[:2], "trainer.max_steps=8", "trainer.eval_every=0")
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_main(f"run_dir={run_dir}", *BASE, *args, nproc=second)  # same global batch
    assert proc.returncode == 0 and "resumed from step" in proc.stdout, proc.stderr[-3000:]
    seen = Counter(
        int(i) for f in record.iterdir() for line in f.read_text().split("\n") for i in line.split()
    )
    assert set(seen.values()) == {1}, "no sample repeated"
    assert sum(seen.values()) == steps_per_epoch * 64, "no sample skipped"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """A 2-rank fsdp run of 8 steps, global batch 48 (divides over 1, 2 and 3 ranks), saved at 4 and 8."""
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    proc = run_main(f"run_dir={run_dir}", FSDP, "trainer.max_steps=8", "checkpoint.every_steps=4", "data.batch_size=48",
                    "trainer.eval_every=0", *FAST, nproc=2)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("world, strategy", [(1, "fsdp"), (3, "fsdp"), (2, "ddp")])
def test_a_pure_load_and_save_round_trip_preserves_every_tensor_exactly(tmp_path, fsdp_run, world, strategy):
    src = fsdp_run / "checkpoints" / "step_00000008"
    dst = tmp_path / "copy"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "tests/multiproc/fsdp_probe.py"), f"run_dir={dst}",
           f"resume={src}", f"trainer.strategy={strategy}", "data.batch_size=48"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = saved_tensors(src)
    names = [n for group in before_groups(src) for n in group["params"]]
    after = saved_tensors(dst / "checkpoints" / "step_00000008", names)
    assert before.keys() == after.keys() and len(before) > 20
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_ddp_checkpoint_continues_under_fsdp_and_back(tmp_path, tmp_path_factory):
    """Switching strategy mid-run keeps every number: ddp stopped after step 8, resumed under fsdp (and the
    other way) logs what an uninterrupted ddp run logs. Over these 24 steps of digits the two strategies
    log the same losses on 2 CPU ranks; the grad norm differs in the last bits (README: what is exact)."""
    expected = reference(tmp_path_factory, ())
    for first, then in (("ddp", "fsdp"), ("fsdp", "ddp")):
        run_dir = tmp_path / f"{first}_{then}"
        interrupt(run_dir, [f"trainer.strategy={first}"], after_checkpoint(8))
        resume(run_dir, [f"trainer.strategy={then}"])
        got, want = (
            outcome(run_dir)["records"],
            [dict(r) for r in expected["records"]],
        )  # the reference is shared
        # The gradient norm is summed shard by shard under fsdp: equal to a float rounding, not bit for bit.
        norms = [(r.pop("train/grad_norm", None), w.pop("train/grad_norm", None)) for r, w in zip(got, want)]
        assert got == want, (first, then)
        assert all((a is None) == (b is None) for a, b in norms) and any(a is not None for a, _ in norms), (
            norms
        )
        assert [a for a, _ in norms if a is not None] == pytest.approx(
            [b for _, b in norms if b is not None], rel=1e-6
        )


def _flip_a_byte_in_a_shard(step_dir: Path, _marker: Path) -> str:
    shard = step_dir / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return "shard_00001.safetensors: sha256"


def _plant_a_pickle_with_a_matching_hash(step_dir: Path, marker: Path) -> str:
    """state.pt becomes a pickle that would run a command, and the manifest is made to agree with it."""
    import hashlib

    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (step_dir / "state.pt").write_bytes(payload)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    return "weights_only"


@pytest.mark.parametrize("damage", [_flip_a_byte_in_a_shard, _plant_a_pickle_with_a_matching_hash])
def test_a_damaged_newest_checkpoint_is_caught_and_resume_falls_back(tmp_path, fsdp_run, damage):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    subprocess.run(["cp", "-r", str(fsdp_run), str(run_dir)], check=True)
    said = damage(run_dir / "checkpoints" / "step_00000008", marker)
    proc = run_main(f"run_dir={run_dir}", FSDP, "trainer.max_steps=10", "data.batch_size=48", "trainer.eval_every=0",
                    *FAST, nproc=2)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert said in proc.stderr and "falling back" in proc.stderr, proc.stderr[-3000:]
    assert "resumed from step 4" in proc.stdout and not marker.exists()


def test_kill_9_during_sharded_saves_leaves_the_newest_committed_checkpoint_loadable(tmp_path):
    run_dir, rng = tmp_path / "run", random.Random(7)
    args = [f"run_dir={run_dir}", "--config", "configs/tiny_gpt_fsdp.yaml", "trainer.max_steps=100000",
            "checkpoint.every_steps=1", "checkpoint.keep_last=2", "trainer.eval_every=0", "scheduler.warmup_steps=0",
            "pipeline.args.n_layer=2",
            "pipeline.args.d_model=64", "pipeline.args.block_size=32", *FAST]  # fmt: skip
    newest = 0
    for trial in range(3):
        proc = subprocess.Popen(main_cmd(*args, nproc=2), env=child_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        deadline, events = time.monotonic() + 120, run_dir / "events.jsonl"
        while not (
            events.exists() and sum(e["event"] == "checkpoint" for e in read_jsonl(events)) > newest + 2
        ):
            assert proc.poll() is None and time.monotonic() < deadline, f"trial {trial}: never saved"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))
        # torchrun puts each worker in a session of its own: kill the ranks themselves, then the agent.
        workers = psutil.Process(proc.pid).children()
        for victim in [*workers, psutil.Process(proc.pid)]:
            victim.send_signal(signal.SIGKILL)
        psutil.wait_procs(workers, timeout=30)
        proc.wait(30)
        mgr = CheckpointManager(str(run_dir), CheckpointConfig())
        infos = mgr.list()
        assert infos and all(mgr.verify(i.step) is None for i in infos), [mgr.verify(i.step) for i in infos]
        newest = sum(e["event"] == "checkpoint" for e in read_jsonl(events))
    final = run_main(
        *[a if "max_steps" not in a else f"trainer.max_steps={infos[0].step + 2}" for a in args], nproc=2
    )
    assert final.returncode == 0 and f"resumed from step {infos[0].step}" in final.stdout, final.stderr[
        -3000:
    ]
