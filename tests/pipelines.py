"""Pipelines for tests: the digits example with knobs to slow steps down, mark eval, record samples."""

from __future__ import annotations

import os
import time

import torch
from torch.utils.data import Dataset

from disttrain.pipelines import Pipeline
from disttrain.pipelines.digits import DigitsPipeline
from disttrain.pipelines.hf import CausalLM
from disttrain.pipelines.tiny_gpt import TinyGPTPipeline


class Indexed(Dataset):
    """Returns (x, y, index) so a test can see exactly which samples were consumed."""

    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        x, y = self.inner[i]
        return x, y, torch.tensor(i)


class ProbeDigits(DigitsPipeline):
    """Digits with a per-step delay (so a signal lands where a test wants it), a marker file written
    when an eval starts, and, with `record_dir`, a file per process listing every sample trained on."""

    def __init__(self, step_delay: float = 0.0, eval_delay: float = 0.0, marker_dir: str = "",
                 record_dir: str = "", **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.step_delay, self.eval_delay = step_delay, eval_delay
        self.marker_dir, self.record_dir = marker_dir, record_dir

    def datasets(self):
        return {name: Indexed(ds) for name, ds in super().datasets().items()}

    def loss(self, model, batch):
        x, y, idx = batch
        if self.record_dir:
            with open(os.path.join(self.record_dir, f"samples_{os.getpid()}.txt"), "a") as fh:
                fh.write(" ".join(map(str, idx.tolist())) + "\n")
        time.sleep(self.step_delay)
        return super().loss(model, (x, y))

    def eval_step(self, model, batch):
        x, y, _ = batch
        if self.marker_dir:
            open(os.path.join(self.marker_dir, f"eval_{os.getpid()}"), "a").close()
        time.sleep(self.eval_delay)
        return super().eval_step(model, (x, y))


class BatchNormDigits(DigitsPipeline):
    """Digits through a CNN with BatchNorm (buffers that drift apart between ranks in training), whose
    test split is the eval split: `--test` of a checkpoint must reproduce the eval the run logged."""

    def build_model(self):
        from torch import nn

        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)
        )

    def datasets(self):
        splits = super().datasets()
        return {"train": splits["train"], "eval": splits["eval"], "test": splits["eval"]}


class EnvWidthDigits(DigitsPipeline):
    """Digits whose CNN width comes from $TEST_MODEL_WIDTH: model code that changed under the same config."""

    def build_model(self):
        from disttrain.pipelines.digits import DigitsCNN

        return DigitsCNN(int(os.environ.get("TEST_MODEL_WIDTH", "32")), self.dropout)


def stream_record(i: int, pad: int = 0) -> dict:
    """Record i of a ProbeStream file: 8 features and a label that depend on i alone."""
    g = torch.Generator().manual_seed(i)
    x = torch.randn(8, generator=g)
    return {"id": i, "x": [round(v, 6) for v in x.tolist()], "y": int(x.sum() > 0), "pad": "." * pad}


def _stream_sample(record: dict) -> dict:
    return {"id": torch.tensor(record["id"]), "x": torch.tensor(record["x"]), "y": torch.tensor(record["y"])}


class ProbeStream(Pipeline):
    """A small classifier trained from a JSON-lines stream (`path`), with dropout (so resume must restore
    each rank's RNG), a per-step delay, and with `record_dir` a file per process of every record id
    trained on."""

    def __init__(self, path: str = "", step_delay: float = 0.0, record_dir: str = ""):
        self.path, self.step_delay, self.record_dir = path, step_delay, record_dir

    def build_model(self):
        from torch import nn

        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))

    def datasets(self):
        from torch.utils.data import TensorDataset

        from disttrain.stream import JsonlStream

        evals = [_stream_sample(stream_record(-1 - i)) for i in range(64)]
        x, y = torch.stack([s["x"] for s in evals]), torch.stack([s["y"] for s in evals])
        return {"train": JsonlStream(self.path, transform=_stream_sample), "eval": TensorDataset(x, y)}

    def loss(self, model, batch):
        if self.record_dir:
            with open(os.path.join(self.record_dir, f"samples_{os.getpid()}.txt"), "a") as fh:
                fh.write(" ".join(map(str, batch["id"].tolist())) + "\n")
        time.sleep(self.step_delay)
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])

    def eval_step(self, model, batch):
        x, y = batch
        logits = model(x)
        return {
            "loss": torch.nn.functional.cross_entropy(logits, y, reduction="sum"),
            "accuracy": (logits.argmax(1) == y).sum(),
            "count": torch.tensor(len(y)),
        }


class StepDelay:
    """A per-step delay before a pipeline's own loss, so that a signal lands where a test wants it (a
    GPU step is too short otherwise). Mixed in before the pipeline class."""

    def __init__(self, step_delay: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.step_delay = step_delay

    def loss(self, model, batch):
        time.sleep(self.step_delay)
        return super().loss(model, batch)


class SlowCausalLM(StepDelay, CausalLM):
    """The built-in HF pipeline with a per-step delay."""


class SlowTinyGPT(StepDelay, TinyGPTPipeline):
    """tiny_gpt with a per-step delay."""


class PlainIterable(DigitsPipeline):
    """Digits whose train split is a torch IterableDataset that cannot say where it is."""

    def datasets(self):
        from torch.utils.data import IterableDataset

        class Samples(IterableDataset):
            def __init__(self, inner):
                self.inner = inner

            def __iter__(self):
                return (self.inner[i] for i in range(len(self.inner)))

        splits = super().datasets()
        return {**splits, "train": Samples(splits["train"])}


class PoisonDigits(ProbeDigits):
    """Digits whose loss turns NaN on the micro-batch holding any of the `poison` samples: whichever rank
    trains on them, at the step the global sample order puts them in (the same in every run). `how`:
    "add" makes the loss NaN while its gradient stays finite (the case only the guard's fold catches),
    "mul" makes both NaN. Also logs a training metric of its own (train/correct), and has an `aux` head
    that, with `unused_head`, no loss ever reaches (DDP must be told: trainer.find_unused_parameters)."""

    train_metrics = ("correct",)

    def __init__(
        self, poison: list[int] | None = None, how: str = "add", unused_head: bool = False, **kwargs
    ):
        super().__init__(**kwargs)
        self.poison, self.how, self.unused_head = set(poison or []), how, unused_head

    def build_model(self):
        from torch import nn

        model = super().build_model()
        if self.unused_head:
            model.aux = nn.Linear(10, 10)  # trained by nobody
        return model

    def loss(self, model, batch):
        x, y, idx = batch
        logits = model(x)
        self.log_metric("correct", (logits.argmax(1) == y).float().mean())
        loss = torch.nn.functional.cross_entropy(logits, y)
        if self.poison & set(idx.tolist()):
            loss = loss + float("nan") if self.how == "add" else loss * float("nan")
        return loss


class NanEvalDigits(DigitsPipeline):
    """Digits whose eval loss is NaN (training is fine): an eval metric that is no result."""

    def eval_step(self, model, batch):
        sums = super().eval_step(model, batch)
        return {**sums, "loss": sums["loss"] * float("nan")}


class SlowRank(DigitsPipeline):
    """Digits where one rank (`rank`, from $RANK) is slow or stuck: it sleeps `delay` s in every loss()
    (every rank sleeps `base` s there: an even workload), sleeps for ever in its loss() of optimizer step
    `hang_at` (1-based), or, with `stall_data_at`, for ever when its data loader fetches that step's
    batch (num_workers=0: in the main thread)."""

    def __init__(self, rank: int = 1, delay: float = 0.0, base: float = 0.0, hang_at: int = 0,
                 stall_data_at: int = 0, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.slow = int(os.environ.get("RANK", "0")) == rank
        self.delay, self.base, self.hang_at, self.stall_data_at = delay, base, hang_at, stall_data_at
        self.steps = 0

    def datasets(self):
        splits = super().datasets()
        if self.slow and self.stall_data_at:
            splits["train"] = _StallAt(splits["train"], self.stall_data_at)
        return splits

    def loss(self, model, batch):
        self.steps += 1
        time.sleep(self.base + (self.delay if self.slow else 0.0))
        while self.slow and self.steps == self.hang_at:
            time.sleep(1.0)  # stuck in the user's code
        return super().loss(model, batch)


class _StallAt(Dataset):
    """A train split whose fetch of the `at`-th batch never returns (a stuck read)."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.fetches = inner, at, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return self.inner[i]

    def __getitems__(self, ids):
        self.fetches += 1
        while self.fetches == self.at:
            time.sleep(1.0)
        return [self.inner[i] for i in ids]


class _IndexedWindows(Dataset):
    """Token windows with their index, so a test can see exactly which samples were consumed."""

    def __init__(self, inner: Dataset):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        return {**self.inner[i], "index": torch.tensor(i)}


class ProbeCausalLM(SlowCausalLM):
    """The built-in HF pipeline on the shipped corpus (map-style windows: resumable at another world
    size) with a per-step delay and, with `record_dir`, a file per process with a line per micro-batch
    of the windows trained on."""

    def __init__(self, record_dir: str = "", **kwargs):
        super().__init__(**kwargs)
        self.record_dir = record_dir

    def datasets(self):
        splits = super().datasets()
        return {**splits, "train": _IndexedWindows(splits["train"])}

    def loss(self, model, batch):
        index = batch.pop("index")
        if self.record_dir:
            with open(os.path.join(self.record_dir, f"samples_{os.getpid()}.txt"), "a") as fh:
                fh.write(" ".join(map(str, index.tolist())) + "\n")
        return super().loss(model, batch)


class UserGPT2(Pipeline):
    """A user's own HF pipeline (not disttrain's CausalLM) that defines no export_pretrained: its
    model is a transformers GPT-2, from a config or a local `pretrained` folder."""

    def __init__(self, n_embd: int = 16, pretrained: str = ""):
        self.n_embd, self.pretrained = n_embd, pretrained

    def build_model(self):
        from transformers import GPT2Config, GPT2LMHeadModel

        if self.pretrained:
            return GPT2LMHeadModel.from_pretrained(self.pretrained, local_files_only=True)
        config = GPT2Config(n_layer=1, n_head=2, n_embd=self.n_embd, n_positions=32, vocab_size=256,
                            bos_token_id=0, eos_token_id=0)  # fmt: skip
        return GPT2LMHeadModel(config)


class BatchNormProbe(ProbeDigits):
    """ProbeDigits through a CNN with BatchNorm (buffers, unsharded under fsdp, that drift apart between
    ranks) and dropout (each rank's RNG must resume exactly)."""

    def build_model(self):
        from torch import nn

        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
            nn.Linear(8 * 64, 10),
        )  # fmt: skip
