"""Run under torchrun (any world size) by test_fsdp.py: build a trainer that loads a checkpoint
(resume=PATH), then save it again at once into another run dir. Nothing trains in between, so the
saved state must equal the loaded one exactly, whatever the two world sizes."""

from __future__ import annotations

import sys

from disttrain import dist
from disttrain.cluster import detect
from disttrain.config import load_config
from disttrain.trainer import build_trainer


def main(overrides: list[str]) -> None:
    trainer = build_trainer(load_config(None, overrides), detect())
    trainer.save_checkpoint(reason="roundtrip")
    trainer.close()
    dist.destroy()


if __name__ == "__main__":
    main(sys.argv[1:])
