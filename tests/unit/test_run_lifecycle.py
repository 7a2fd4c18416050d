"""The run lifecycle as users met it (issue 12's bugs): each test failed before its fix."""

from __future__ import annotations

import json
import os

import pytest
import torch

from disttrain.cluster import ClusterEnv
from disttrain.config import load_config
from disttrain.run import apply_determinism, apply_threads, preflight
from tests.conftest import FAST, REPO, child_env, read_jsonl, run_main
from tests.unit.test_main import assert_refused

SHORT = ("trainer.eval_every=0", "trainer.log_every=1", *FAST)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A finished 8-step digits run with checkpoints at steps 4 and 8."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    proc = run_main(f"run_dir={run_dir}", "trainer.max_steps=8", "checkpoint.every_steps=4", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def without(tmp_path, *modules: str) -> dict[str, str]:
    """A child environment in which `modules` are not installed (import fails, find_spec finds nothing)."""
    site = tmp_path / "site_without"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    )
    env = child_env()
    env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
    return env


def slurm_task_env(restart_count: int) -> dict[str, str]:
    return child_env(SLURM_JOB_ID="77", SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0",
                     SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1",
                     SLURM_RESTART_COUNT=str(restart_count))  # fmt: skip


def test_restart_before_the_first_commit_resumes_from_the_given_checkpoint(tmp_path, source_run):
    """The first attempt (resume=PATH) was killed while writing its first checkpoint: only a `.tmp-` dir
    is there. The restarted attempt must continue from PATH, not train from scratch."""
    start = source_run / "checkpoints" / "step_00000004"
    run_dir = tmp_path / "run"
    torn = run_dir / "checkpoints" / "step_00000006.tmp-1a2b"
    torn.mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"partial")
    cfg = load_config(None, [f"run_dir={run_dir}", f"resume={start}"])
    preflight(cfg, 1, restart_count=1)
    assert cfg.resume == str(start)

    proc = run_main(
        f"run_dir={run_dir}", f"resume={start}", "trainer.max_steps=6", *SHORT, env=slurm_task_env(1)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 4" in proc.stdout
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r] == [5, 6]


def test_restart_after_a_commit_continues_from_the_runs_own_checkpoint(tmp_path, source_run):
    cfg = load_config(None, [f"run_dir={source_run}", "resume=never"])
    preflight(cfg, 1, restart_count=1, test=False)
    assert cfg.resume == "auto"


def test_batch_larger_than_the_train_split_is_bad_input(tmp_path):
    run_dir = tmp_path / "run"
    assert_refused(
        run_main(f"run_dir={run_dir}", "data.batch_size=5000", *FAST), "data.batch_size", "at most"
    )
    assert not run_dir.exists()


def test_test_without_a_checkpoint_is_refused_unless_asked(tmp_path):
    run_dir = tmp_path / "run"
    assert_refused(run_main(f"run_dir={run_dir}", "--test", *FAST), "no committed checkpoint", "resume=never")
    assert not run_dir.exists()
    proc = run_main(f"run_dir={run_dir}", "--test", "resume=never", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((run_dir / "test_metrics.json").read_text())
    assert record["step"] == 0 and record["test/accuracy"] < 0.5  # the untrained initialisation, as asked
    assert "test/accuracy" in proc.stdout  # --test prints what it measured


def test_resume_from_a_path_applies_the_compatibility_check(tmp_path, source_run):
    step8 = source_run / "checkpoints" / "step_00000008"
    proc = run_main(f"run_dir={tmp_path / 'run'}", f"resume={step8}", "seed=5", "trainer.max_steps=10", *FAST)
    assert_refused(proc, "seed: 0 -> 5", "init_from=PATH")
    assert not (tmp_path / "run").exists()


def test_init_from_starts_a_new_run_from_the_weights_only(tmp_path, source_run):
    fresh, tuned = tmp_path / "fresh", tmp_path / "tuned"
    assert run_main(f"run_dir={fresh}", "seed=5", "trainer.max_steps=2", *SHORT).returncode == 0
    proc = run_main(f"run_dir={tuned}", f"init_from={source_run}", "seed=5", "trainer.max_steps=2", *SHORT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised the weights from" in proc.stdout and "resumed" not in proc.stdout
    rows = [r for r in read_jsonl(tuned / "metrics.jsonl") if "train/loss" in r]
    first_fresh = read_jsonl(fresh / "metrics.jsonl")[0]
    assert [r["step"] for r in rows] == [1, 2]  # from step 0 again, on a new schedule
    assert rows[0]["train/lr"] == first_fresh["train/lr"]
    # The weights are the source's exactly: evaluating them gives the source's own test metrics.
    assert run_main(f"run_dir={source_run}", "--test", *FAST).returncode == 0
    probe = tmp_path / "probe"
    assert (
        run_main(f"run_dir={probe}", "--test", "resume=never", f"init_from={source_run}", *FAST).returncode
        == 0
    )
    source_metrics = json.loads((source_run / "test_metrics.json").read_text())
    assert json.loads((probe / "test_metrics.json").read_text()) == {**source_metrics, "step": 0}


def test_a_model_that_no_longer_fits_its_checkpoint_is_bad_input(tmp_path):
    run_dir = tmp_path / "run"
    args = (
        f"run_dir={run_dir}",
        "pipeline.target=tests.pipelines:EnvWidthDigits",
        "trainer.max_steps=2",
        *SHORT,
    )
    assert run_main(*args).returncode == 0
    env = child_env(TEST_MODEL_WIDTH="48")  # the model code changed, the config did not
    proc = run_main(*args[:2], "trainer.max_steps=4", *SHORT, env=env)
    line = assert_refused(proc, "conv1.weight", "(16, 1, 3, 3) there but (24, 1, 3, 3) now", "new run_dir")
    assert "size mismatch" not in line
    assert json.loads((run_dir / "checkpoints" / "step_00000002" / "manifest.json").read_text())["step"] == 2


def test_writers_that_are_not_installed_are_refused_before_anything_is_made(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_main(f"run_dir={run_dir}", "log.tensorboard=true", *FAST, env=without(tmp_path, "tensorboard"))
    assert_refused(proc, "log.tensorboard=true but tensorboard is not installed", "disttrain[tensorboard]")
    assert not run_dir.exists()


def test_submit_dry_run_refuses_a_writer_the_job_could_not_start(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(REPO / "launch/submit.py"), "--dry-run", f"run_dir={tmp_path / 'run'}", "log.wandb=true"],
        capture_output=True, text=True, env=without(tmp_path, "wandb"), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "log.wandb=true but wandb is not installed" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, source_run):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "disttrain", "plot", str(source_run), "--out", str(tmp_path / "c.png")],
                          capture_output=True, text=True, env=without(tmp_path, "matplotlib"), timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "pip install" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_thread_count_is_recorded_and_a_change_on_resume_is_said(tmp_path):
    run_dir = tmp_path / "run"
    args = (f"run_dir={run_dir}", "checkpoint.every_steps=2", *SHORT)
    assert run_main(*args, "trainer.max_steps=2", env=child_env(OMP_NUM_THREADS="1")).returncode == 0
    manifest = json.loads((run_dir / "checkpoints" / "step_00000002" / "manifest.json").read_text())
    assert manifest["num_threads"] == 1
    same = run_main(*args, "trainer.max_steps=3", env=child_env(OMP_NUM_THREADS="1"))
    assert same.returncode == 0 and "bit-identical" not in same.stdout
    proc = run_main(*args, "trainer.max_steps=4", "trainer.threads=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = [line for line in proc.stdout.splitlines() if "no longer bit-identical" in line]
    assert len(notes) == 1 and "2 intra-op thread(s)" in notes[0] and "with 1" in notes[0], proc.stdout


def test_deterministic_pins_the_kernels_before_cuda_starts(monkeypatch):
    """trainer.deterministic: torch refuses nondeterministic kernels, and cuBLAS gets the fixed workspace
    it needs for that (read when its handle is made, so it must be set before any CUDA call)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    apply_determinism(load_config(None, []))
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    try:
        apply_determinism(load_config(None, ["trainer.deterministic=true"]))
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_slurm_task_computes_with_its_cpus_per_task(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    try:
        cfg = load_config(None, [])
        apply_threads(cfg, ClusterEnv(launcher="slurm"))
        assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"
        apply_threads(load_config(None, ["trainer.threads=2"]), ClusterEnv(launcher="slurm"))
        assert torch.get_num_threads() == 2  # the config overrides what SLURM gave
        monkeypatch.delenv("SLURM_CPUS_PER_TASK")
        monkeypatch.delenv("OMP_NUM_THREADS")
        apply_threads(cfg, ClusterEnv(launcher="slurm"))
        assert torch.get_num_threads() == 1  # a task SLURM gave no --cpus-per-task has one CPU
    finally:
        torch.set_num_threads(before)


def test_constraints_pin_everything_the_dev_install_needs():
    """The Quick start's install must resolve in bounded time on a fresh machine: every distribution
    `disttrain[dev]` needs, transitively, is pinned with == in constraints.txt."""
    import re
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    pinned = {
        _norm(line.partition("==")[0])
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    todo, seen = [("disttrain", frozenset({"dev"}))], set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            if _norm(req.name) != "disttrain":
                assert _norm(req.name) in pinned, (
                    f"{req.name} (needed by {name}) is not pinned in constraints.txt"
                )
            todo.append((req.name, frozenset(req.extras)))
    assert len(seen) > 50 and re.search(r"^torch==2\.13\.0$", (REPO / "constraints.txt").read_text(), re.M)


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")
