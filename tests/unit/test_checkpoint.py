"""The checkpoint manager on one process: round trip, publish protocol, retention, corruption, async,
disk full, a malicious pickle, and the `disttrain ckpt` command. Real files, real fsspec filesystems."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import subprocess
import threading
import time

import fsspec
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from fsspec.implementations.memory import MemoryFileSystem

from disttrain.ckpt_write import CheckpointManager
from disttrain.commands.ckpt import main as ckpt_main
from disttrain.config import CheckpointConfig
from disttrain.errors import CheckpointError
from disttrain.state import capture_rank_state, restore_rank_state

# --------------------------------------------------------------------------------------- helpers


class LimitedMemFS(MemoryFileSystem):
    """An in-memory filesystem of its own (protocol testfs://) that records write order, can hold a
    write until a gate opens, and fails writes with ENOSPC once `budget` bytes are spent."""

    protocol = "testfs"
    store: dict = {}
    pseudo_dirs = [""]
    budget: int | None = None
    opened: list[str] = []
    gates: dict[str, threading.Event] = {}
    active = 0
    max_active = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("testfs://"))

    @classmethod
    def reset(cls):
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.opened.clear()
        cls.gates.clear()
        cls.budget, cls.active, cls.max_active = None, 0, 0

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if "w" in mode:
            LimitedMemFS.opened.append(path)
            f.write = self._limited(path, f.write)
        return f

    @staticmethod
    def _limited(path, write):
        def limited(data):
            LimitedMemFS.active += 1
            LimitedMemFS.max_active = max(LimitedMemFS.max_active, LimitedMemFS.active)
            try:
                for key, gate in LimitedMemFS.gates.items():
                    if key in path:
                        assert gate.wait(10), "test gate never opened"
                if LimitedMemFS.budget is not None:
                    if len(data) > LimitedMemFS.budget:
                        LimitedMemFS.budget = 0
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
                    LimitedMemFS.budget -= len(data)
                return write(data)
            finally:
                LimitedMemFS.active -= 1

        return limited


fsspec.register_implementation("testfs", LimitedMemFS, clobber=True)


@pytest.fixture
def testfs():
    LimitedMemFS.reset()
    yield "testfs://run"
    LimitedMemFS.reset()


def _cfg(**kw) -> CheckpointConfig:
    base = {"every_steps": 1, "keep_last": 10, "async_save": False}
    return CheckpointConfig(**{**base, **kw})


class Net(torch.nn.Module):
    """A small CNN with dropout (so training consumes RNG) and a tied, transposed weight."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.drop = torch.nn.Dropout(0.2)
        self.fc = torch.nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.conv(x))).flatten(1))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _train(model, opt, sched, steps):
    losses = []
    for _ in range(steps):
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
        loss = F.cross_entropy(model(x), y) * (1 + 0.01 * random.random() + 0.01 * np.random.rand())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _app(model, opt, sched, step):
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": None,
        "trainer": {"step": step, "epoch": 0, "cursor": step * 8},
        "hooks": {"best": {"value": 0.5}},
    }


def _rank():
    return {"rng": capture_rank_state(), "data": {"cursor": 24}}


def _assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _saved(run_dir, steps, **kw):
    mgr = CheckpointManager(run_dir, _cfg(**kw))
    model, opt, sched = _setup()
    for step in steps:
        _train(model, opt, sched, 1)
        mgr.save(step, _app(model, opt, sched, step), _rank())
    mgr.wait()
    return mgr, model


def _steps(mgr):
    return [i.step for i in mgr.list()]


# ------------------------------------------------------------------------------------ round trip


def test_round_trip_is_bitwise_and_training_continues_identically(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 3)
    mgr = CheckpointManager(str(tmp_path), _cfg())
    app, rank = _app(model, opt, sched, 3), _rank()
    expected = {k: _copy(v) for k, v in app.items()}
    mgr.save(3, app, rank)
    after = _train(model, opt, sched, 4)

    loaded, loaded_rank = CheckpointManager(str(tmp_path), _cfg()).load()
    _assert_same(expected, loaded)
    model2, opt2, sched2 = _setup(seed=1)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    restore_rank_state(loaded_rank["rng"])
    assert loaded_rank["data"] == {"cursor": 24}
    assert _train(model2, opt2, sched2, 4) == after
    _assert_same(model.state_dict(), model2.state_dict())
    _assert_same(opt.state_dict(), opt2.state_dict())


def _copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    return obj


def test_rank_state_restores_every_generator():
    state = capture_rank_state()
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], random.gauss(0, 1))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rank_state(state)
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], random.gauss(0, 1))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2:] == again[2:]


def test_shared_and_strided_model_tensors_save(tmp_path):
    w = torch.randn(6, 4)
    model = {"emb": w, "out": w, "t": w.t(), "row": w[2]}
    mgr = CheckpointManager(str(tmp_path), _cfg())
    mgr.save(1, {"model": model}, _rank())
    loaded, _ = mgr.load(1)
    _assert_same({k: v.contiguous() for k, v in model.items()}, loaded["model"])


def test_state_that_would_not_load_is_refused_at_save(tmp_path):
    mgr = CheckpointManager(str(tmp_path), _cfg())
    with pytest.raises(CheckpointError, match=r"app_state\['trainer'\]\['mean'\] is a numpy.ndarray"):
        mgr.save(1, {"model": {}, "trainer": {"mean": np.zeros(3)}}, _rank())
    assert mgr.list() == []


# -------------------------------------------------------------------------------- publish protocol


def test_manifest_is_written_last_then_latest(testfs):
    mgr, _ = _saved(testfs, [1, 2])
    first = next(i for i, p in enumerate(LimitedMemFS.opened) if "step_00000002" in p)
    names = [p.rsplit("/", 1)[-1] for p in LimitedMemFS.opened[first:]]
    assert names[-2:] == ["manifest.json", "latest"]
    assert sorted(names[:-2]) == ["model.safetensors", "ranks.pt", "state.pt"]
    assert fsspec.filesystem("testfs").cat("/run/checkpoints/latest") == b"step_00000002"


def test_local_save_leaves_only_committed_dirs(tmp_path):
    mgr, _ = _saved(str(tmp_path), [1, 2, 3])
    ckpts = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000001", "step_00000002", "step_00000003"]
    assert (ckpts / "latest").read_text() == "step_00000003"
    manifest = json.loads((ckpts / "step_00000003" / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["world_size"] == 1
    assert manifest["versions"]["torch"] == torch.__version__
    for name, meta in manifest["files"].items():
        assert (ckpts / "step_00000003" / name).stat().st_size == meta["bytes"]


def test_manifest_records_config_hash_and_fingerprint(tmp_path):
    mgr = CheckpointManager(str(tmp_path), _cfg(), config_hash="abc", fingerprint={"seed": 3})
    mgr.save(5, {"model": {"w": torch.ones(2)}}, _rank())
    info = mgr.list()[0]
    assert mgr.saved_fingerprint(info) == {"seed": 3}
    assert (
        json.loads((tmp_path / "checkpoints/step_00000005/manifest.json").read_text())["config_hash"] == "abc"
    )


def test_stale_tmp_and_manifestless_dirs_are_ignored_then_cleaned(tmp_path):
    mgr, _ = _saved(str(tmp_path), [1])
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_00000002.tmp-dead").mkdir()  # a save killed before its rename...
    (ckpts / "step_00000002.tmp-dead" / "manifest.json").write_text("{}")  # ...even after its manifest
    (ckpts / "step_00000003").mkdir()  # a deletion killed after removing the manifest
    (ckpts / "step_00000003" / "state.pt").write_bytes(b"partial")
    assert _steps(mgr) == [1] and mgr.latest_verified().step == 1
    mgr.save(4, {"model": {"w": torch.ones(2)}}, _rank())
    assert sorted(os.listdir(ckpts)) == ["latest", "step_00000001", "step_00000004"]


def test_resaving_a_step_replaces_a_corrupt_one(tmp_path):
    mgr, _ = _saved(str(tmp_path), [1, 2])
    _flip_byte(tmp_path / "checkpoints/step_00000002/model.safetensors")
    assert mgr.latest_verified().step == 1
    mgr.save(2, {"model": {"w": torch.ones(2)}}, _rank())
    assert mgr.verify(2) is None and mgr.latest_verified().step == 2


def test_memory_url_run_dir(tmp_path):
    run = f"memory://ckpt-{tmp_path.name}"
    try:
        mgr, model = _saved(run, [1, 2, 3], keep_last=2)
        assert _steps(mgr) == [3, 2]
        mem = fsspec.filesystem("memory")
        assert mem.cat(f"{run}/checkpoints/latest") == b"step_00000003"
        mem.pipe(f"{run}/checkpoints/step_00000003/ranks.pt", b"x")
        assert "ranks.pt: 1 bytes" in mgr.verify(3)
        loaded, _ = mgr.load()
        assert loaded["trainer"]["step"] == 2
    finally:
        fsspec.filesystem("memory").rm(run, recursive=True)


# -------------------------------------------------------------------------------------- retention


def test_retention_keeps_last_and_milestones(tmp_path):
    mgr, _ = _saved(str(tmp_path), range(1, 11), keep_last=2, keep_every=4)
    assert _steps(mgr) == [10, 9, 8, 4]
    assert (tmp_path / "checkpoints/latest").read_text() == "step_00000010"


def test_retention_never_deletes_the_newest_verified(tmp_path):
    mgr, _ = _saved(str(tmp_path), [4, 5])
    _flip_byte(tmp_path / "checkpoints/step_00000005/state.pt")
    # Resumed from 4 (5 is corrupt); saving 3 with keep_last=1 must keep 4, the newest that verifies.
    CheckpointManager(str(tmp_path), _cfg(keep_last=1)).save(3, {"model": {"w": torch.ones(1)}}, _rank())
    assert _steps(mgr) == [5, 4, 3]


# ------------------------------------------------------------------------------------- corruption


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _garble(path):
    path.write_text("{not json")


CORRUPTIONS = {
    "flip model": ("model.safetensors", _flip_byte, "sha256"),
    "flip state": ("state.pt", _flip_byte, "sha256"),
    "truncate ranks": ("ranks.pt", _truncate, "bytes, but the manifest says"),
    "delete state": ("state.pt", lambda p: p.unlink(), "missing"),
    "garble manifest": ("manifest.json", _garble, "unreadable"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_is_named_and_loading_falls_back(tmp_path, caplog, case):
    name, damage, what = CORRUPTIONS[case]
    mgr, _ = _saved(str(tmp_path), [1, 2])
    damage(tmp_path / "checkpoints/step_00000002" / name)
    problem = mgr.verify(2)
    assert problem is not None and name in problem and what in problem
    assert mgr.verify(1) is None
    with caplog.at_level(logging.WARNING, logger="disttrain.checkpoint"):
        assert mgr.latest_verified().step == 1
    assert "skipping checkpoint step 2: " in caplog.text and name in caplog.text
    app, _ = mgr.load()
    assert app["trainer"]["step"] == 1
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        mgr.load(2)


def test_deleted_manifest_means_the_checkpoint_does_not_exist(tmp_path):
    mgr, _ = _saved(str(tmp_path), [1, 2])
    (tmp_path / "checkpoints/step_00000002/manifest.json").unlink()
    assert _steps(mgr) == [1] and mgr.latest_verified().step == 1
    assert "manifest.json: missing" in mgr.verify(2)
    assert mgr.load()[0]["trainer"]["step"] == 1


def test_no_verified_checkpoint_is_a_clear_error(tmp_path):
    mgr, _ = _saved(str(tmp_path), [1])
    _flip_byte(tmp_path / "checkpoints/step_00000001/ranks.pt")
    with pytest.raises(CheckpointError, match="no verified checkpoint under"):
        mgr.load()


def test_load_by_checkpoint_path_and_by_run_dir(tmp_path):
    mgr, _ = _saved(str(tmp_path / "a"), [1, 2])
    other = CheckpointManager(str(tmp_path / "b"), _cfg())
    assert other.load(str(tmp_path / "a/checkpoints/step_00000001"))[0]["trainer"]["step"] == 1
    assert other.load(str(tmp_path / "a"))[0]["trainer"]["step"] == 2
    with pytest.raises(CheckpointError, match="manifest.json: missing"):
        other.load(str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------ malicious


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker, forge_manifest):
    torch.save({"optimizer": Evil(str(marker))}, path / "state.pt")
    if forge_manifest:
        manifest = json.loads((path / "manifest.json").read_text())
        data = (path / "state.pt").read_bytes()
        manifest["files"]["state.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("forge_manifest", [False, True])
def test_malicious_pickle_never_executes(tmp_path, forge_manifest):
    mgr, _ = _saved(str(tmp_path / "run"), [1])
    ckpt, marker = tmp_path / "run/checkpoints/step_00000001", tmp_path / "pwned"
    _plant(ckpt, marker, forge_manifest)
    if forge_manifest:
        assert mgr.verify(1) is None  # the forged hashes match: only weights_only stands in the way
        match = r"state\.pt: refused by torch\.load\(weights_only=True\)"
    else:
        assert "state.pt" in mgr.verify(1)
        match = r"state\.pt: .*(sha256|bytes)"
    with pytest.raises(CheckpointError, match=match):
        mgr.load(1)
    with pytest.raises(CheckpointError, match=match if forge_manifest else "no verified checkpoint"):
        mgr.load()
    assert not marker.exists()
    torch.load(ckpt / "state.pt", weights_only=False)  # proof the payload is live: unsafe loading runs it
    assert marker.exists()


# ------------------------------------------------------------------------------------------ async


def _big_state(n=3_000_000):
    return {
        "model": {"w": torch.randn(n)},
        "optimizer": {"state": {0: {"m": torch.randn(n), "v": torch.randn(n)}}},
    }


def test_async_save_blocks_less_and_writes_a_snapshot(tmp_path):
    state = _big_state()
    sync = CheckpointManager(str(tmp_path / "sync"), _cfg())
    t0 = time.perf_counter()
    sync.save(1, state, _rank())
    sync_s = time.perf_counter() - t0
    expected = _copy(state)
    asy = CheckpointManager(str(tmp_path / "async"), _cfg(async_save=True))
    t0 = time.perf_counter()
    asy.save(1, state, _rank())
    async_s = time.perf_counter() - t0
    state["model"]["w"].zero_()  # training goes on while the write runs: the checkpoint must not see it
    state["optimizer"]["state"][0]["m"].add_(1)
    asy.wait()
    assert async_s < 0.5 * sync_s, (async_s, sync_s)
    loaded, _ = asy.load(1)
    _assert_same(expected["model"], loaded["model"])
    _assert_same(expected["optimizer"], loaded["optimizer"])


def test_async_failure_surfaces_at_the_next_call(testfs):
    mgr = CheckpointManager(testfs, _cfg(async_save=True, every_steps=2))
    state = {"model": {"w": torch.ones(1000)}}
    mgr.save(2, state, _rank())
    mgr.wait()
    LimitedMemFS.budget = 100
    mgr.save(4, state, _rank())  # returns: the write fails in the background
    mgr._join()
    with pytest.raises(CheckpointError, match="writing checkpoint step 4 .*No space left on device"):
        mgr.maybe_save(5, lambda: state, _rank)  # not a save step, yet the failure is raised here
    mgr.check()  # raised once, not forever
    assert _steps(mgr) == [2]


def test_one_async_save_in_flight(testfs):
    mgr = CheckpointManager(testfs, _cfg(async_save=True))
    gate = LimitedMemFS.gates["step_00000001/model"] = threading.Event()
    mgr.save(1, {"model": {"w": torch.ones(10)}}, _rank())
    second = threading.Thread(target=mgr.save, args=(2, {"model": {"w": torch.ones(10)}}, _rank()))
    second.start()
    time.sleep(0.3)
    assert second.is_alive(), "the second save must wait for the first"
    assert not any("step_00000002" in p for p in LimitedMemFS.opened)
    gate.set()
    second.join(10)
    mgr.wait()
    assert _steps(mgr) == [2, 1] and LimitedMemFS.max_active == 1


# --------------------------------------------------------------------------------------- cadence


def test_maybe_save_by_steps_final_and_clock(tmp_path):
    mgr = CheckpointManager(str(tmp_path), _cfg(every_steps=3, async_save=True))
    calls = []

    def make():
        calls.append(1)
        return {"model": {"w": torch.ones(1)}}

    saved = [s for s in range(1, 8) if mgr.maybe_save(s, make, _rank)]
    assert saved == [3, 6] and len(calls) == 2  # state is built only when a save is due
    assert mgr.maybe_save(7, make, _rank, final=True)
    assert not mgr.maybe_save(7, make, _rank, final=True)  # already saved
    assert _steps(mgr) == [7, 6, 3]
    clock = CheckpointManager(str(tmp_path / "clock"), _cfg(every_steps=0, every_minutes=0.5 / 60))
    assert not clock.maybe_save(1, make, _rank)
    time.sleep(0.55)
    assert clock.maybe_save(2, make, _rank) and not clock.maybe_save(3, make, _rank)
    off = CheckpointManager(str(tmp_path / "off"), _cfg(save_final=False))
    assert not off.maybe_save(1, make, _rank, final=True) and _steps(off) == []


# ------------------------------------------------------------------------------------- disk full


def test_disk_full_fsspec_is_clear_and_keeps_the_previous(testfs):
    mgr = CheckpointManager(testfs, _cfg())
    model, opt, sched = _setup()
    _train(model, opt, sched, 1)
    mgr.save(1, _app(model, opt, sched, 1), _rank())
    LimitedMemFS.budget = 5000
    with pytest.raises(CheckpointError) as err:
        mgr.save(2, _app(model, opt, sched, 2), _rank())
    msg = str(err.value)
    assert "writing checkpoint step 2" in msg and "No space left on device" in msg
    assert "previous checkpoint step 1 is intact" in msg
    assert _steps(mgr) == [1] and mgr.verify(1) is None
    assert not fsspec.filesystem("testfs").exists("/run/checkpoints/step_00000002")
    assert mgr.load()[0]["trainer"]["step"] == 1


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_real_tmpfs(tiny_tmpfs):
    run = str(tiny_tmpfs / "run")
    mgr = CheckpointManager(run, _cfg())
    state = {"model": {"w": torch.randn(100_000)}, "trainer": {"step": 1}}  # 400 KB: one fits, two do not
    mgr.save(1, state, _rank())
    with pytest.raises(CheckpointError, match="step 2 .*No space left on device.*step 1 is intact"):
        mgr.save(2, {**state, "model": {"w": torch.randn(200_000)}}, _rank())
    assert sorted(os.listdir(tiny_tmpfs / "run/checkpoints")) == ["latest", "step_00000001"]
    loaded, _ = mgr.load()
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])


# -------------------------------------------------------------------------------------------- CLI


def test_cli_ls_verify_export(tmp_path, capsys):
    run = str(tmp_path / "run")
    _, model = _saved(run, [1, 2])
    assert ckpt_main(["ls", run]) == 0
    out = capsys.readouterr().out
    assert "step" in out and "verified" in out and out.count("yes") == 2
    assert ckpt_main(["verify", run]) == 0
    out_file = tmp_path / "model.safetensors"
    assert ckpt_main(["export", run, "--out", str(out_file)]) == 0
    _assert_same(dict(model.state_dict()), safetensors.torch.load_file(out_file))


def test_cli_after_corruption(tmp_path, capsys):
    run = str(tmp_path / "run")
    _saved(run, [1, 2])
    _flip_byte(tmp_path / "run/checkpoints/step_00000002/state.pt")
    capsys.readouterr()
    assert ckpt_main(["verify", run]) == 1
    out = capsys.readouterr().out
    assert "step 2: FAILED" in out and "state.pt" in out and "step 1: OK" in out
    assert ckpt_main(["verify", run, "--step", "1"]) == 0
    assert ckpt_main(["ls", run]) == 0 and "NO: " in capsys.readouterr().out
    out_file = tmp_path / "m.safetensors"
    assert ckpt_main(["export", run, "--out", str(out_file)]) == 0  # falls back to step 1
    assert "step 1" in capsys.readouterr().out
    _flip_byte(tmp_path / "run/checkpoints/step_00000002/model.safetensors")
    assert ckpt_main(["export", run, "--step", "2", "--out", str(out_file)]) == 1
    assert "model.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "/nonexistent/run"],
        ["ls", "/nonexistent/run"],
        ["verify", "RUN", "--step", "7"],
        ["frob"],
        ["export", "RUN"],
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv):
    _saved(str(tmp_path / "run"), [1])
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv]
    assert ckpt_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


def test_a_shard_failure_whose_text_starts_with_a_newline_keeps_its_cause(tmp_path, caplog, monkeypatch):
    """Issue 19, bug 2: safetensors' refusal of tensors sharing memory starts with a newline, and the
    error said `rank 0: ` with nothing after it. The one line carries the cause; the log has it whole.
    (Shared tensors are saved since ties are kept, so the same text is raised by the shard writer.)"""
    import disttrain.ckpt_sharded as sharded

    text = (
        "\nSome tensors share memory, this will lead to duplicate memory on disk.\nA potential way out: ..."
    )

    def refuse(*_args, **_kwargs):
        raise RuntimeError(text)

    monkeypatch.setattr(sharded, "write_shard", refuse)
    mgr = CheckpointManager(str(tmp_path / "run"), _cfg())
    with pytest.raises(CheckpointError) as err:
        mgr.save(1, {"trainer": {"step": 1}}, _rank(), shards=({"a": torch.zeros(4)}, {}))
    assert "failed: rank 0: Some tensors share memory" in str(err.value) and "\n" not in str(err.value)
    assert "A potential way out" in caplog.text
    assert _steps(mgr) == []
