"""Pipelines the cluster tests run inside SLURM jobs (importable there through PYTHONPATH; no tests here)."""

from __future__ import annotations

from tests.pipelines import ProbeDigits


class FailingProbe(ProbeDigits):
    """ProbeDigits that raises in its loss after `fail_after` micro-batches (0: never), and accepts a
    credential at `api_token` the way a real pipeline would take one for a private bucket."""

    def __init__(self, fail_after: int = 0, api_token: str = "", **kwargs):
        super().__init__(**kwargs)
        self.fail_after, self.api_token, self.calls = fail_after, api_token, 0

    def loss(self, model, batch):
        self.calls += 1
        if self.fail_after and self.calls > self.fail_after:
            raise RuntimeError(
                f"planted failure in the pipeline's loss after {self.fail_after} micro-batches"
            )
        return super().loss(model, batch)
