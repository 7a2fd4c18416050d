"""Resume policy, in one place: which checkpoint a run continues from, which config changes a resume
refuses, and what a restarted attempt does. Torch-free, so that preflight refuses a bad resume before
anything heavy is imported or anything is created.

The rule itself (which keys) is config schema: `config.RESUME_CRITICAL_KEYS`, the fields marked
`resume="refuse"`. A checkpoint records their values (its *fingerprint*) in its manifest; a resume whose
config differs in one is refused, naming the key. Every other key is applied from the resumed step on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from disttrain import cluster, manifest
from disttrain.cluster import ClusterEnv
from disttrain.config import RESUME_CRITICAL_KEYS, Config, get_dotted, to_dict
from disttrain.errors import CheckpointError, ConfigError
from disttrain.rundir import RunDir, is_committed


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The values of RESUME_CRITICAL_KEYS, compared against a checkpoint's before resuming."""
    data = to_dict(cfg, redact=True)
    return {key: get_dotted(data, key) for key in RESUME_CRITICAL_KEYS}


def conflicts(saved: dict[str, Any], cfg: Config) -> list[str]:
    """`key: saved -> now` for every refused key whose value differs from the checkpoint's fingerprint.
    Keys the checkpoint did not record are not compared, and leaving init_from empty on resume is no
    change: it only ever seeds a run's first segment."""
    now = fingerprint(cfg)
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed if not (k == "init_from" and not now[k])]


def refusal(source: str, changed: list[str]) -> str:
    return (
        f"cannot resume from {source}: {', '.join(changed)} changed since the checkpoint; restore the old "
        "values, start a new run_dir, or use init_from=PATH to start from its weights only"
    )


def check_compatible(cfg: Config, source: str, found: manifest.Manifest) -> None:
    """Refuse (ConfigError) a checkpoint whose run differs in a key that makes its state meaningless here."""
    changed = conflicts(manifest.fingerprint(found), cfg)
    if changed:
        raise ConfigError(refusal(source, changed))


def continue_after_restart(cfg: Config) -> None:
    """A restarted attempt (a SLURM requeue, a torchrun restart) continues from the run's own newest
    committed checkpoint, whatever `resume` said for the first attempt: `never` meant "nothing there
    before this run", and a path is where the run started from, not where it got to. Before its first
    commit (a save killed half way leaves only a `.tmp-` dir) it starts again as the first attempt did.
    `never` becomes `auto` even then: the local tier (checkpoint.local) may hold the attempt's state
    where the run dir holds none yet, and with nothing anywhere `auto` starts fresh as `never` did."""
    if cfg.resume == "never" or (cfg.resume != "auto" and RunDir(cfg.run_dir).committed_steps()):
        cfg.resume = "auto"


def late_joiner(env: ClusterEnv, run_dir: str) -> ClusterEnv:
    """`env` with the restart count of the job it joins, for a torchrun worker whose agent came in after
    the job's first round: a spare node standing in for a lost one (`disttrain submit --spare-nodes`, a
    third `torchrun --nnodes 2` agent). Its agent counts no restart while the agents it joins do, and
    every rank must take the same path (a restart continues the run: `resume=never` becomes `auto`, the
    restart checks below). Such an agent started before records of its job were written, which no rank
    writes before every rank of its round has joined: finding one means an earlier round ran without
    this rank. A torchrun job id ("none" by default) may be reused by a later invocation, but that one's
    agents start after the earlier one's records."""
    if env.launcher != "torchrun" or env.restart_count > 0 or not env.job_id:
        return env
    since = cluster.parent_started()
    if since is None:
        return env
    from disttrain import events as ev  # torch-free

    try:
        records = ev.read(run_dir)
    except (OSError, ValueError, RuntimeError):  # an unusable run dir: preflight says what is wrong
        return env
    ours = [
        int(r.get("restart_count") or 0)
        for r in records
        if str(r.get("job_id")) == env.job_id and r["time"] >= since
    ]
    return dataclasses.replace(env, restart_count=max([1, *ours])) if ours else env


def ended_for_good(run_dir: str) -> str | None:
    """Why a restarted attempt must not train again, or None. A run whose last segment stopped on a
    non-finite value would only reach it again from the same checkpoint (the numbers are the same), so a
    torchrun or in-job restart after it fails at once instead of spending the allocation on it."""
    from disttrain import events as ev  # torch-free

    last = ev.last_end(ev.read(run_dir))
    if last is None or ev.kind(last) != ev.NONFINITE or last.get("action") != "stop":
        return None
    return (
        f"the run stopped at step {last.get('step')} on a non-finite {last.get('quantity', 'value')}; a restart "
        "would reach it again from the same checkpoint, so it is not trained again: fix the cause (lower "
        "optim.lr, check the data, or set trainer.nonfinite=skip) and run the same command again"
    )


def failing_hosts(run_dir: str, job_id: str, times: int = 2) -> list[str]:
    """Hosts whose ranks died or hung `times` times (--leave-out-after) in this SLURM job (its attempts and
    in-job restarts), as the `hang` events of the surviving ranks named them: one count per host per
    segment. Torch-free: read before anything is built."""
    seen = _hang_hosts(run_dir, job_id)
    return sorted(host for host, segments in seen.items() if len(segments) >= times)


def lost_hosts(run_dir: str, job_id: str) -> list[str]:
    """The hosts the surviving ranks named in this SLURM job's newest `hang` records (those of its latest
    segment): where the ranks that stopped answering ran, when a node was lost whole."""
    seen = _hang_hosts(run_dir, job_id)
    latest = max((max(segments) for segments in seen.values()), default=None)
    return sorted(host for host, segments in seen.items() if latest in segments)


def _hang_hosts(run_dir: str, job_id: str) -> dict[str, set[int]]:
    """{host: the segments (restart counts) in which this job's `hang` records named a rank there}."""
    from disttrain import events as ev

    seen: dict[str, set[int]] = {}
    for record in ev.read(run_dir):
        if ev.kind(record) != ev.HANG or str(record.get("job_id", "")) != job_id:
            continue
        for rank in record.get("ranks") or []:
            host = rank.get("host") if isinstance(rank, dict) else None
            if host:
                seen.setdefault(str(host), set()).add(int(record.get("restart_count") or 0))
    return seen


def source(cfg: Config, committed: list[int]) -> str | None:
    """The checkpoint directory `resume` points at before anything is verified (the newest committed one
    of the run dir, or of the run dir `resume=PATH` names); None for a fresh start."""
    if cfg.resume == "auto":
        return RunDir(cfg.run_dir).step_dir(committed[0]) if committed else None
    if cfg.resume == "never":
        return None
    own = RunDir(cfg.resume).committed_steps()
    return cfg.resume if is_committed(cfg.resume) or not own else RunDir(cfg.resume).step_dir(own[0])


def preflight(cfg: Config, committed: list[int]) -> None:
    """Refuse a resume whose config changed a key the checkpoint depends on, from the manifest alone,
    before anything is built. (The checkpoint finally loaded is checked again: a newest one that fails
    verification makes the load fall back to an older one.)"""
    path = source(cfg, committed)
    if path is None:
        return
    try:
        found = manifest.read(path)
    except CheckpointError:
        return  # unreadable or malformed: loading it says so, or falls back to an older one
    check_compatible(cfg, path, found)
