"""The local checkpoint tier on one process: each rank's piece written in the background, published with
a manifest last, the newest keep_last kept, verified before use, and the folder a run finds by default.
Real files, no process group (one rank)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from disttrain.config import LocalTierConfig, load_config
from disttrain.errors import ConfigError
from disttrain.local_tier import LocalTier, default_dir


def tier(tmp_path, first_attempt=False, **cfg) -> LocalTier:
    config = LocalTierConfig(**{"every_steps": 2, "dir": str(tmp_path / "local"), **cfg})
    return LocalTier(config, str(tmp_path / "run"), {"fingerprint": {}}, "ddp", first_attempt=first_attempt)


def state(step: int) -> tuple[dict, dict]:
    shared = {
        "model": {"w": torch.full((3, 2), float(step)), "b": torch.arange(2.0)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "scaler": None,
        "trainer": {"step": step},
    }
    return shared, {"rng": {"torch": torch.random.get_rng_state()}}


def save(local: LocalTier, *steps: int) -> None:
    for step in steps:
        local.save(step, *state(step), None)
    local.wait()


def test_pieces_are_published_with_a_manifest_and_the_newest_two_kept(tmp_path):
    local = tier(tmp_path)
    save(local, 2, 4, 6)
    assert local.steps() == [6, 4]
    piece = tmp_path / "local" / "rank_00000" / "step_00000006"
    manifest = json.loads((piece / "manifest.json").read_text())
    assert manifest["tier"] == "local" and manifest["rank"] == 0 and manifest["world_size"] == 1
    assert set(manifest["files"]) == {"model.safetensors", "state.pt", "ranks.pt"}
    assert not [p for p in piece.parent.iterdir() if ".tmp-" in p.name]


def test_restore_loads_the_newest_piece_bit_for_bit(tmp_path):
    local = tier(tmp_path)
    save(local, 2, 4)
    loaded, fallbacks = local.restore(durable_step=None)
    assert fallbacks == [] and loaded is not None and loaded.tier == "local" and loaded.step == 4
    assert torch.equal(loaded.app["model"]["w"], state(4)[0]["model"]["w"])
    assert loaded.app["trainer"] == {"step": 4}
    assert torch.equal(loaded.rank_state["rng"]["torch"], state(4)[1]["rng"]["torch"])


def test_a_durable_checkpoint_as_new_serves_instead(tmp_path):
    local = tier(tmp_path)
    save(local, 2, 4)
    assert local.restore(durable_step=4) == (None, [])
    assert local.restore(durable_step=3)[0].step == 4


def test_a_corrupt_newest_piece_falls_back_to_the_older_one(tmp_path):
    local = tier(tmp_path)
    save(local, 2, 4)
    target = tmp_path / "local" / "rank_00000" / "step_00000004" / "state.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    loaded, fallbacks = local.restore(durable_step=None)
    assert loaded is not None and loaded.step == 2 and fallbacks == []


def test_a_replaced_file_is_refused_by_its_hash_before_it_is_unpickled(tmp_path):
    local = tier(tmp_path)
    save(local, 2)
    piece = tmp_path / "local" / "rank_00000" / "step_00000002"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Evil())
    size = (piece / "state.pt").stat().st_size
    (piece / "state.pt").write_bytes(payload.ljust(size, b" "))
    loaded, fallbacks = local.restore(durable_step=None)
    assert loaded is None and "sha256" in fallbacks[0]["reason"] and fallbacks[0]["tier"] == "local"
    assert not marker.exists()


def test_no_piece_says_why_and_a_first_attempt_clears_old_pieces(tmp_path):
    save(tier(tmp_path), 2, 4)
    assert tier(tmp_path).restore(None)[0].step == 4  # a restarted attempt finds them
    fresh = tier(tmp_path, first_attempt=True)  # a first attempt: whatever is there is not this run's
    assert fresh.restore(None) == (None, []) and fresh.steps() == []
    loaded, fallbacks = tier(tmp_path).restore(None)  # a restart that finds nothing says so
    assert loaded is None and fallbacks[0]["step"] is None and "rank 0" in fallbacks[0]["reason"]


def test_another_world_size_skips_the_tier(tmp_path):
    local = tier(tmp_path)
    save(local, 2)
    path = tmp_path / "local" / "rank_00000" / "step_00000002" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "world_size": 2}))
    loaded, fallbacks = local.restore(None)
    assert loaded is None and "world size changed" in fallbacks[0]["reason"]


def test_a_failed_write_warns_once_and_training_goes_on(tmp_path, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    local = tier(tmp_path, dir=str(blocker))
    save(local, 2, 4)
    err = capfd.readouterr().err
    assert err.count("warning: local checkpoint step") == 1 and "durable tier" in err
    assert local.steps() == []


def test_off_and_due(tmp_path):
    local = tier(tmp_path, every_steps=3)
    assert [s for s in range(1, 10) if local.due(s)] == [3, 6, 9]
    off = tier(tmp_path, every_steps=0)
    assert not off.on and off.restore(None) == (None, []) and not off.due(3)


def test_discard_removes_this_ranks_pieces(tmp_path):
    local = tier(tmp_path)
    save(local, 2)
    local.discard()
    assert not (tmp_path / "local" / "rank_00000").exists() and (tmp_path / "local").exists()


def test_default_dir_is_per_run_and_per_host(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = default_dir("runs/a"), default_dir("runs/b")
    assert a != b and default_dir(str(tmp_path / "runs" / "a")) == a
    assert os.path.basename(os.path.dirname(a)).startswith("a-")
    assert a.startswith("/dev/shm/disttrain/") or not os.path.isdir("/dev/shm")
    assert default_dir("s3://bucket/x") != default_dir("s3://other/x")


def test_config_keys():
    cfg = load_config(None, ["checkpoint.local.every_steps=5", "checkpoint.local.dir=/tmp/x"])
    assert (cfg.checkpoint.local.every_steps, cfg.checkpoint.local.dir, cfg.checkpoint.local.keep_last) == (
        5,
        "/tmp/x",
        2,
    )
    with pytest.raises(ConfigError, match="checkpoint.local.every_steps"):
        load_config(None, ["checkpoint.local.every_steps=-1"])
    with pytest.raises(ConfigError, match="did you mean checkpoint.local.every_steps"):
        load_config(None, ["checkpoint.local.every_step=5"])


def test_ranks_agree_on_the_newest_step_all_of_them_can_restore():
    from disttrain.local_tier import _agree

    def report(step, why=None, first=False):
        return (step, why, "host", first)

    # A rank killed while writing step 12 still has 8: every rank restores 8.
    assert _agree([report(12), report(8)], durable_step=None) == (8, [])
    assert _agree([report(12), report(8)], durable_step=4) == (8, [])
    # A durable checkpoint at least as new serves, and nothing was lost by skipping the local tier.
    assert _agree([report(12), report(8)], durable_step=12) == (None, [])
    assert _agree([report(12), report(8)], durable_step=8) == (None, [])
    # A rank without a piece: the durable tier serves, and the record says which rank and why.
    step, notes = _agree([report(12), report(None, "none in /x")], durable_step=4)
    assert step is None and notes == [
        {"tier": "local", "step": None, "reason": "rank 1 (host) has no verified local copy: none in /x"}
    ]
    # A fresh start on every rank: nothing to say.
    assert _agree([report(None, "first", True), report(None, "first", True)], durable_step=None) == (None, [])


def test_a_finished_run_leaves_no_pieces_and_a_fresh_run_no_fallback(tmp_path):
    from tests.conftest import FAST, read_jsonl, run_main

    local = tmp_path / "local"
    args = ["pipeline.target=tests.pipelines:ProbeDigits", "trainer.max_steps=6", "trainer.eval_every=0"]
    proc = run_main(f"run_dir={tmp_path / 'run'}", *args, *FAST, "checkpoint.every_steps=100",
                    "checkpoint.save_final=false", "checkpoint.local.every_steps=2", f"checkpoint.local.dir={local}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert local.is_dir() and not list(local.iterdir()), "the user's folder stays, empty"
    events = [e["event"] for e in read_jsonl(tmp_path / "run" / "events.jsonl")]
    assert "tier_fallback" not in events and "resume" not in events and "warning" not in proc.stderr
