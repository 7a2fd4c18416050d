"""disttrain reads SLURM_JOB_NODELIST the way SLURM itself expands it (`scontrol show hostnames`)."""

from __future__ import annotations

import pytest

from disttrain.slurm import expand_hostlist

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
