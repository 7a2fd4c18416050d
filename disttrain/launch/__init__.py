"""Cluster launch: submitit executor setup, the sbatch dry-run, the job callable (DESIGN §2).

Modules: `options` (the `disttrain submit` flags and --profile), `executor` (sbatch parameters, script,
submitit executor), `job` (what runs on every rank, and the requeue after a stop), `follow` (--wait),
`submit` (the command). Only `job` touches the trainer, and only inside the functions that run in the job.
"""
