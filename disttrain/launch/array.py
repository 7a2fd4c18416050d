"""`disttrain submit --sweep ...`: one SLURM job array, one task per combination of the sweep.

Every task is a complete disttrain run in its own run dir under the sweep dir (`run_dir` of the
submission): the same TrainJob as a single submission, so each task saves, requeues itself and resumes
exactly as a single run does. Its job id is `A_T` (array A, task T); cluster.slurm_job_id makes the
task requeue only itself. Every combination is validated (config, batch split, pipeline) before
anything is created or submitted; `--dry-run` prints the sbatch script and each task's overrides.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from disttrain import fs, sweepdir
from disttrain.config import Config, get_dotted, load_config, to_dict
from disttrain.errors import EXIT_OK, ConfigError
from disttrain.launch.options import SubmitOptions
from disttrain.launch.plan import check_config, first_missing, log_folder, not_submitted
from disttrain.launch.sweep import Task, expand, read_sweep_file
from disttrain.rundir import RunDir


@dataclass
class SweepPlan:
    """A validated sweep: options, the sweep dir, and every task with its resolved config."""

    opts: SubmitOptions
    sweep_dir: str
    folder: str  # submitit's files for the whole array
    job_name: str
    tasks: list[Task]
    configs: list[Config]


def prepare(opts: SubmitOptions) -> SweepPlan:
    """Expand the sweep and validate every task as a single submission would be. Raises ConfigError."""
    base = load_config(opts.config, opts.overrides)
    sweep_dir = base.run_dir if "://" in base.run_dir else os.path.abspath(base.run_dir)
    if fs.exists(RunDir(sweep_dir).events):
        raise ConfigError(
            f"run_dir {sweep_dir} holds a run (events.jsonl), not a sweep; give the sweep a new run_dir"
        )
    rows = read_sweep_file(opts.sweep_file) if opts.sweep_file else []
    tasks = expand(opts.sweep, rows, opts.overrides)
    configs = [_task_config(opts, base, sweep_dir, task) for task in tasks]
    _check_distinct(tasks, configs)
    folder = log_folder(opts, sweep_dir)
    name = opts.job_name or base.name or fs.basename(sweep_dir) or "disttrain-sweep"
    return SweepPlan(opts, sweep_dir, folder, name, tasks, configs)


def _task_config(opts: SubmitOptions, base: Config, sweep_dir: str, task: Task) -> Config:
    try:
        cfg = load_config(opts.config, [*opts.overrides, *task.overrides])
        cfg.run_dir = sweepdir.run_dir(sweep_dir, task.name)
        cfg.name = f"{base.name}/{task.name}" if base.name else ""
        check_config(cfg, opts.world_size)
    except ConfigError as err:
        raise ConfigError(f"sweep task {task.index} ({' '.join(task.overrides)}): {err}") from None
    return cfg


def _check_distinct(tasks: list[Task], configs: list[Config]) -> None:
    """Two tasks that resolve to one config would train the same run twice (`optim.lr=1e-3` in one
    sweep-file row and `optim.lr: 0.001` in another): refused, naming both."""
    seen: dict[str, Task] = {}
    for task, cfg in zip(tasks, configs):
        data = {k: v for k, v in to_dict(cfg, redact=False).items() if k not in ("run_dir", "name")}
        key = json.dumps(data, sort_keys=True, default=str)
        if key in seen:
            raise ConfigError(
                f"sweep tasks {seen[key].index} ({' '.join(seen[key].overrides)}) and {task.index} "
                f"({' '.join(task.overrides)}) resolve to the same config; give each combination once"
            )
        seen[key] = task


def resolved(plan: SweepPlan, index: int) -> str:
    """A task's swept keys with the values the config resolved them to: `optim.lr=0.001 seed=1`."""
    data = to_dict(plan.configs[index])
    keys = [item.partition("=")[0] for item in plan.tasks[index].overrides]
    return " ".join(f"{k}={json.dumps(get_dotted(data, k))}" for k in keys)


def print_dry_run(plan: SweepPlan) -> int:
    from disttrain.config import dump_yaml
    from disttrain.launch.executor import sbatch_script

    n = len(plan.tasks)
    print("# sbatch script (submitit writes it as <array job id>_submission.sh)")
    print(sbatch_script(plan.opts, plan.folder, plan.job_name, array_size=n))
    print(f"# sweep: {n} task(s) in {plan.sweep_dir}, {_parallelism(plan)}; each task's resolved overrides:")
    for task in plan.tasks:
        print(f"#   task {task.index:>3}  {task.name}/  {resolved(plan, task.index)}")
    print(f"# resolved config of task 0 (secrets redacted), world size {plan.opts.world_size}")
    print(dump_yaml(plan.configs[0]), end="")
    return EXIT_OK


def submit(plan: SweepPlan) -> int:
    from disttrain.launch.executor import make_executor
    from disttrain.launch.job import TrainJob, split_secrets
    from disttrain.secrets import secrets_in_environment

    o = plan.opts
    jobs: list[Any] = []
    secrets: list[str] = []
    for cfg in plan.configs:  # the secrets are not swept (sweep.py refuses), so every task's are the same
        config_yaml, secrets = split_secrets(cfg)
        jobs.append(TrainJob.of(o, config_yaml, cfg.run_dir))
    created = first_missing(plan.folder)
    try:
        executor = make_executor(o, plan.folder, plan.job_name, array_size=len(jobs))
        with secrets_in_environment(secrets), contextlib.redirect_stderr(io.StringIO()):
            submitted = executor.submit_array(jobs)
    except Exception as err:  # sbatch refused: say why, leave nothing behind
        return not_submitted(err, created)
    ids = [str(job.job_id) for job in submitted]
    array_id = ids[0].split("_")[0]
    records = [sweepdir.SweepTask(t.index, t.name, t.overrides, job_id) for t, job_id in zip(plan.tasks, ids)]
    sweepdir.write(plan.sweep_dir, records, job_id=array_id, job_name=plan.job_name,
                   array_parallelism=o.array_parallelism or len(ids))  # fmt: skip
    print_submitted(plan, array_id, ids)
    return EXIT_OK


def print_submitted(plan: SweepPlan, array_id: str, ids: list[str]) -> None:
    o = plan.opts
    ranks = (
        f"{o.gpus_per_node} GPU rank(s)" if o.gpus_per_node else f"{o.ranks_per_node} CPU rank(s) over gloo"
    )
    print(f"submitted job array {array_id} ({o.cluster}): {len(ids)} task(s), {_parallelism(plan)}; each task "
          f"{o.nodes} node(s) x {ranks}, time {o.time}, USR2 {o.signal_delay}s before the limit, "
          f"up to {o.max_requeues} requeue(s)")  # fmt: skip
    print(f"  sweep dir  {plan.sweep_dir}")
    for task, job_id in zip(plan.tasks, ids):
        print(f"  task {task.index:>3}   job {job_id:<10} {task.name}/")
    print(f"  logs       {plan.folder}/{array_id}_<task>_0_log.out  .err")
    print(f"  status     disttrain status {plan.sweep_dir}")
    sys.stdout.flush()


def _parallelism(plan: SweepPlan) -> str:
    limit = plan.opts.array_parallelism
    return (
        f"at most {limit} at once"
        if limit and limit < len(plan.tasks)
        else "all at once if the cluster has room"
    )
