"""The non-finite guard: a NaN or Inf loss or gradient norm is never trained on, checkpointed or
resumed from (`trainer.nonfinite: stop | skip | off`).

How every rank reaches the same verdict at the same step without a collective of its own: DDP (and
FSDP) all-reduce the gradients before the optimizer step, and any non-finite value on one rank makes
the reduced gradient non-finite on every rank. A rank whose *loss* is non-finite folds that into its
gradient (it backpropagates `loss * nan`, so a loss that is NaN while its gradient is finite still
counts), so the global gradient norm, identical on every rank after the reduction, carries the verdict
into the step itself: the update can be skipped, or the run stopped, before a non-finite value reaches
the weights. Which quantity it was (some rank's loss, or only the gradient) travels as a flag in the
overlapped stop agreement (`stop.StopAgreement`, its "nonfinite" channel), settled at once when
the verdict is bad.

Under fp16 the grad scaler owns non-finite gradients (it skips the step and lowers the scale, which is
routine), so there the guard watches the loss alone and learns of it from the agreement, a few step
boundaries later; the poisoned step itself was already skipped by the scaler on every rank.

On a GPU with `stop` (the default) the verdict is read one step late, so that the loop never waits for
the device: the step's norm and loss flag are copied to pinned host memory without blocking, and the
next step boundary (or a save, or the end of the loop, whichever comes first) reads them, long after
the copy landed. A bad step's update is then already applied, but nothing can keep it: the run ends
(exit 1) at that boundary, naming the bad step, and a save flushes the verdict before it captures
anything. `skip` must decide before the update, so it reads the verdict at the step (one device sync a
step, about 1% of a GPU step: bench/RESULTS_GPU.md).

Independently of the mode, `check_state` refuses to save parameters that are not finite (or buffers
holding NaN; a buffer may hold -inf on purpose, e.g. an attention mask).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from disttrain import dist
from disttrain import events as ev
from disttrain.config import TrainerConfig
from disttrain.stop import StopAgreement
from disttrain.writers import EventLog, RunFiles

CHANNEL = "nonfinite"  # the agreement's flag for "some rank saw a non-finite loss"

NAN = float("nan")


class NonFiniteError(RuntimeError):
    """An agreed end on a non-finite quantity: the run fails (exit 1) and is never requeued. Raised on
    every rank at the same point, so the process group can still be torn down cleanly."""

    def __init__(self, step: int, quantity: str, message: str):
        super().__init__(message)
        self.step, self.quantity = step, quantity


class NonFiniteGuard:
    """Per-step verdicts, what they do (a `nonfinite` event, a line, or the end of the run), the check
    that no non-finite weights are saved, and the skip counters a checkpoint keeps (so a resumed run
    skips alike). `settle` waits for a save in flight: a run that fails commits it first."""

    def __init__(
        self,
        cfg: TrainerConfig,
        device: torch.device,
        scaler: bool,
        agreement: StopAgreement,
        events: EventLog,
        files: RunFiles,
        settle: Callable[[], None],
    ):
        self.mode, self.max_skips, self.agreement = cfg.nonfinite, cfg.max_skips, agreement
        self.flag = agreement.channel(CHANNEL)
        self.events, self.files, self.settle = events, files, settle
        self.on = cfg.nonfinite != "off"
        self.watch_grad = self.on and not scaler  # fp16: non-finite gradients are the scaler's business
        self.host = device.type == "cpu"  # reading a CPU scalar costs nothing; a GPU one would sync
        self._bad_dev: torch.Tensor | None = None  # GPU: this rank's loss verdict, read once per step
        # GPU + stop: the verdict of the last step, read at the next boundary (step, host copy, copy done)
        self.defer = self.watch_grad and not self.host and self.mode == "stop"
        self._pending: tuple[int, torch.Tensor, Any] | None = None
        self._host_buf: torch.Tensor | None = None
        self._exchanges = 0  # fp16: the agreement's exchanges already looked at
        self.consecutive = 0  # skipped steps in a row
        self.skipped = 0  # skipped steps in the whole run

    def fold(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: unchanged when finite (x * 1.0 is exact), NaN-poisoned when not,
        so that the gradient all-reduce carries this rank's verdict to every rank."""
        if not self.on:
            return loss
        if self.host and not self.defer:
            if math.isfinite(loss.item()):
                return loss
            self.flag.raised = True  # travels in the next exchange
            return loss * NAN
        ok = torch.isfinite(loss.detach())
        self._bad_dev = ~ok if self._bad_dev is None else self._bad_dev | ~ok
        return loss * torch.where(ok, 1.0, NAN)

    def bad_step(self, norm: torch.Tensor | None, step: int) -> bool:
        """After the gradients of `step` are reduced, before its update: whether it must not be applied.
        The same on every rank (the global norm is). A good step ends a run of skips. `norm` is None
        only when nothing computed it, which the guard being on rules out (metrics.grad_norm). Deferred
        (GPU, stop): acts on the previous step's verdict instead, and always answers False. Must be
        called on all ranks."""
        if not self.on or norm is None:
            return False
        if self.defer:
            self.flush()
            self._post(norm, step)
            return False
        value = self._read(norm)  # also hands this rank's loss flag to the agreement (fp16 needs it)
        bad = self.watch_grad and not math.isfinite(value)
        if self.watch_grad and not bad:
            self.consecutive = 0
        return bad

    def _read(self, norm: torch.Tensor) -> float:
        """The norm on the host, and (GPU) this rank's loss flag with it: one device read a step."""
        if self.host or self._bad_dev is None:
            return float(norm)
        value, bad = torch.stack([norm.float(), self._bad_dev.float()]).tolist()
        self._bad_dev = None
        self.flag.raised = self.flag.raised or bool(bad)
        return value

    def _post(self, norm: torch.Tensor, step: int) -> None:
        """Start copying `step`'s norm and loss flag to the host; `flush` reads them."""
        bad = self._bad_dev if self._bad_dev is not None else torch.zeros((), device=norm.device)
        self._bad_dev = None
        both = torch.stack([norm.detach().float(), bad.float()])
        if self._host_buf is None:  # one pinned buffer, reused: flush reads it before the next copy
            self._host_buf = torch.empty(2, pin_memory=both.is_cuda)
        self._host_buf.copy_(both, non_blocking=both.is_cuda)
        done = None
        if both.is_cuda:
            done = torch.cuda.Event()
            done.record()
        self._pending = (step, self._host_buf, done)

    def flush(self) -> None:
        """Act on a verdict still in flight (deferred mode; otherwise nothing is): raises NonFiniteError
        naming the bad step. Called at every step boundary, before a save and when the loop ends. Must be
        called on all ranks (the verdict is the same on every rank)."""
        if self._pending is None:
            return
        step, host, done = self._pending
        self._pending = None
        if done is not None:
            done.synchronize()  # at a step boundary the copy finished long ago: no wait in practice
        value, bad = host.tolist()
        self.flag.raised = self.flag.raised or bool(bad)
        if math.isfinite(value):
            self.consecutive = 0
            return
        self.act(step, *self.judge())

    def judge(self) -> tuple[str, str]:
        """A bad step, the same on every rank: exchange the flags now (blocking; rare) to learn whether
        some rank's loss was non-finite or only the gradient, and count it. Returns (quantity, action:
        "skip" or "stop"). Must be called on all ranks."""
        self.agreement.settle()
        return self._count()

    def late_verdict(self) -> tuple[str, str] | None:
        """fp16: at a step boundary, after the poll: a non-finite loss some rank reported in the latest
        exchange (the scaler already skipped that step on every rank), as (quantity, action); None when
        there is nothing new. A clean exchange ends a run of skips. Must be called on all ranks."""
        if self.watch_grad or not self.on or self.agreement.exchanges == self._exchanges:
            return None
        self._exchanges = self.agreement.exchanges
        if not self.flag.agreed:
            self.consecutive = 0
            return None
        return self._count()

    def _count(self) -> tuple[str, str]:
        quantity = "loss" if self.flag.agreed else "gradient norm"
        self.flag.agreed = False
        self.consecutive += 1
        self.skipped += 1
        stop = self.mode == "stop" or self.consecutive > self.max_skips
        return quantity, "stop" if stop else "skip"

    def describe(self, step: int, quantity: str, action: str) -> str:
        """The one line a user reads."""
        if action == "skip":
            return f"non-finite {quantity} at step {step}: update skipped ({self.consecutive} in a row, {self.skipped} in all)"
        why = (
            f"more than trainer.max_skips={self.max_skips} steps in a row"
            if self.mode == "skip"
            else "trainer.nonfinite=stop"
        )
        return (
            f"non-finite {quantity} at step {step} ({why}): stopped without saving; the checkpoints already "
            "committed are intact. Lower optim.lr, check the data, or set trainer.nonfinite=skip"
        )

    def act(self, step: int, quantity: str, action: str) -> None:
        """Record a non-finite step every rank agreed on: a `nonfinite` event and a line on stderr; on
        "stop", end the run (raises NonFiniteError on every rank). Must be called on all ranks."""
        message = self.describe(step, quantity, action)
        if action == "stop":
            self._fail(NonFiniteError(step, quantity, message))
        self.events.emit(ev.NONFINITE, step=step, quantity=quantity, action=action, skipped=self.skipped)
        self.files.warn(f"disttrain: {message}")

    def late_check(self, step: int) -> None:
        """fp16: a non-finite loss the latest exchange reported, acted on at this step boundary. Must be
        called on all ranks, after the agreement's poll."""
        late = self.late_verdict()
        if late is not None:
            self.act(step, *late)

    def check_weights(self, module: torch.nn.Module, step: int) -> None:
        """Refuse to save weights that are not finite: NonFiniteError on every rank, nothing written. Must
        be called on all ranks (one tiny all-reduce, so that sharded parameters, checked shard by shard,
        give every rank the same answer). A verdict still in flight is acted on first, so the error names
        the step that went bad rather than the parameters it poisoned."""
        self.flush()
        bad = _first_bad(module)
        if dist.any_flag(bad is not None):
            where = bad or "a parameter shard on another rank"
            self._fail(NonFiniteError(
                step,
                "parameters",
                f"non-finite parameters at step {step} ({where}): checkpoint not written; the checkpoints "
                "already committed are intact. Lower optim.lr, or keep trainer.nonfinite=stop to catch it at "
                "the step",
            ))  # fmt: skip

    def _fail(self, err: NonFiniteError) -> None:
        """Every rank at the same point: nothing left in flight, the event, then the error (exit 1)."""
        self.agreement.drain()
        self.settle()  # a save of an earlier, finite step still being written is committed first
        self.events.emit(ev.NONFINITE, step=err.step, quantity=err.quantity, action="stop", error=str(err))
        raise err

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive, self.skipped = int(state["consecutive"]), int(state["skipped"])


# -------------------------------------------------------------------------------- at save time


def _first_bad(module: torch.nn.Module) -> str | None:
    """The name of the first parameter that is not finite or buffer holding NaN; None if all are fine.
    aminmax reads each tensor once without a temporary the size of the tensor (torch.isfinite makes
    one: 7x slower here), and is exact: NaN propagates into the extremes, an Inf is one. One device
    read for the common case (all fine); names are looked for only when something is wrong."""
    params = [(n, _local(p)) for n, p in module.named_parameters()]
    buffers = [(n, _local(b)) for n, b in module.named_buffers() if b.is_floating_point()]
    ok: Callable[[torch.Tensor], torch.Tensor] = torch.isfinite
    checks = [(n, torch.stack(torch.aminmax(t)), ok) for n, t in params if t.numel()]
    checks += [(n, torch.stack(torch.aminmax(t)), _not_nan) for n, t in buffers if t.numel()]
    flags = [check(extremes).all() for _, extremes, check in checks]
    if not flags or bool(torch.stack(flags).all()):
        return None
    return next(name for (name, _, _), fine in zip(checks, _bools(flags)) if not fine)


def _not_nan(t: torch.Tensor) -> torch.Tensor:
    return ~torch.isnan(t)


def _bools(flags: Iterable[torch.Tensor]) -> list[bool]:
    return [bool(f) for f in flags]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) parameter's local shard; any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t.detach()
