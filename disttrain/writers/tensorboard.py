"""TensorBoard events under RUN_DIR/tb/, one file per segment, replayed steps purged."""

from __future__ import annotations

from disttrain import fs, rundir
from disttrain.writers.base import Writer
from disttrain.writers.staging import Staging


class TensorBoardWriter(Writer):
    """RUN_DIR/tb/: one event file per segment. `purge_step=resumed_step + 1` writes a session-start
    marker that makes TensorBoard discard what earlier files hold from that step on: the steps an
    interrupted segment logged after its last checkpoint, which this segment logs again."""

    def __init__(self, run_dir: str, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter  # lazy: pulls tensorboard and protobuf

        self.stage = Staging(fs.join(run_dir, rundir.TENSORBOARD))
        self.tb = SummaryWriter(self.stage.local, purge_step=resumed_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()  # like metrics.jsonl: a kill -9 loses at most the lines of this step
        self.stage.maybe_sync()

    def close(self) -> None:
        self.tb.close()
        self.stage.close()
