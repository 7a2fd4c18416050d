"""The training features on a real one-process trainer (no process group): the non-finite guard's
counting and the save-time check, the requeue that must not happen, EMA, early stopping, activation
checkpointing, compiled names, config hooks, parameter groups, and the metrics people steer by."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from disttrain.cluster import ClusterEnv, detect
from disttrain.commands import ckpt as ckpt_cmd
from disttrain.commands.run_status import collect
from disttrain.config import load_config
from disttrain.data import epoch_order
from disttrain.errors import ConfigError
from disttrain.features.guard import NonFiniteError, _first_bad
from disttrain.features.metrics import peak_for
from disttrain.features.progress import postfix
from disttrain.hooks import Hook
from disttrain.parallel import strip_compiled_names
from disttrain.pipelines.digits import DigitsPipeline
from disttrain.process import StopSignal
from disttrain.run import Outcome, execute, preflight
from disttrain.slurm import RequeuePolicy
from disttrain.trainer import Trainer, build_trainer
from tests.conftest import REPO, read_jsonl

QUIET = ["trainer.progress=none", "log.console=false", "log.plot=false", "trainer.eval_every=0"]
GPT_CONFIG = str(REPO / "configs" / "tiny_gpt.yaml")
SMALL_GPT = ["scheduler.warmup_steps=0", "pipeline.args.n_layer=2", "pipeline.args.d_model=32", "pipeline.args.n_head=2",
             "pipeline.args.block_size=16", "data.batch_size=8"]  # fmt: skip


def config(run_dir, *overrides: str, path: str | None = None):
    return load_config(path, [f"run_dir={run_dir}", *QUIET, *overrides])


def build(run_dir, *overrides: str, path: str | None = None, hooks=None) -> Trainer:
    return build_trainer(config(run_dir, *overrides, path=path), detect({}), hooks=hooks)


def events(run_dir) -> list[dict]:
    return read_jsonl(run_dir / "events.jsonl")


# ------------------------------------------------------------------------------------ the guard


def poisoned(*steps: int) -> str:
    """PoisonDigits args that make the loss NaN at these optimizer steps of a one-rank run."""
    order = epoch_order(1259, 0, 0, True)
    return f"pipeline.args.poison=[{','.join(str(int(order[(s - 1) * 64])) for s in steps)}]"


def test_skips_stop_after_max_skips_in_a_row_and_the_run_is_failed(tmp_path):
    run_dir = tmp_path / "run"
    trainer = build(run_dir, "pipeline.target=tests.pipelines:PoisonDigits", poisoned(2, 4, 5, 6),
                    "trainer.nonfinite=skip", "trainer.max_skips=2", "trainer.max_steps=10")  # fmt: skip
    with pytest.raises(NonFiniteError, match="non-finite loss at step 6 .more than trainer.max_skips=2"):
        trainer.fit()
    trainer.close()
    found = [(e["step"], e["action"]) for e in events(run_dir) if e["event"] == "nonfinite"]
    assert found == [(2, "skip"), (4, "skip"), (5, "skip"), (6, "stop")], (
        "step 3 ended the first run of skips"
    )
    assert collect(str(run_dir))["state"] == "failed"


@pytest.mark.parametrize(
    "bad, steps, every, saved", [(3, 10, 0, []), (3, 10, 1, [1, 2]), (4, 4, 0, []), (4, 8, 0, [])]
)
def test_a_verdict_read_a_step_late_still_stops_at_the_bad_step_and_saves_nothing_after(
    tmp_path, bad, steps, every, saved
):
    """The GPU stop-mode path (the verdict copied off the device and read at the next boundary), run
    here on the CPU: the error names the step whose loss went NaN whether the next thing is another
    step, a save (every step) or the end of the loop, and no checkpoint holds that step or a later one."""
    run_dir = tmp_path / "run"
    trainer = build(run_dir, "pipeline.target=tests.pipelines:PoisonDigits", poisoned(bad), "trainer.eval_every=4",
                    f"trainer.max_steps={steps}", f"checkpoint.every_steps={every}")  # fmt: skip
    assert not trainer.guard.defer, "on the CPU the verdict costs nothing and is read at the step"
    trainer.guard.defer = True
    with pytest.raises(NonFiniteError, match=f"non-finite loss at step {bad} .trainer.nonfinite=stop"):
        trainer.fit()
    trainer.close()
    found = [(e["step"], e["action"]) for e in events(run_dir) if e["event"] == "nonfinite"]
    assert found == [(bad, "stop")]
    assert [e["step"] for e in events(run_dir) if e["event"] == "checkpoint"] == saved
    assert not [e for e in events(run_dir) if e["event"] == "eval" and e["step"] >= bad], "judged NaN weights"
    assert collect(str(run_dir))["state"] == "failed"


def test_a_stop_signal_and_a_nonfinite_loss_together_are_not_requeued(tmp_path):
    """SLURM's time-limit warning arrived, and then the loss went NaN: a failure, never a requeue (the
    signal alone would requeue: tests/unit/test_preemption.py)."""
    run_dir = tmp_path / "run"
    cfg = config(run_dir, "pipeline.target=tests.pipelines:PoisonDigits", poisoned(1), "trainer.max_steps=10")
    stop = StopSignal(())
    stop.received.append("SIGUSR2")  # what the handler records
    threads = torch.get_num_threads()
    try:  # the step whose loss is NaN is the one whose exchange also carries the signal
        result = execute(
            cfg, ClusterEnv(launcher="slurm", job_id="77"), stop, policy=RequeuePolicy(max_requeues=5)
        )
    finally:
        torch.set_num_threads(threads)
    assert result.outcome is Outcome.FAILED and result.exit_code() == 1 and result.step == 1
    assert not [e for e in events(run_dir) if e["event"] in ("requeue", "requeue_refused", "stopped")]


def test_a_save_of_weights_that_are_not_finite_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    trainer = build(run_dir, "trainer.nonfinite=off", "trainer.max_steps=2", "checkpoint.every_steps=0",
                    "checkpoint.save_final=false")  # fmt: skip
    trainer.fit()
    with torch.no_grad():
        trainer.module.fc2.bias[3] = math.inf
    with pytest.raises(NonFiniteError, match=r"non-finite parameters at step 2 \(fc2.bias\)"):
        trainer.save_checkpoint()
    trainer.close()
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").iterdir())
    assert events(run_dir)[-1]["event"] == "nonfinite" and events(run_dir)[-1]["quantity"] == "parameters"


def test_a_buffer_may_hold_minus_inf_but_not_nan():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model.register_buffer("mask", torch.full((2, 2), -math.inf).triu(1))
    assert _first_bad(model) is None
    model[1].running_mean[0] = math.nan
    assert _first_bad(model) == "1.running_mean"


# ------------------------------------------------------------------------------ early stopping


def test_early_stop_ends_as_finished_with_its_reason_and_a_restarted_job_does_nothing(tmp_path):
    run_dir = tmp_path / "run"
    args = ("trainer.max_steps=40", "trainer.eval_every=4", "early_stop.metric=eval/accuracy", "early_stop.mode=max",
            "early_stop.patience=2", "early_stop.min_delta=1.0")  # fmt: skip
    trainer = build(run_dir, *args)
    fit = trainer.fit()
    trainer.close()
    assert (fit.outcome, fit.step) == ("finished", 12) and "did not improve" in fit.reason
    finish = events(run_dir)[-1]
    assert (
        finish["event"] == "finish"
        and "eval/accuracy did not improve by more than 1 for 2 evals" in finish["reason"]
    )
    assert "early stop" in collect(str(run_dir))["detail"]
    again = build(run_dir, *args)  # the job comes back (requeue, resubmission): nothing to do
    assert again.fit().outcome == "already_done" and again.step == 12
    again.close()


def test_a_nan_eval_metric_is_said_recorded_and_not_taken_for_a_result(tmp_path, capsys):
    run_dir = tmp_path / "run"
    trainer = build(run_dir, "pipeline.target=tests.pipelines:NanEvalDigits", "trainer.max_steps=12",
                    "trainer.eval_every=2", "early_stop.metric=eval/loss", "early_stop.patience=2")  # fmt: skip
    fit = trainer.fit()
    trainer.close()
    assert (fit.outcome, fit.step, fit.reason) == ("finished", 12, ""), "no early stop on NaN evals"
    evals = [e for e in events(run_dir) if e["event"] == "eval"]
    assert len(evals) == 6 and all(e["nonfinite"] == ["eval/loss"] for e in evals)
    assert "eval/loss not finite at step 2" in capsys.readouterr().err


def test_a_run_that_skipped_most_steps_says_so_when_it_finishes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    trainer = build(run_dir, "pipeline.target=tests.pipelines:PoisonDigits", poisoned(*range(1, 9)),
                    "trainer.nonfinite=skip", "trainer.max_skips=100", "trainer.max_steps=10")  # fmt: skip
    assert trainer.fit().outcome == "finished"
    trainer.close()
    assert events(run_dir)[-1] == {**events(run_dir)[-1], "event": "finish", "skipped": 8}
    err = capsys.readouterr().err
    assert "8 of 10 steps (80%) were skipped as non-finite" in err and "BARELY TRAINED" in err


def test_early_stop_needs_an_eval_metric_and_evals(tmp_path):
    with pytest.raises(ConfigError, match="must be an eval metric"):
        config(tmp_path, "early_stop.metric=train/loss")
    with pytest.raises(ConfigError, match="trainer.eval_every=0 evaluates only at the end"):
        config(tmp_path, "early_stop.metric=eval/loss")


# ------------------------------------------------------------------------------------------ EMA


class Trajectory(Hook):
    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []

    def after_step(self, trainer) -> None:
        self.params.append({n: p.detach().clone() for n, p in trainer.module.named_parameters()})


def test_ema_is_the_average_eval_uses_it_and_export_writes_it(tmp_path):
    run_dir = tmp_path / "run"
    seen = Trajectory()
    trainer = build(run_dir, "trainer.max_steps=5", "ema.decay=0.8", "ema.warmup_steps=2", "ema.eval=true",
                    "checkpoint.every_steps=0", hooks=[seen])  # fmt: skip
    start = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
    trainer.fit()
    expected = dict(start)
    for i, params in enumerate(seen.params):  # decay 0, 0.4, then 0.8 (warm-up over 2 updates)
        decay = 0.8 * min(1.0, i / 2)
        expected = {n: decay * expected[n] + (1 - decay) * params[n] for n in expected}
    ema = trainer.evaluator.ema
    shadow = dict(zip(ema.names, ema.shadow))
    assert all(torch.allclose(shadow[n], expected[n], atol=1e-6) for n in expected)
    assert not torch.equal(shadow["fc2.weight"], trainer.module.fc2.weight)

    with_ema = trainer.evaluator.evaluate("eval")
    out = tmp_path / "ema.safetensors"
    assert ckpt_cmd.main(["export", str(run_dir), "--ema", "--out", str(out)]) == 0
    from safetensors.torch import load_file

    exported = load_file(out)
    assert all(torch.equal(exported[n], shadow[n]) for n in shadow)
    trainer.evaluator.spec = dataclasses.replace(trainer.evaluator.spec, use_ema=False)
    trained = trainer.evaluator.evaluate("eval")
    trainer.module.load_state_dict(exported)
    assert trainer.evaluator.evaluate("eval") == with_ema != trained, (
        "eval with ema.eval evaluates the EMA weights"
    )
    trainer.close()
    assert ckpt_cmd.main(["export", str(_plain_run(tmp_path)), "--ema", "--out", str(out)]) == 2


def _plain_run(tmp_path):
    run_dir = tmp_path / "plain"
    trainer = build(run_dir, "trainer.max_steps=1")
    trainer.fit()
    trainer.close()
    return run_dir


# --------------------------------------------------------------- activation checkpointing, compile


def test_activation_checkpointing_recomputes_the_blocks_and_changes_no_number(tmp_path):
    weights, calls = [], []
    for on in (False, True):
        args = (
            *SMALL_GPT,
            "pipeline.args.dropout=0.1",
            "trainer.max_steps=3",
            f"trainer.activation_checkpointing={on}",
        )
        trainer = build(tmp_path / f"ac_{on}", *args, path=GPT_CONFIG)
        count: list[int] = []
        for block in trainer.module.blocks:  # a layer inside the block: recomputation calls it again
            block.ln1.register_forward_pre_hook(lambda m, _, seen=count: seen.append(m.training))
        trainer.fit()
        weights.append({k: v.clone() for k, v in trainer.module.state_dict().items()})
        calls.append(sum(count))
        trainer.close()
    assert calls == [2 * 3, 2 * 2 * 3], "each block's forward runs again in backward"
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "dropout replays the same mask"


def test_activation_checkpointing_needs_the_pipelines_blocks(tmp_path):
    with pytest.raises(ConfigError, match="does not say which modules are its blocks"):
        preflight(config(tmp_path / "run", "trainer.activation_checkpointing=true"), 1)


class CompiledDigits(DigitsPipeline):
    """A pipeline that compiles its own model (what users did before trainer.compile existed)."""

    def build_model(self):
        return torch.compile(super().build_model(), backend="aot_eager")


def test_a_model_compiled_inside_the_pipeline_is_saved_under_its_own_names(tmp_path):
    run_dir = tmp_path / "run"
    args = ("pipeline.target=tests.unit.test_features:CompiledDigits", "checkpoint.every_steps=2")
    trainer = build(run_dir, *args, "trainer.max_steps=2")
    trainer.fit()
    trainer.close()
    from safetensors.torch import load_file

    saved = load_file(run_dir / "checkpoints" / "step_00000002" / "model.safetensors")
    assert saved and not any("_orig_mod" in k for k in saved), sorted(saved)
    resumed = build(run_dir, *args, "trainer.max_steps=3")
    assert resumed.step == 2 and resumed.fit().step == 3
    resumed.close()
    assert strip_compiled_names({"_orig_mod.fc.weight": 1}) == {"fc.weight": 1}, (
        "older checkpoints still load"
    )


# -------------------------------------------------------------------- hooks from config, optimizer


class Counter(Hook):
    """A config hook with an argument and state."""

    def __init__(self, every: int = 1):
        self.every, self.count = every, 0

    def after_step(self, trainer) -> None:
        self.count += trainer.step % self.every == 0

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state) -> None:
        self.count = state["count"]


class Marker(Hook):
    """A config hook without arguments, named by its path alone."""

    def before_train(self, trainer) -> None:
        trainer.say("marker hook ran")


def test_config_hooks_run_after_log_and_eval_before_the_checkpoint_and_resume_exactly(tmp_path, capsys):
    run_dir = tmp_path / "run"
    spec = "hooks=[{target: tests.unit.test_features:Counter, args: {every: 2}}, tests.unit.test_features:Marker]"
    trainer = build(run_dir, spec, "trainer.max_steps=4", "checkpoint.every_steps=4")
    names = [type(h).__name__ for h in trainer.hooks]
    assert names[-5:] == ["EvalHook", "Counter", "Marker", "CheckpointHook", "StopHook"], names
    trainer.fit()
    counter = trainer.hooks[-4]
    assert counter.count == 2 and "marker hook ran" in capsys.readouterr().out
    trainer.close()
    again = build(run_dir, spec, "trainer.max_steps=6")
    assert again.hooks[-4].count == 2, "restored from the checkpoint of step 4, which its step-4 count is in"
    again.close()
    with pytest.raises(
        ConfigError, match=r"hooks\[0\].args.evry: Counter has no argument 'evry'; did you mean"
    ):
        preflight(config(run_dir, "hooks=[{target: tests.unit.test_features:Counter, args: {evry: 2}}]"), 1)
    with pytest.raises(ConfigError, match=r"hooks\[0\].target: cannot import 'nosuch'"):
        preflight(config(run_dir, "hooks=[nosuch:Hook]"), 1)


class GroupedDigits(DigitsPipeline):
    def param_groups(self, model):
        head = list(model.fc2.parameters())
        rest = [p for p in model.parameters() if all(p is not h for h in head)]
        return [{"params": rest}, {"params": head, "lr": 3e-4, "weight_decay": 0.0}]


class SgdDigits(DigitsPipeline):
    def build_optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.05)


def test_the_pipeline_can_give_parameter_groups_or_its_own_optimizer(tmp_path):
    trainer = build(tmp_path / "a", "pipeline.target=tests.unit.test_features:GroupedDigits", "optim.weight_decay=0.1",
                    "scheduler.name=constant", "trainer.max_steps=2")  # fmt: skip
    trainer.fit()
    groups = trainer.strategy.optimizer.param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(3e-3, 0.1), (3e-4, 0.0)]
    trainer.close()
    own = build(tmp_path / "b", "pipeline.target=tests.unit.test_features:SgdDigits", "trainer.max_steps=2")
    assert isinstance(own.strategy.optimizer, torch.optim.SGD) and own.fit().step == 2
    own.close()


# ------------------------------------------------------------------------------------- metrics


def test_the_metrics_people_steer_by(tmp_path):
    rows = {}
    for clip in (1.0, 0.0):  # without clipping (and the guard off) the norm is measured on log steps only
        run_dir = tmp_path / f"clip_{clip}"
        trainer = build(run_dir, *SMALL_GPT, "trainer.max_steps=2", "trainer.log_every=1", f"trainer.grad_clip={clip}",
                        *(["trainer.nonfinite=off"] if not clip else []), path=GPT_CONFIG)  # fmt: skip
        trainer.fit()
        trainer.close()
        rows[clip] = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    first = rows[1.0][0]
    assert first["train/tokens_per_sec"] == pytest.approx(first["train/samples_per_sec"] * 16, rel=1e-9)
    assert first["train/grad_norm"] > 0 and first["train/max_mem_mb"] > 100
    assert rows[0.0][0]["train/grad_norm"] == first["train/grad_norm"], "the norm before clipping, same data"
    assert "train/mfu" not in first, "no known peak on a CPU"
    assert postfix(first)["tok/s"] and "mfu" not in postfix(first)


def test_the_peak_table_knows_current_data_centre_gpus():
    assert peak_for("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_for("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_for("NVIDIA H200", "tf32") == 494.5e12
    assert peak_for("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert peak_for("NVIDIA GeForce RTX 4090", "bf16") is None
