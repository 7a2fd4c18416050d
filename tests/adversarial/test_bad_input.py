"""Bad input that once gave tracebacks (issue 11): every case exits 2 with one line naming what is
wrong and how to fix it, and creates nothing. A user's own exception at training time is theirs (one
`disttrain:` line plus their traceback); an error in disttrain's handling of input never is."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import FAST, child_env, main_cmd, run_main
from tests.unit.test_main import assert_refused

SYNTAX = "from disttrain.pipelines.digits import DigitsPipeline\n\nclass Pipe(DigitsPipeline)\n    pass\n"
RAISES = 'from disttrain.pipelines.digits import DigitsPipeline\n\nraise RuntimeError("needs a driver it did not find")\n'


@pytest.fixture(scope="module")
def user_modules(tmp_path_factory):
    """A user's package with a module that has a syntax error and one that raises on import."""
    root = tmp_path_factory.mktemp("userpkg")
    (root / "userpipes").mkdir()
    (root / "userpipes" / "__init__.py").write_text("")
    (root / "userpipes" / "syntax.py").write_text(SYNTAX)
    (root / "userpipes" / "raising.py").write_text(RAISES)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(root)])
    return root, env


@pytest.mark.parametrize(
    "args, needles",
    [
        (["pipeline.target=userpipes.syntax:Pipe"], ["syntax error at", "syntax.py:3", "fix the module"]),
        (
            ["pipeline.target=userpipes.raising:Pipe"],
            ["importing userpipes.raising raised RuntimeError", "raising.py:3"],
        ),
        (
            ["pipeline.target=tests.adversarial.pipelines:RaisingInit"],
            ["RaisingInit() raised ValueError", "pipelines.py"],
        ),
        (["pipeline.args.width=abc"], ["pipeline.args.width: expected an integer", "'abc'"]),
        (["pipeline.target=tests.adversarial.pipelines:TinyTrain"], ["train split is empty"]),
        (["data.batch_size=5000"], ["data.batch_size=5000 is larger than the train split"]),
        (["optim.lr=.nan"], ["optim.lr: nan is not a finite number"]),
        (["optim.lr=.inf"], ["optim.lr: inf is not a finite number"]),
    ],
    ids=[
        "syntax-error",
        "raises-on-import",
        "init-raises",
        "arg-type",
        "empty-split",
        "batch-too-big",
        "lr-nan",
        "lr-inf",
    ],  # fmt: skip
)
def test_refused_with_one_line_and_nothing_created(tmp_path, user_modules, args, needles):
    run_dir = tmp_path / "run"
    proc = run_main(
        f"run_dir={run_dir}", "trainer.max_steps=2", *FAST, *args, env=user_modules[1], timeout=120
    )
    assert_refused(proc, *needles)
    assert not run_dir.exists()


def test_resume_from_a_directory_that_is_no_checkpoint(tmp_path):
    elsewhere = tmp_path / "not_a_checkpoint"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("x")
    proc = run_main(f"run_dir={tmp_path / 'run'}", f"resume={elsewhere}", *FAST, timeout=120)
    assert_refused(proc, "resume:", "neither a checkpoint", "give the path of one")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["under-a-file", "in-proc"])
def test_a_run_dir_that_cannot_be_created(tmp_path, where):
    afile = tmp_path / "afile"
    afile.write_text("x")
    run_dir = afile / "run" if where == "under-a-file" else f"/proc/disttrain-{os.getpid()}/run"
    proc = run_main(f"run_dir={run_dir}", *FAST, timeout=120)
    assert_refused(proc, "run_dir: cannot create", "choose another run_dir")
    assert afile.read_text() == "x" and not os.path.exists(str(run_dir))


def test_under_torchrun_the_first_line_is_the_one_that_matters(tmp_path):
    """torchrun adds ~40 lines of its own after a worker fails; the worker's line comes first, and
    the agent's summary repeats it (through its error file) instead of a link to its docs."""
    proc = subprocess.run(
        main_cmd(f"run_dir={tmp_path / 'run'}", "pipeline.args.width=abc", *FAST, nproc=2),
        capture_output=True, text=True, timeout=180, env=child_env(),
    )  # fmt: skip
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode != 0 and lines, proc.stderr
    assert lines[0].startswith("disttrain: error: pipeline.args.width"), "\n".join(lines[:5])
    assert "traceback : disttrain: error: pipeline.args.width" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()
