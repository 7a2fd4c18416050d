"""Fixtures for tests on a real two-node SLURM cluster started on loopback (see slurm_cluster.py).

``slurm`` is one cluster for the whole session, with SLURM_CONF exported so that submitit and
any subprocess talk to it. After each test that used it, every job is cancelled. When a test
fails, the daemons' logs are attached to its report.

Without SLURM binaries or root the tests skip, saying why. Under CI=true they fail instead of
skipping when the binaries are installed but the cluster cannot run (CI must exercise them).
"""

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import DAEMONS, SlurmCluster, is_available  # noqa: E402

HERE = Path(__file__).resolve().parent
# Preemption waits GraceTime plus up to 30 s of the controller's check cycle, and a requeued
# job waits for the nodes again: a cluster test may legitimately take minutes.
CLUSTER_TEST_TIMEOUT_S = 300


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: needs the loopback SLURM cluster (tests/cluster)")
    if not config.pluginmanager.hasplugin("timeout"):
        config.addinivalue_line("markers", "timeout(seconds): per-test limit (pytest-timeout)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.cluster)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(CLUSTER_TEST_TIMEOUT_S))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    cluster = getattr(item, "funcargs", {}).get("slurm")
    if report.failed and isinstance(cluster, SlurmCluster):
        report.sections.append(("SLURM daemon logs", cluster.logs()))


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A started two-node cluster (partitions ``low`` default, ``high`` preempting)."""
    ok, reason = is_available()
    if not ok:
        binaries_present = all(shutil.which(d) for d in DAEMONS)
        if _in_ci() and binaries_present:
            pytest.fail(f"CI=true and SLURM is installed, but the cluster cannot run: {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()  # a failure here is an error, never a skip
    try:
        with cluster.activate():
            yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def _cancel_jobs_after_test(request):
    """Leave the shared cluster empty for the next test."""
    yield
    cluster = request.node.funcargs.get("slurm")  # absent when the fixture skipped
    if isinstance(cluster, SlurmCluster):
        cluster.cancel_all()
