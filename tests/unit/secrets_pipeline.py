"""A user pipeline for the secrets and writer tests (it holds no tests): the digits example, taking any
keyword argument (so a credential can be planted at `pipeline.args.api_token`), with optional delays
per micro-batch and per eval batch so a test can interrupt a run mid-way (or mid-eval), and a planted
failure after
$DISTTRAIN_TEST_FAIL_AFTER micro-batches (an environment variable: pipeline.args must not change
between segments of one run)."""

from __future__ import annotations

import os
import time
from typing import Any

from disttrain.pipelines.digits import DigitsPipeline


class SecretDigits(DigitsPipeline):
    def __init__(self, step_delay: float = 0.0, eval_delay: float = 0.0, **kwargs: Any):
        super().__init__()
        self.step_delay, self.eval_delay = step_delay, eval_delay
        self.extra = kwargs  # e.g. api_token: what a real pipeline would use to reach a private bucket
        self.calls = 0

    def loss(self, model: Any, batch: Any) -> Any:
        self.calls += 1
        if self.calls > int(os.environ.get("DISTTRAIN_TEST_FAIL_AFTER") or 10**9):
            raise RuntimeError("planted failure in the user's loss")
        time.sleep(self.step_delay)
        return super().loss(model, batch)

    def eval_step(self, model: Any, batch: Any) -> Any:
        time.sleep(self.eval_delay)
        return super().eval_step(model, batch)
