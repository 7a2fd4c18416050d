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
from disttrain.local_peers import Packed, Topology, pack, unpack
from disttrain.local_tier import LocalTier, Source, default_dir, plan_restore


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


def test_each_save_copies_into_the_last_ones_host_memory_after_its_write_finished(tmp_path):
    """The snapshot reuses the previous piece's host tensors (no allocation in the step), and only once
    that piece is on disk: every piece holds its own step's values."""
    import safetensors.torch

    local = tier(tmp_path, keep_last=3)
    local.save(2, *state(2), None)
    first = local._previous[0]["model"]["w"]
    local.save(4, *state(4), None)  # joins step 2's write, then copies into its tensors
    assert local._previous[0]["model"]["w"].data_ptr() == first.data_ptr()
    shared, mine = state(6)
    shared["model"]["w"] = torch.zeros(4, 2)  # a new shape: new memory
    local.save(6, shared, mine, None)
    local.wait()
    assert local._previous[0]["model"]["w"].data_ptr() != first.data_ptr()
    for step, value in ((2, 2.0), (4, 4.0), (6, 0.0)):
        piece = tmp_path / "local" / "rank_00000" / f"step_{step:08d}" / "model.safetensors"
        assert torch.equal(
            safetensors.torch.load_file(piece)["w"],
            torch.full((3, 2), value) if step < 6 else torch.zeros(4, 2),
        )


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
    assert loaded is not None and loaded.step == 2 and loaded.tier == "local"
    # The record says why step 4 did not serve: which rank, which file, what was wrong.
    assert [(f["tier"], f["step"]) for f in fallbacks] == [("local", 4)]
    assert "rank 0" in fallbacks[0]["reason"] and "state.pt: sha256" in fallbacks[0]["reason"]


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
    topo = Topology((("a", "/x"), ("b", "/y")), replicas=0)
    own = lambda node, rank: Source(node, f"rank_{rank:05d}")  # noqa: E731

    def held(**steps):  # rank -> steps of its own pieces
        return {(int(r[1:]), s): {own(int(r[1:]), int(r[1:])): None} for r, ss in steps.items() for s in ss}

    # A rank killed while writing step 12 still has 8: every rank restores 8.
    assert plan_restore(held(r0=[12, 8], r1=[8]), None, 2, topo) == ((8, {0: own(0, 0), 1: own(1, 1)}), None)
    assert plan_restore(held(r0=[12, 8], r1=[8]), 4, 2, topo)[0][0] == 8
    # A durable checkpoint at least as new serves, and nothing was lost by skipping the local tier.
    assert plan_restore(held(r0=[12, 8], r1=[8]), 12, 2, topo) == (None, None)
    assert plan_restore(held(r0=[12, 8], r1=[8]), 8, 2, topo) == (None, None)
    # A rank without a piece: the durable tier serves, and the record says which rank and why.
    plan, why = plan_restore(held(r0=[12]), 4, 2, topo)
    assert plan is None and why == {
        "tier": "local", "step": 12, "reason": "rank 1 (b) has no verified local copy: none kept on any node"
    }  # fmt: skip
    bad = held(r0=[12], r1=[12])
    bad[(1, 12)][own(1, 1)] = "state.pt: sha256 does not match"
    assert "rank 1 (b)" in plan_restore(bad, None, 2, topo)[1]["reason"]
    assert "sha256" in plan_restore(bad, None, 2, topo)[1]["reason"]
    # Nothing kept anywhere on a restart: said, with no step.
    assert plan_restore({}, None, 2, topo)[1]["step"] is None


def test_a_copy_on_another_node_serves_when_the_own_one_is_gone_or_bad():
    topo = Topology((("a", "/x"), ("a", "/x"), ("b", "/y"), ("b", "/y")), replicas=1)
    assert topo.nodes() == [[0, 1], [2, 3]] and topo.copies() == 1
    assert [topo.holders(r) for r in range(4)] == [[2], [3], [0], [1]]
    assert [topo.owners(r) for r in range(4)] == [[2], [3], [0], [1]]
    own, copy = Source(1, "rank_00002"), Source(0, "peer_00002")
    pieces = {(r, 8): {Source(topo.node_of(r), f"rank_{r:05d}"): None} for r in range(4)}
    pieces[(2, 8)][copy] = None
    plan, _ = plan_restore(pieces, None, 4, topo)
    assert plan is not None and plan[1][2] == own, "a rank's own node is preferred"
    pieces[(2, 8)][own] = "sha256 does not match"
    plan, _ = plan_restore(pieces, None, 4, topo)
    assert plan is not None and plan[0] == 8 and plan[1][2] == copy
    del pieces[(2, 8)][own]
    assert plan_restore(pieces, None, 4, topo)[0][1][2] == copy, "node 1's folder wiped: node 0 serves"


def test_copies_go_to_other_nodes_only_and_cover_any_lost_node():
    one_node = Topology((("a", "/x"),) * 4, replicas=1)
    assert one_node.copies() == 0 and one_node.holders(0) == []
    uneven = Topology((("a", "/x"),) * 2 + (("b", "/x"),) * 1 + (("c", "/x"),) * 3, replicas=2)
    assert uneven.copies() == 2
    for owner in range(6):
        homes = [uneven.node_of(h) for h in uneven.holders(owner)]
        assert len(set(homes)) == 2 and uneven.node_of(owner) not in homes
    # Same host, two local folders (two torchrun agents on one machine): two failure domains.
    assert Topology((("a", "/x"), ("a", "/y")), replicas=1).holders(0) == [1]


def test_a_piece_travels_as_bytes_and_is_published_whole(tmp_path):
    local = tier(tmp_path)
    save(local, 2)
    piece = tmp_path / "local" / "rank_00000" / "step_00000002"
    packed = pack(str(piece))
    dest = tmp_path / "there" / "step_00000002"
    assert unpack(packed, str(tmp_path / "there" / "work"), str(dest)) == 2
    assert {p.name: p.read_bytes() for p in dest.iterdir() if p.name != "manifest.json"} == {
        p.name: p.read_bytes() for p in piece.iterdir() if p.name != "manifest.json"
    }
    assert json.loads((dest / "manifest.json").read_text()) == json.loads(
        (piece / "manifest.json").read_text()
    )
    short = Packed(packed.manifest, packed.payload[:-1])
    with pytest.raises(ValueError, match="bytes"):
        unpack(short, str(tmp_path / "w2"), str(tmp_path / "x" / "step_00000002"))
    assert not (tmp_path / "x").exists()
    evil = json.loads(packed.manifest)
    evil["files"]["../escape"] = evil["files"].pop("state.pt")
    with pytest.raises(ValueError, match="not one"):
        unpack(Packed(json.dumps(evil).encode(), packed.payload), str(tmp_path / "w3"), str(tmp_path / "y"))


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
