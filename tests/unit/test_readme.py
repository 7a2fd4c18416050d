"""README stays true: the Quick start is two commands and the config reference lists every key."""

import subprocess
import sys

from disttrain.commands.config import reference_table
from tests.conftest import REPO


def test_quickstart_has_exactly_two_commands_and_ci_runs_the_second():
    install = subprocess.run(
        [sys.executable, ".ci/quickstart.py", "install"], cwd=REPO, capture_output=True, text=True
    )
    test = subprocess.run(
        [sys.executable, ".ci/quickstart.py", "test"], cwd=REPO, capture_output=True, text=True
    )
    assert install.returncode == 0 and test.returncode == 0, install.stderr + test.stderr
    assert "torch==2.13.0" in install.stdout and "disttrain.main" in install.stdout
    assert "pytest" in test.stdout


def test_config_reference_in_readme_is_current():
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    current = readme.split(start, 1)[1].split(end, 1)[0]
    assert current == reference_table(), (
        "regenerate with: python -m disttrain config (paste between the markers)"
    )
