"""Hooks fire at the five points, in order, on a real (one-process) trainer."""

from __future__ import annotations

from disttrain.cluster import detect
from disttrain.config import load_config
from disttrain.hooks import Hook
from disttrain.trainer import build_trainer


class Recorder(Hook):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.saved_at: list[int] = []

    def before_train(self, trainer) -> None:
        self.calls.append(("before_train", trainer.step))

    def before_step(self, trainer) -> None:
        self.calls.append(("before_step", trainer.step))

    def after_step(self, trainer) -> None:
        self.calls.append(("after_step", trainer.step))
        if trainer.step == 3:
            trainer.save_checkpoint()  # a checkpoint on demand from a hook

    def after_eval(self, trainer, metrics) -> None:
        self.calls.append(("after_eval", trainer.step))
        assert set(metrics) == {"eval/loss", "eval/accuracy"}

    def after_train(self, trainer) -> None:
        self.calls.append(("after_train", trainer.step))


def test_hook_points_fire_in_order(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "trainer.max_steps=4", "trainer.eval_every=2",
                             "checkpoint.every_steps=0", "checkpoint.save_final=false", "trainer.progress=none",
                             "log.console=false", "log.plot=false"])  # fmt: skip
    rec = Recorder()
    trainer = build_trainer(cfg, detect({}), hooks=[rec])
    assert trainer.fit().outcome == "finished"
    names = [c for c in rec.calls if c[0] != "before_step"]
    # User hooks run after the stock ones, so the stock eval hook's after_eval comes first at step 2.
    assert names == [
        ("before_train", 0), ("after_step", 1), ("after_eval", 2), ("after_step", 2), ("after_step", 3),
        ("after_eval", 4), ("after_step", 4), ("after_train", 4),
    ]  # fmt: skip
    assert [c for c in rec.calls if c[0] == "before_step"] == [("before_step", s) for s in range(4)]
    assert [i.step for i in trainer.checkpointing.manager.list()] == [3]
