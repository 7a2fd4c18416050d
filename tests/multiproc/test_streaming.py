"""A streamed train split (JSON lines, larger than the memory each process may use) over 2 ranks:
stopped by SIGTERM to one rank and resumed, it is bitwise identical to a run never stopped, and every
record is trained on exactly once; a resume at another world size is refused with one line.

The cap is RLIMIT_DATA: a process's private writable memory (heap, anonymous maps), which is where a
data set read into memory would live. It leaves the page cache and file-backed maps alone, as a real
memory limit on a node would not count a file being streamed from disk."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import FAST, child_env, computed, main_cmd, read_jsonl, run_main
from tests.multiproc.test_exact_resume import sigterm_worker_after
from tests.pipelines import stream_record
from tests.unit.test_main import assert_refused

pytestmark = pytest.mark.multiproc

CAP = 512 << 20  # bytes of private memory per process; the data file is larger
STEPS = 16
BASE = [
    "pipeline.target=tests.pipelines:ProbeStream", f"trainer.max_steps={STEPS}", "trainer.log_every=1",
    "trainer.eval_every=8", "checkpoint.every_steps=4", "data.batch_size=16", "pipeline.args.step_delay=0.05",
    *FAST,
]  # fmt: skip


def capped() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (CAP, CAP))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """1600 records of 400 KiB: 640 MiB of JSON lines, written without building any record whole."""
    path = tmp_path_factory.mktemp("stream") / "train.jsonl"
    pad = "." * (400 << 10)
    with open(path, "w") as fh:
        for i in range(1600):
            fh.write(json.dumps(stream_record(i)).replace('"pad": ""', f'"pad": "{pad}"') + "\n")
    assert path.stat().st_size > CAP
    return path


def run(run_dir: Path, data: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(main_cmd(f"run_dir={run_dir}", f"pipeline.args.path={data}", *BASE, *extra, nproc=nproc),
                          env=child_env(), capture_output=True, text=True, timeout=300, preexec_fn=capped)  # fmt: skip


def outcome(run_dir: Path, records: Path) -> dict:
    metrics = computed(read_jsonl(run_dir / "metrics.jsonl"))
    manifest = json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").read_text())
    ids = Counter(int(i) for f in records.iterdir() for i in f.read_text().split())
    return {"metrics": metrics, "weights": manifest["files"]["model.safetensors"]["sha256"], "ids": ids}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference")
    (root / "ids").mkdir()
    proc = run(root / "run", data, f"pipeline.args.record_dir={root / 'ids'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outcome(root / "run", root / "ids")


@pytest.fixture(scope="module")
def stopped(data, tmp_path_factory) -> Path:
    """A run with a DataLoader worker reading ahead, SIGTERMed on one rank after step 5."""
    root = tmp_path_factory.mktemp("stopped")
    (root / "ids").mkdir()
    args = [f"run_dir={root / 'run'}", f"pipeline.args.path={data}", *BASE, f"pipeline.args.record_dir={root / 'ids'}",
            "data.num_workers=1"]  # fmt: skip
    proc = subprocess.Popen(main_cmd(*args, nproc=2), env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=capped)  # fmt: skip
    out = sigterm_worker_after(proc, root / "run", 5)
    stops = [e for e in read_jsonl(root / "run" / "events.jsonl") if e["event"] == "stopped"]
    assert stops and stops[-1]["step"] < STEPS, out[-3000:]
    return root


def test_the_cap_is_too_small_to_hold_the_data(data):
    proc = subprocess.run([sys.executable, "-c", f"open({str(data)!r}, 'rb').read()"], capture_output=True,
                          text=True, preexec_fn=capped)  # fmt: skip
    assert proc.returncode != 0 and "MemoryError" in proc.stderr


def test_a_resume_at_another_world_size_is_refused_and_changes_nothing(stopped, data, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(stopped / "run", run_dir)
    before = sorted((p.relative_to(run_dir), p.read_bytes()) for p in run_dir.rglob("*") if p.is_file())
    same = [f"pipeline.args.path={data}", f"pipeline.args.record_dir={stopped / 'ids'}", "data.num_workers=1"]
    proc = run_main(f"run_dir={run_dir}", *same, *BASE)
    assert_refused(proc, "cannot resume at world size 1", "resume with 2 ranks")
    assert (
        sorted((p.relative_to(run_dir), p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()) == before
    )


def test_a_stopped_stream_resumes_bitwise_identical_and_trains_on_each_record_once(stopped, reference, data):
    proc = run(stopped / "run", data, f"pipeline.args.record_dir={stopped / 'ids'}", "data.num_workers=1")
    assert proc.returncode == 0 and "resumed from step" in proc.stdout, proc.stderr[-3000:]
    got = outcome(stopped / "run", stopped / "ids")
    assert got["metrics"] == reference["metrics"]
    assert got["weights"] == reference["weights"]
    assert got["ids"] == reference["ids"] and set(got["ids"].values()) == {1}
    assert sum(got["ids"].values()) == STEPS * 16


def test_evaluating_the_stopped_run_at_another_world_size_needs_no_stream_position(stopped, data, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(stopped / "run", run_dir)
    same = [f"pipeline.args.path={data}", f"pipeline.args.record_dir={stopped / 'ids'}", "data.num_workers=1"]
    proc = run_main(f"run_dir={run_dir}", *same, *BASE, "--test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test/accuracy" in json.loads((run_dir / "test_metrics.json").read_text())
