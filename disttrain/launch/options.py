"""`disttrain submit` arguments: parsing, the `--profile` file of a team's SLURM settings, validation.

Everything here is stdlib + yaml (through config), so `launch/submit.py --help` answers at once on a
login node. Bad input raises ConfigError with one line that names the flag and says what to write.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import NoReturn

import yaml

from disttrain.errors import ConfigError
from disttrain.slurm import DEFAULT_LEAVE_OUT_AFTER, DEFAULT_MAX_REQUEUES

DEFAULT_TIME = "1:00:00"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 300  # --in-job-restarts: how long agents wait for a lost node to come back
DEFAULT_SIGNAL_DELAY_S = 90  # submitit's default; SLURM may send the warning up to ~60 s earlier still
CLUSTERS = ("slurm", "local")
# SLURM time formats (man sbatch): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")
_MEM = re.compile(r"^\d+(?:[KMGT]B?)?$", re.IGNORECASE)


@dataclass
class SubmitOptions:
    """One submission, after merging CLI flags over the profile over the defaults."""

    config: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # None: one per GPU, or 1 CPU rank per node
    cpus_per_task: int | None = None
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = DEFAULT_TIME
    job_name: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    exclude_slow_nodes: bool = False
    signal_delay: int = DEFAULT_SIGNAL_DELAY_S
    max_requeues: int = DEFAULT_MAX_REQUEUES
    in_job_restarts: int = 0  # > 0: one elastic agent per node restarts crashed ranks in the allocation
    spare_nodes: int = 0  # extra nodes whose agents wait to stand in for a lost one (needs in_job_restarts)
    leave_out_after: int | None = (
        None  # failures of a node's ranks before it is left out (None: the default 2)
    )
    rendezvous_timeout: int | None = None  # agents' wait for every node (None: DEFAULT_RENDEZVOUS_TIMEOUT_S)
    cluster: str = "slurm"
    container_image: str | None = None
    log_dir: str | None = None
    profile: str | None = None
    dry_run: bool = False
    wait: bool = False
    overrides: list[str] = field(default_factory=list)
    sweep: list[str] = field(default_factory=list)  # `KEY=V1,V2` axes of a job array (launch/sweep.py)
    sweep_file: str | None = None
    array_parallelism: int | None = None  # None: every task of the array may run at once

    @property
    def is_sweep(self) -> bool:
        return bool(self.sweep or self.sweep_file)

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def time_seconds(self) -> int:
        return parse_time(self.time)

    @property
    def time_minutes(self) -> int:
        return math.ceil(self.time_seconds / 60)


# Settings a profile may hold: the SLURM side of a submission, never the config or the run's actions.
PROFILE_KEYS = (
    "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem", "partition", "account", "qos",
    "time", "job_name", "constraint", "exclude", "exclude_slow_nodes", "signal_delay", "max_requeues", "in_job_restarts", "spare_nodes", "rendezvous_timeout", "leave_out_after", "cluster",
    "container_image", "log_dir", "array_parallelism",
)  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="disttrain submit",
        description="Submit a training run to SLURM through submitit (one task per GPU, or per CPU rank). "
        "The job saves and requeues itself on preemption and before its time limit, and resumes.",
        epilog="Example: python launch/submit.py --config configs/tiny_gpt.yaml --nodes 2 --gpus-per-node 8 "
        "--partition gpu --time 24:00:00 optim.lr=3e-4",
    )
    add = p.add_argument
    add("--config", help="YAML config of the run (default: the built-in digits example)")
    add("--profile", help="YAML file of SLURM settings (partition, account, qos, ...); flags given here win")
    add("--nodes", type=int, help="number of nodes (default 1)")
    add("--gpus-per-node", type=int, help="GPUs per node, one rank each; 0: CPU ranks over gloo (default 0)")
    add("--tasks-per-node", type=int, help="ranks per node (default: --gpus-per-node, or 1 without GPUs)")
    add("--cpus-per-task", type=int, help="CPU cores per rank (SLURM's default if not given)")
    add("--mem", help="memory per node, SLURM syntax: 64G, 4000M, 0 (all)")
    add("--partition", help="SLURM partition")
    add("--account", help="SLURM account")
    add("--qos", help="SLURM quality of service")
    add(
        "--time", help=f"time limit per attempt, SLURM syntax: MM, HH:MM:SS, D-HH:MM (default {DEFAULT_TIME})"
    )
    add("--job-name", help="job name (default: the config's name, or the run dir's last part)")
    add("--constraint", help="node features, e.g. a100")
    add("--exclude", help="nodes to avoid, e.g. node[3-4]")
    add(
        "--exclude-slow-nodes",
        action="store_true",
        default=None,
        help="on a requeue, leave out the nodes whose rank was a straggler for most of the attempt",
    )
    add(
        "--signal-delay",
        type=int,
        help=f"seconds of warning (SIGUSR2) before the time limit (default {DEFAULT_SIGNAL_DELAY_S})",
    )
    add("--max-requeues", type=int, help=f"give up after this many requeues (default {DEFAULT_MAX_REQUEUES})")
    add(
        "--in-job-restarts",
        type=int,
        help="restart crashed ranks inside the allocation up to N times (one torch elastic agent per node, "
        "resuming from checkpoint.local or the newest checkpoint); default 0: a crash fails the job",
    )
    add(
        "--spare-nodes",
        type=int,
        help="allocate K more nodes whose agents wait in the rendezvous and stand in for a node that is lost "
        "(needs --in-job-restarts; the job is not killed when a node fails); default 0",
    )
    add(
        "--leave-out-after",
        type=int,
        help="with --in-job-restarts: a node whose ranks fail N times in a job is left out (the job is "
        f"requeued without it); 0: never (default {DEFAULT_LEAVE_OUT_AFTER})",
    )
    add(
        "--rendezvous-timeout",
        type=int,
        help="seconds the nodes' agents wait for every node in a rendezvous (--in-job-restarts): when a node is "
        f"lost and no spare waits, the job is requeued without it after this long (default {DEFAULT_RENDEZVOUS_TIMEOUT_S})",
    )
    add(
        "--cluster",
        choices=CLUSTERS,
        help="slurm (default), or local: submitit's local executor, on this machine",
    )
    add("--container-image", help="run each task in this image (pyxis: passed to srun as --container-image)")
    add("--log-dir", help="folder for submitit's job files and logs (default RUN_DIR/slurm)")
    add(
        "--dry-run",
        action="store_true",
        help="print the sbatch script and the resolved config; submit nothing",
    )
    add(
        "--wait",
        action="store_true",
        help="follow the job (through requeues) until it ends; exit 0 if it finished",
    )
    add(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help="sweep a key over values; several --sweep give their cartesian product, submitted as one job "
        "array with one run dir per combination under run_dir (the sweep dir)",
    )
    add(
        "--sweep-file",
        help="YAML list of explicit combinations, one mapping per task: - {optim.lr: 1.0e-3, seed: 1}",
    )
    add("--array-parallelism", type=int, help="run at most N tasks of a sweep at once (default: all)")
    add("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4")
    return p


def parse(argv: Sequence[str]) -> SubmitOptions:
    """Flags over profile over defaults, validated. Raises ConfigError (exit 2) on bad input."""
    args = vars(build_parser().parse_intermixed_args(list(argv)))
    merged: dict = {}
    if args.get("profile"):
        merged.update(read_profile(args["profile"]))
    merged.update({k: v for k, v in args.items() if v is not None and v is not False})
    opts = SubmitOptions(**{f.name: merged[f.name] for f in fields(SubmitOptions) if f.name in merged})
    validate(opts)
    return opts


def read_profile(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(
            f"--profile {path!r} not found: give a YAML file such as configs/slurm_example.yaml"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ConfigError(
            f"--profile {path}: malformed YAML ({str(err).splitlines()[0]}); fix the file"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"--profile {path}: expected a mapping such as `partition: gpu`, got {type(data).__name__}"
        )
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in PROFILE_KEYS:
            close = difflib.get_close_matches(name, PROFILE_KEYS, n=1)
            hint = (
                f"did you mean {close[0].replace('_', '-')}?"
                if close
                else f"valid keys: {', '.join(PROFILE_KEYS)}"
            )
            raise ConfigError(f"--profile {path}: unknown key {key!r}; {hint}")
        out[name] = str(value) if name in ("time", "mem") else value
    return out


def validate(o: SubmitOptions) -> None:
    """Range and format checks of the SLURM side; the config is checked separately (load_config)."""
    _check_counts(o)
    seconds = parse_time(o.time)
    if o.signal_delay >= seconds:
        raise ConfigError(
            f"--signal-delay {o.signal_delay}s is not shorter than --time {o.time} ({seconds}s); "
            "the warning must come before the limit"
        )
    if o.mem is not None and not _MEM.match(str(o.mem)):
        raise ConfigError(f"--mem {o.mem!r}: write a SLURM size such as 64G, 4000M or 0")
    if not isinstance(o.exclude_slow_nodes, bool):
        raise ConfigError(f"exclude_slow_nodes: {o.exclude_slow_nodes!r} must be true or false")
    _check_cluster(o)
    _check_sweep(o)
    for item in o.overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"override {item!r} has no '=': write it as key=value, e.g. trainer.max_steps=200"
            )


def _check_counts(o: SubmitOptions) -> None:
    for name, low in (("nodes", 1), ("gpus_per_node", 0), ("tasks_per_node", 1), ("cpus_per_task", 1),
                      ("signal_delay", 0), ("max_requeues", 0), ("in_job_restarts", 0), ("spare_nodes", 0), ("rendezvous_timeout", 10),
                      ("leave_out_after", 0),
                      ("array_parallelism", 1)):  # fmt: skip
        value = getattr(o, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise ConfigError(f"--{name.replace('_', '-')}: {value!r} must be an integer >= {low}")
    if o.gpus_per_node and o.tasks_per_node not in (None, o.gpus_per_node):
        raise ConfigError(
            f"--tasks-per-node {o.tasks_per_node} with --gpus-per-node {o.gpus_per_node}: disttrain runs one "
            "task per GPU; drop --tasks-per-node"
        )


def _check_cluster(o: SubmitOptions) -> None:
    if o.cluster not in CLUSTERS:
        raise ConfigError(f"--cluster {o.cluster!r}: choose slurm or local")
    if o.cluster == "local" and o.nodes != 1:
        raise ConfigError(f"--cluster local runs on this machine: --nodes must be 1, not {o.nodes}")
    if o.cluster == "local" and o.in_job_restarts:
        raise ConfigError(
            "--in-job-restarts needs --cluster slurm; on one machine use torchrun --max-restarts N"
        )
    if o.rendezvous_timeout is not None and not o.in_job_restarts:
        raise ConfigError(
            f"--rendezvous-timeout {o.rendezvous_timeout} applies to the agents of --in-job-restarts N; add that "
            "or drop it"
        )
    if o.leave_out_after is not None and not o.in_job_restarts:
        raise ConfigError(
            f"--leave-out-after {o.leave_out_after} applies to the agents of --in-job-restarts N; add that or "
            "drop it"
        )
    if o.spare_nodes and not o.in_job_restarts:
        raise ConfigError(
            f"--spare-nodes {o.spare_nodes} needs --in-job-restarts N: a spare joins when the nodes' elastic "
            "agents restart; add e.g. --in-job-restarts 3"
        )
    if o.cluster == "local" and o.container_image:
        raise ConfigError("--container-image needs --cluster slurm (pyxis passes it to srun)")


def _check_sweep(o: SubmitOptions) -> None:
    if o.array_parallelism is not None and not o.is_sweep:
        raise ConfigError("--array-parallelism applies to a sweep: add --sweep KEY=V1,V2 or --sweep-file")
    if not o.is_sweep:
        return
    if o.cluster != "slurm":
        raise ConfigError("--sweep submits a SLURM job array: it needs --cluster slurm")
    if o.wait:
        raise ConfigError("--wait follows one job; for a sweep, watch it with `disttrain status SWEEP_DIR`")


def parse_time(text: str) -> int:
    """A SLURM time limit in seconds. Raises ConfigError for anything sbatch would not take."""
    match = _TIME.match(str(text).strip())
    if not match:
        raise ConfigError(f"--time {text!r}: write minutes (90), HH:MM:SS (24:00:00) or D-HH:MM (2-00:00)")
    a = int(match.group("a"))
    d, b, c = (int(g) if g else None for g in match.group("d", "b", "c"))
    if d is None:  # M, M:S, H:M:S
        seconds = a * 60 + (b or 0) if c is None else a * 3600 + (b or 0) * 60 + c
    else:  # D-H, D-H:M, D-H:M:S
        seconds = d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if seconds <= 0:
        raise ConfigError(f"--time {text!r}: the time limit must be positive")
    return seconds
