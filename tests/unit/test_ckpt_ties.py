"""Tied weights in the sharded checkpoint format, on one process (tests/multiproc/test_fsdp_tied.py runs
the real 2-rank case): a tie record loads back into the one shared Parameter and the optimizer state
kept under the canonical name, exports every key, an older checkpoint without tie records (the tied
tensor saved twice) still loads, and a tie record that names no saved tensor is caught by `verify`."""

from __future__ import annotations

import json

import safetensors.torch
import torch
from torch import nn

from disttrain.ckpt_sharded import load_model, load_optimizer, parameter_names, tied_names
from disttrain.ckpt_write import CheckpointManager
from disttrain.commands.ckpt import main as ckpt_main
from disttrain.config import CheckpointConfig


class Tied(nn.Module):
    """An embedding and an output head that share one weight, as GPT-2's wte and lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight


def _entry(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": "float32", "rows": [0, t.shape[0]]}


def _save(run: str, weight: torch.Tensor, moment: torch.Tensor, tie_record: bool = True) -> str:
    """A one-rank checkpoint in the sharded format: the weight and its Adam moment as rows of a shard,
    the tie as a record (or, as before tie records, the head's weight saved as a tensor of its own)."""
    rows = {"model/emb.weight": weight, "optim/emb.weight/exp_avg": moment}
    layout = {k: _entry(v) for k, v in rows.items()}
    if tie_record:
        layout["model/head.weight"] = {"tied_to": "model/emb.weight"}
    else:
        rows["model/head.weight"] = weight.clone()
        layout["model/head.weight"] = _entry(weight)
    (group,) = torch.optim.Adam(Tied().parameters(), lr=0.1).state_dict()["param_groups"]
    groups = [{**group, "params": ["emb.weight"]}]  # keyed by name, as split_state keys them
    optimizer = {"param_groups": groups, "state": {"emb.weight": {"step": torch.tensor(3.0)}}}
    app = {"model": {}, "optimizer": optimizer}
    mgr = CheckpointManager(run, CheckpointConfig())
    mgr.save(3, app, {}, shards=(rows, layout))
    return mgr.read(3).path


def _load(run: str) -> tuple[Tied, torch.optim.Optimizer]:
    model = Tied()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    loaded = CheckpointManager(run, CheckpointConfig()).read(3)
    load_model(model, loaded.saved(None), loaded.path)
    load_optimizer(optimizer, model, loaded.saved(parameter_names(model, optimizer)))
    return model, optimizer


def test_ties_are_named_by_the_first_key_of_the_shared_tensor():
    model = Tied()
    assert tied_names(model) == {"head.weight": "emb.weight"}
    optimizer = torch.optim.Adam(model.parameters())
    assert parameter_names(model, optimizer) == ["emb.weight"]


def test_a_tie_record_loads_into_one_shared_parameter_and_exports_every_key(tmp_path):
    weight, moment = torch.randn(6, 4), torch.randn(6, 4)
    run = str(tmp_path / "run")
    _save(run, weight, moment)
    model, optimizer = _load(run)
    assert model.head.weight is model.emb.weight and torch.equal(model.emb.weight, weight)
    (state,) = optimizer.state_dict()["state"].values()
    assert torch.equal(state["exp_avg"], moment) and float(state["step"]) == 3.0
    out = tmp_path / "w.safetensors"
    assert ckpt_main(["export", run, "--out", str(out)]) == 0
    exported = safetensors.torch.load_file(str(out))
    assert exported.keys() == {"emb.weight", "head.weight"}
    assert torch.equal(exported["head.weight"], weight) and torch.equal(exported["emb.weight"], weight)


def test_a_checkpoint_without_tie_records_still_loads(tmp_path):
    weight, moment = torch.randn(6, 4), torch.randn(6, 4)
    run = str(tmp_path / "run")
    _save(run, weight, moment, tie_record=False)
    model, _ = _load(run)
    assert model.head.weight is model.emb.weight and torch.equal(model.emb.weight, weight)


def test_a_tie_record_to_a_tensor_not_saved_fails_verification(tmp_path, capsys):
    run = str(tmp_path / "run")
    path = _save(run, torch.randn(6, 4), torch.randn(6, 4))
    manifest_path = f"{path}/manifest.json"
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    manifest["layout"]["model/head.weight"] = {"tied_to": "model/nothing"}
    with open(manifest_path, "w") as fh:
        json.dump(manifest, fh)
    assert ckpt_main(["verify", run]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "'model/head.weight' is tied to 'model/nothing'" in out
