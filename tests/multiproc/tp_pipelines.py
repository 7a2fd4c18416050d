"""Test pipelines with a tensor-parallel plan (issue 22)."""

from __future__ import annotations

from torch import nn

from tests.pipelines import ProbeDigits


class TPDigits(ProbeDigits):
    """ProbeDigits (delays, eval markers, sample records) through an MLP whose hidden layer is split over
    tp: Linear cut by output columns, then by input rows. The dropout sits before the split layer, so a
    tp group drawing different masks would compute a wrong (not a failing) step."""

    def build_model(self):
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Dropout(self.dropout), nn.Linear(48, 32), nn.ReLU(),
            nn.Linear(32, 10),
        )  # fmt: skip

    def tp_plan(self, model, mesh):
        from disttrain.tensor_parallel import ColwiseParallel, RowwiseParallel

        return {"4": ColwiseParallel(), "6": RowwiseParallel()}
