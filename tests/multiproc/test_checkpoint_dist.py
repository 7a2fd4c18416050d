"""Checkpoints across 2 ranks over gloo on loopback: per-rank state is gathered to rank 0, each rank
gets its own back (load_mode all and broadcast), clock-based saves are decided alike on every rank, and a
save that fails on rank 0 fails on every rank instead of hanging the others."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from disttrain.ckpt_format import read_checkpoint
from disttrain.ckpt_write import CheckpointManager
from disttrain.config import CheckpointConfig
from tests.conftest import child_env, free_port

pytestmark = pytest.mark.multiproc


def _worker(run_dir: str) -> None:
    import json
    import time

    import numpy as np
    import torch.distributed as tdist

    from disttrain import dist
    from disttrain.errors import CheckpointError
    from disttrain.state import capture_rank_state, restore_rank_state

    rank = int(os.environ["RANK"])
    tdist.init_process_group("gloo", rank=rank, world_size=2, timeout=dist.timeout(30))
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)  # identical on both ranks
    torch.manual_seed(100 + rank)  # per-rank RNG streams differ
    np.random.seed(100 + rank)
    saved = {}

    def rank_state(step):
        saved[step] = capture_rank_state()
        return {"rng": saved[step], "data": {"rank": rank, "cursor": 10 * step + rank}}

    mgr = CheckpointManager(run_dir, CheckpointConfig(every_steps=2, async_save=True))
    for step in range(1, 5):
        torch.rand(5), np.random.rand(5)
        mgr.maybe_save(step, lambda: {"model": model.state_dict()}, lambda s=step: rank_state(s))
    assert mgr.maybe_save(5, lambda: {"model": model.state_dict()}, lambda: rank_state(5), final=True)
    after = torch.rand(3)  # drawn right after the step-5 capture

    for mode in ("all", "broadcast"):
        app, mine = CheckpointManager(run_dir, CheckpointConfig(load_mode=mode)).load()
        assert torch.equal(app["model"]["weight"], model.weight.detach()), mode
        assert mine["data"] == {"rank": rank, "cursor": 50 + rank}, (mode, mine["data"])
        restore_rank_state(mine["rng"])
        assert torch.equal(torch.rand(3), after), f"{mode}: rank {rank} did not get its own RNG state"

    clock = CheckpointManager(
        f"{run_dir}-clock", CheckpointConfig(every_steps=0, every_minutes=0.05 / 60, async_save=True)
    )
    decided = []
    for step in range(1, 21):
        time.sleep(0.004 * (1 + rank))  # the ranks' clocks run apart; rank 0's decides for both
        decided.append(clock.maybe_save(step, lambda: {"model": model.state_dict()}, lambda: {}) is not None)
    everyone = dist.gather_to_main(decided)

    try:
        mgr.save(9, {"model": model.state_dict(), "trainer": {"bad": np.zeros(1)}}, {}, sync=True)
        failed = "no error"
    except CheckpointError as err:
        failed = str(err)
    if rank == 0:
        with open(os.path.join(run_dir, "result.json"), "w") as fh:
            json.dump({"decided": everyone, "failed": failed}, fh)
    tdist.barrier()
    if rank == 1:
        with open(os.path.join(run_dir, "result1.json"), "w") as fh:
            json.dump({"failed": failed}, fh)
    dist.destroy()


def test_two_ranks_gather_and_get_their_own_state_back(tmp_path):
    import json

    run_dir = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["PYTHONPATH"] = child_env()["PYTHONPATH"]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, run_dir],
            env={**env, "RANK": str(r), "WORLD_SIZE": "2"},
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(errors)

    result = json.loads((tmp_path / "run/result.json").read_text())
    decided = result["decided"]
    assert decided[0] == decided[1] and any(decided[0]) and not all(decided[0])
    failed0, failed1 = result["failed"], json.loads((tmp_path / "run/result1.json").read_text())["failed"]
    assert "app_state['trainer']['bad'] is a numpy.ndarray" in failed0
    assert "failed on another rank" in failed1

    mgr = CheckpointManager(run_dir, CheckpointConfig())
    assert [(i.step, i.world_size) for i in mgr.list()] == [(5, 2), (4, 2), (2, 2)]
    _, ranks = read_checkpoint(mgr.list()[0].path)
    assert [r["data"] for r in ranks] == [{"rank": 0, "cursor": 50}, {"rank": 1, "cursor": 51}]
    assert not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])
    app, mine = mgr.load()  # one process now: the saved world size (2) differs
    assert mine is None and "weight" in app["model"]


if __name__ == "__main__":
    _worker(sys.argv[1])
