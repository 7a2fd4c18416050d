"""Run under torchrun (any world size) by test_fsdp.py: build a trainer that loads a checkpoint
(resume=PATH), then save it again at once into another run dir. Nothing trains in between, so the
saved state must equal the loaded one exactly, whatever the two world sizes. Every rank prints the
loaded model's ties ({alias: canonical} of state_dict keys that are one Parameter): `ties RANK: JSON`."""

from __future__ import annotations

import json
import sys

from disttrain import dist
from disttrain.ckpt_sharded import tied_names
from disttrain.cluster import detect
from disttrain.config import load_config
from disttrain.trainer import build_trainer


def main(overrides: list[str]) -> None:
    trainer = build_trainer(load_config(None, overrides), detect())
    # One write of one line: the ranks share the pipe, and print's pieces would interleave.
    sys.stdout.write(f"ties {dist.rank()}: {json.dumps(tied_names(trainer.module), sort_keys=True)}\n")
    sys.stdout.flush()
    trainer.save_checkpoint(reason="roundtrip")
    trainer.close()
    dist.destroy()


if __name__ == "__main__":
    main(sys.argv[1:])
