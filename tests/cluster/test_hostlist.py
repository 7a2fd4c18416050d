"""disttrain reads SLURM the way SLURM itself answers: SLURM_JOB_NODELIST as `scontrol show hostnames`
expands it, and `scontrol show job`'s three answers (a job, no such job, no answer) told apart."""

from __future__ import annotations

import pytest

from disttrain.slurm import expand_hostlist, show_job

FORMS = ["node[01-03,07]", "a[1-2]b[3-4]", "gpu-[1-2]-[7-8]", "node[01-02],a[1-2]b[3-4],login1", "x"]


@pytest.mark.parametrize("text", FORMS)
def test_expansion_matches_scontrol(slurm, text):
    proc = slurm.run(["scontrol", "show", "hostnames", text])
    assert expand_hostlist(text) == proc.stdout.split()


def test_a_range_scontrol_refuses_is_refused(slurm):
    text = "gpu-[1-4]-[a-b]"
    proc = slurm.run(["scontrol", "show", "hostnames", text], check=False)
    assert proc.stdout == "" and "Invalid hostlist" in proc.stderr  # scontrol exits 0 but expands nothing
    with pytest.raises(ValueError, match="invalid SLURM hostlist"):
        expand_hostlist(text)


def test_show_job_tells_a_job_an_unknown_job_and_no_answer_apart(slurm, monkeypatch):
    """The requeue policy, `submit --wait` and the sweep view act differently on each: a job's fields;
    {} for a job the controller does not know (never, or gone after MinJobAge); None when SLURM could
    not be asked (here: no scontrol on the PATH), which must never read as "gone" or "cancelled"."""
    job = slurm.sbatch("--nodes=1", wrap="sleep 30")
    info = show_job(str(job))
    assert info is not None and info["JobId"] == str(job) and info["JobState"] in ("PENDING", "RUNNING")
    assert show_job("987654") == {}
    monkeypatch.setenv("PATH", "/nonexistent")
    assert show_job(str(job)) is None
