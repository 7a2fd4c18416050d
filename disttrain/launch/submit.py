"""`disttrain submit` / `python launch/submit.py`: validate a run, submit it to SLURM through submitit,
print where to look, and return at once (or follow it with --wait).

Exit codes: 0 submitted (with --wait: the run finished), 1 the run failed or stopped (--wait) or the
submission failed, 2 bad input, refused before anything is submitted or created on disk.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Sequence

from disttrain.errors import EXIT_BAD_INPUT, EXIT_OK, ConfigError
from disttrain.launch.options import parse
from disttrain.launch.plan import Plan, first_missing, not_submitted, prepare


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = parse(list(sys.argv[1:] if argv is None else argv))
        if opts.is_sweep:  # one job array, one task per combination (launch/array.py)
            from disttrain.launch import array

            sweep = array.prepare(opts)
            return array.print_dry_run(sweep) if opts.dry_run else array.submit(sweep)
        plan = prepare(opts)
    except ConfigError as err:
        print(f"disttrain submit: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if plan.opts.dry_run:
        print_dry_run(plan)
        return EXIT_OK
    return submit(plan)


def print_dry_run(plan: Plan) -> None:
    from disttrain.config import dump_yaml
    from disttrain.launch.executor import local_parameters, sbatch_script

    if plan.opts.cluster == "slurm":
        print("# sbatch script (submitit writes it as <job id>_submission.sh)")
        print(sbatch_script(plan.opts, plan.folder, plan.job_name))
    else:
        print(f"# submitit local executor, folder {plan.folder}: {local_parameters(plan.opts)}")
    print(f"# resolved config (secrets redacted), world size {plan.opts.world_size}")
    print(dump_yaml(plan.cfg), end="")


def submit(plan: Plan) -> int:
    from disttrain.launch.executor import make_executor
    from disttrain.launch.job import TrainJob, split_secrets
    from disttrain.secrets import secrets_in_environment

    opts, run_dir = plan.opts, plan.cfg.run_dir
    config_yaml, secrets = split_secrets(plan.cfg)
    created = first_missing(plan.folder)
    try:
        executor = make_executor(opts, plan.folder, plan.job_name)
        # submitit echoes sbatch's stderr on failure; the error below carries it, on one line
        with secrets_in_environment(secrets), contextlib.redirect_stderr(io.StringIO()):
            job = executor.submit(TrainJob.of(opts, config_yaml, run_dir))
    except Exception as err:  # sbatch refused (bad partition, account...): say why, leave nothing behind
        return not_submitted(err, created)
    print_submitted(plan, job.job_id)
    if not opts.wait:
        return EXIT_OK
    from disttrain.launch.follow import follow_local, follow_slurm

    if opts.cluster == "local":
        return follow_local(job, run_dir)
    return follow_slurm(str(job.job_id), run_dir)


def print_submitted(plan: Plan, job_id: str) -> None:
    o = plan.opts
    ranks = (
        f"{o.gpus_per_node} GPU rank(s)" if o.gpus_per_node else f"{o.ranks_per_node} CPU rank(s) over gloo"
    )
    log = os.path.join(plan.folder, f"{job_id}_0_log")
    spares = f" + {o.spare_nodes} spare node(s)" if o.spare_nodes else ""
    print(f"submitted job {job_id} ({o.cluster}): {o.nodes} node(s) x {ranks}{spares}, time {o.time}, "
          f"USR2 {o.signal_delay}s before the limit, up to {o.max_requeues} requeue(s)"
          + (f", up to {o.in_job_restarts} in-job restart(s)" if o.in_job_restarts else ""))  # fmt: skip
    print(f"  run dir  {plan.cfg.run_dir}")
    print(f"  logs     {log}.out  {log}.err  (rank r: {job_id}_<r>_log.*)")
    print(f"  status   disttrain status {plan.cfg.run_dir}")
    sys.stdout.flush()
