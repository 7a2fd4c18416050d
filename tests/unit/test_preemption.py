"""The requeue policy and the signal hand-over, without daemons: what rank 0 decides from the signal,
`scontrol show job` and the budget (the cluster tests drive the same code through real SLURM)."""

from __future__ import annotations

import os
import signal

import pytest

from disttrain.cluster import ClusterEnv
from disttrain.process import StopSignal
from disttrain.slurm import Requeue, decide, max_requeues_from_env
from disttrain.stop import StopAgreement, StopRequest

JOB = ClusterEnv(launcher="slurm", world_size=2, job_id="42")


def preempted(_job_id):
    return {"JobState": "RUNNING", "PreemptTime": "2026-11-21T05:47:13"}


def cancelled(_job_id):  # what scancel (and the time limit itself) look like from inside the job
    return {"JobState": "COMPLETING", "PreemptTime": "None"}


@pytest.mark.parametrize(
    "sig, show, restarts, budget, requeued, reason",
    [
        ("SIGUSR2", None, 0, 3, True, "time limit warning (SIGUSR2)"),
        ("SIGTERM", preempted, 0, 3, True, "preempted (SIGTERM, PreemptTime=2026-11-21T05:47:13)"),
        ("SIGTERM", cancelled, 0, 3, False, "stopped by scancel or the time limit"),
        (
            "SIGTERM",
            lambda _: {},
            0,
            3,
            False,
            "no PreemptTime",
        ),  # scontrol failed: never turn scancel into requeue
        ("SIGTERM", lambda _: None, 0, 3, False, "no PreemptTime"),  # nor when SLURM could not be asked
        ("SIGUSR2", None, 3, 3, False, "budget is spent (3 of --max-requeues 3 used)"),
        ("SIGUSR2", None, 0, 0, False, "budget is spent (0 of --max-requeues 0 used)"),
        ("SIGINT", None, 0, 3, False, "stopped by SIGINT"),
        (None, None, 0, 3, False, "stopped by a stop request"),
    ],
)
def test_decide(sig, show, restarts, budget, requeued, reason):
    cluster = ClusterEnv(launcher="slurm", world_size=2, job_id="42", restart_count=restarts)
    decision = decide(sig, cluster, budget, show=show or (lambda _: None))
    assert decision.requeued is requeued and reason in decision.reason, decision
    assert decision.signal == sig


def test_budget_left_counts_this_requeue():
    cluster = ClusterEnv(launcher="slurm", job_id="42", restart_count=1)
    assert decide("SIGUSR2", cluster, 3) == Requeue(True, "time limit warning (SIGUSR2)", "SIGUSR2", 1)


def test_not_a_slurm_job_is_never_requeued():
    assert not decide("SIGUSR2", ClusterEnv(launcher="torchrun"), 3).requeued


def test_budget_from_the_environment():
    assert max_requeues_from_env({}) == 10
    assert max_requeues_from_env({"DISTTRAIN_MAX_REQUEUES": "2"}) == 2


def test_a_signal_arriving_before_training_is_kept_by_the_one_handler():
    """The entry point installs the run's only StopSignal before its slow imports; what arrives then
    (USR2 while torch imports) and later is all there when the trainer polls."""
    stop = StopSignal().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.received == ["SIGUSR2", "SIGTERM"] and stop.first_at is not None
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_ctrl_c_twice_raises_at_once():
    stop = StopSignal().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()


def test_agreement_is_read_one_boundary_after_the_signal():
    """Each poll starts the next all-reduce and reads the previous one: a signal seen at boundary k is
    agreed at boundary k + 1 on every rank (here one process: the same code without a process group)."""
    stop = StopSignal(())  # no handlers: the test sets what a handler would
    agreement = StopAgreement(stop, interval_s=0)  # an exchange at every boundary
    assert agreement.poll() is None
    stop.received.append("SIGUSR2")
    assert agreement.poll() is None  # the flags in flight were started before the signal
    request = agreement.poll()
    assert request == StopRequest(("SIGUSR2",)) and request.signal == "SIGUSR2"
    stop.received.append("SIGTERM")
    assert agreement.poll() is request  # agreed once; later signals do not change the decision


def test_exchanges_come_about_every_interval_and_a_signal_is_still_agreed_at_one_boundary():
    """Steps of ~5 ms, interval 50 ms: rank 0 proposes passing ~9 boundaries between exchanges, the
    proposal travels with the flags, and a signal is agreed within two intervals plus a step."""
    import time

    stop = StopSignal(())
    agreement = StopAgreement(stop, interval_s=0.05)
    started = []
    for boundary in range(60):
        before = agreement._pending
        agreement.poll()
        if agreement._pending is not before:
            started.append(boundary)
        time.sleep(0.005)
    gaps = [b - a for a, b in zip(started[2:], started[3:])]  # once rank 0 has measured a rate
    assert len(started) < 15 and min(gaps) >= 5, started  # not every boundary
    stop.received.append("SIGTERM")
    boundaries = 1
    while agreement.poll() is None and boundaries < 60:
        boundaries += 1
        time.sleep(0.005)
    assert agreement.agreed == StopRequest(("SIGTERM",)) and boundaries * 0.005 < 3 * 0.05 + 0.05, boundaries


def test_settle_exchanges_at_once_with_the_non_finite_flag():
    agreement = StopAgreement(StopSignal(()), interval_s=0.05, channels=("nonfinite",))
    agreement.poll()
    flag = agreement.channel("nonfinite")
    flag.raised = True  # what the guard sets when this rank's loss is not finite
    assert agreement.settle() is None and flag.agreed and not flag.raised
    flag.agreed = False
    agreement.settle()
    assert not flag.agreed, "a flag is sent once"
