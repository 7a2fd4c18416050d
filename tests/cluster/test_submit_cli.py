"""`launch/submit.py` as a user meets it: instant --help, bad input refused before anything is submitted
or created, --profile under CLI flags, and a --dry-run script that SLURM itself accepts."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from launch_support import SUBMIT, job_env, run_submit

from tests.conftest import REPO

PROBE = ("pipeline.target=tests.pipelines:ProbeDigits",)


def test_help_is_instant_and_imports_no_torch():
    code = (
        "import runpy, sys; sys.argv = ['submit.py', '--help']\n"
        f"try: runpy.run_path({SUBMIT!r}, run_name='__main__')\n"
        "except SystemExit as e: assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'submitit', 'accelerate', 'disttrain.trainer') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "--gpus-per-node" in proc.stdout and "--max-requeues" in proc.stdout
    assert time.monotonic() - t0 < 2.0, "--help must not wait for heavy imports"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--nodes", "0"], "--nodes: 0 must be an integer >= 1"),
        (["--nodes", "two"], "argument --nodes: invalid int value"),
        (["--time", "1:2:3:4"], "--time '1:2:3:4'"),
        (["--time", "1", "--signal-delay", "90"], "--signal-delay 90s is not shorter than --time 1"),
        (["--mem", "lots"], "--mem 'lots'"),
        (["--cluster", "k8s"], "invalid choice: 'k8s'"),
        (["--cluster", "local", "--nodes", "2"], "--nodes must be 1"),
        (["--gpus-per-node", "8", "--tasks-per-node", "2"], "one task per GPU"),
        (["--in-job-restarts", "-1"], "--in-job-restarts: -1 must be an integer >= 0"),
        (["--cluster", "local", "--in-job-restarts", "2"], "--in-job-restarts needs --cluster slurm"),
        (["--nodes", "2", "--spare-nodes", "1"], "--spare-nodes 1 needs --in-job-restarts N"),
        (["--spare-nodes", "-1"], "--spare-nodes: -1 must be an integer >= 0"),
        (["--leave-out-after", "0"], "--leave-out-after 0 applies to the agents of --in-job-restarts"),
        (
            ["--rendezvous-timeout", "60"],
            "--rendezvous-timeout 60 applies to the agents of --in-job-restarts",
        ),
        (
            ["--in-job-restarts", "2", "--rendezvous-timeout", "5"],
            "--rendezvous-timeout: 5 must be an integer >= 10",
        ),
        (["--profile", "nosuch.yaml"], "--profile 'nosuch.yaml' not found"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["trainer.max_stepz=5"], "did you mean trainer.max_steps?"),
        (["--nodes", "2", "data.batch_size=63"], "data.batch_size: 63 does not divide into 2 rank(s)"),
        (["pipeline.target=nosuch.mod:Pipe"], "cannot import module 'nosuch.mod'"),
        (["--config", "missing.yaml"], "'missing.yaml' not found"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_creates_nothing(tmp_path, args, needle):
    run_dir = tmp_path / "run"
    proc = run_submit(None, *args, f"run_dir={run_dir}", env=job_env(None, SLURM_CONF="/nonexistent"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("disttrain submit: error: "), proc.stderr
    assert needle in lines[0]
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []


def test_profile_settings_apply_and_flags_win(tmp_path):
    profile = tmp_path / "slurm_team.yaml"
    profile.write_text("partition: high\naccount: physics\nqos: normal\ntime: '2:00:00'\ncpus-per-task: 2\n")
    proc = run_submit(
        None, "--dry-run", "--profile", str(profile), "--partition", "low", "--nodes", "2",
        f"run_dir={tmp_path / 'run'}", *PROBE, env=job_env(None),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for line in (
        "--partition=low",
        "--account=physics",
        "--qos=normal",
        "--time=2:00:00",
        "--cpus-per-task=2",
    ):
        assert f"#SBATCH {line}\n" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_container_image_goes_to_srun(tmp_path):
    proc = run_submit(None, "--dry-run", "--container-image", "nvcr.io#nvidia/pytorch:24.05-py3",
                      f"run_dir={tmp_path / 'run'}", *PROBE, env=job_env(None))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    srun = next(line for line in proc.stdout.splitlines() if line.startswith("srun "))
    assert "--container-image=nvcr.io#nvidia/pytorch:24.05-py3" in srun


@pytest.mark.parametrize("profile", sorted(p.name for p in (REPO / "configs").glob("slurm_*.yaml")))
def test_shipped_profiles_are_valid(tmp_path, profile):
    proc = run_submit(None, "--dry-run", "--profile", f"configs/{profile}", f"run_dir={tmp_path / 'run'}", *PROBE,
                      env=job_env(None))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --partition=" in proc.stdout


def test_profile_with_an_unknown_key_is_refused(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("partiton: gpu\n")
    proc = run_submit(None, "--profile", str(profile), f"run_dir={tmp_path / 'run'}", env=job_env(None))
    assert proc.returncode == 2 and "unknown key 'partiton'; did you mean partition?" in proc.stderr


def test_a_config_with_redacted_secrets_is_refused(tmp_path):
    """RUN_DIR/config.yaml holds masked secrets: resubmitting it as is would hand the job the mask."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "pipeline:\n  target: cluster_pipelines:FailingProbe\n  args: {api_token: '***REDACTED***'}\n"
    )
    proc = run_submit(None, "--config", str(config), f"run_dir={tmp_path / 'run'}", env=job_env(None))
    assert proc.returncode == 2, proc.stderr
    assert "pipeline.args.api_token is '***REDACTED***': give the real value as an override" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_a_script_sbatch_accepts(slurm, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_submit(
        slurm, "--dry-run", "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "0:30:00",
        "--signal-delay", "120", "--partition", "low", "--job-name", "dry", f"run_dir={run_dir}", *PROBE,
        "pipeline.args.step_delay=0.5", "trainer.max_steps=7",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script, _, config = proc.stdout.partition("# resolved config")
    for line in (
        "--nodes=2",
        "--ntasks-per-node=1",
        "--signal=USR2@120",
        "--requeue",
        "--time=0:30:00",
        "--job-name=dry",
    ):
        assert f"#SBATCH {line}\n" in script
    assert "srun --unbuffered" in script and "submitit.core._submit" in script
    assert "max_steps: 7" in config and "step_delay: 0.5" in config and f"run_dir: {run_dir}" in config
    body = script[script.index("#!/bin/bash") :]
    message = slurm.sbatch_test_only(script=body)  # SLURM's own judgement; queues nothing
    assert "to start at" in message and "node[1-2]" in message, message
    assert slurm.run(["squeue", "-h"]).stdout.strip() == ""
    assert not run_dir.exists()


def test_in_job_restarts_asks_for_one_task_per_node_with_the_nodes_cpus(slurm, tmp_path):
    """--in-job-restarts: one task per node (its elastic agent spawns the node's ranks), holding the CPUs
    of all of them."""
    proc = run_submit(
        slurm, "--dry-run", "--nodes", "2", "--tasks-per-node", "4", "--cpus-per-task", "3", "--in-job-restarts", "2",
        f"run_dir={tmp_path / 'run'}", *PROBE, "data.batch_size=64",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout.partition("# resolved config")[0]
    assert "#SBATCH --ntasks-per-node=1\n" in script and "#SBATCH --cpus-per-task=12\n" in script, script
    assert "world size 8" in proc.stdout


def test_spare_nodes_are_allocated_beyond_the_training_nodes_and_a_node_failure_does_not_end_the_job(
    slurm, tmp_path
):
    """--spare-nodes K: the job holds --nodes + K nodes (each an agent; the rendezvous trains on --nodes
    of them), and neither the job nor its step is killed when a node fails; the world size stays."""
    proc = run_submit(
        slurm, "--dry-run", "--nodes", "1", "--spare-nodes", "1", "--in-job-restarts", "2",
        f"run_dir={tmp_path / 'run'}", *PROBE,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout.partition("# resolved config")[0]
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --no-kill\n" in script, script
    assert "srun --unbuffered" in script and "--no-kill" in script.split("srun --unbuffered", 1)[1], script
    assert "world size 1" in proc.stdout
    body = script[script.index("#!/bin/bash") :]
    message = slurm.sbatch_test_only(script=body)  # SLURM itself takes the options
    assert "to start at" in message, message


def test_a_partition_sbatch_refuses_exits_2_and_leaves_nothing(slurm, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_submit(slurm, "--partition", "nosuch", "--time", "5", f"run_dir={run_dir}", *PROBE)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Invalid partition name specified" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()
