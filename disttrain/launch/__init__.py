"""Cluster launch: submitit executor setup, the sbatch dry-run, the job callable (DESIGN §2).

Modules: `options` (the `disttrain submit` flags and --profile), `plan` (a validated submission and the
checks and clean-up a run and a sweep share), `sweep` (a sweep spec to its tasks), `executor` (sbatch
parameters, script, submitit executor), `job` (what runs on every rank), `follow` (--wait), `submit`
(the command) and `array` (a sweep's job array). Only `job` touches the trainer, and only inside the
functions that run in the job.
"""
