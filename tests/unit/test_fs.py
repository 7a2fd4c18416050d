"""String paths over fsspec: the local fast path and an in-memory remote behave alike."""

from __future__ import annotations

import os
import stat

import pytest

from disttrain import fs


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    import fsspec

    fsspec.filesystem("memory").store.clear()
    return "memory://fs-test"


def test_write_read_list_remove(root):
    fs.makedirs(fs.join(root, "a"))
    fs.atomic_write(fs.join(root, "a", "x.txt"), "hello")
    fs.append_text(fs.join(root, "a", "log.jsonl"), "1\n")
    fs.append_text(fs.join(root, "a", "log.jsonl"), "2\n")
    assert fs.read_text(fs.join(root, "a", "x.txt")) == "hello"
    assert fs.read_text(fs.join(root, "a", "log.jsonl")) == "1\n2\n"
    assert fs.listdir(fs.join(root, "a")) == ["log.jsonl", "x.txt"]
    assert fs.isfile(fs.join(root, "a", "x.txt")) and fs.size(fs.join(root, "a", "x.txt")) == 5
    fs.remove(fs.join(root, "a"), recursive=True)
    assert not fs.exists(fs.join(root, "a", "x.txt")) and fs.listdir(fs.join(root, "a")) == []


def test_atomic_write_leaves_no_temp_and_normal_permissions(tmp_path):
    target = str(tmp_path / "latest")
    fs.atomic_write(target, "step_1")
    fs.atomic_write(target, "step_2")
    assert os.listdir(tmp_path) == ["latest"] and fs.read_text(target) == "step_2"
    mode = stat.S_IMODE(os.stat(target).st_mode)
    assert mode & 0o044, "readable by group/others like any file open() creates (umask permitting)"


def test_join_and_basename():
    assert fs.join("s3://bucket/prefix/", "checkpoints", "step_1") == "s3://bucket/prefix/checkpoints/step_1"
    assert fs.join("/tmp/run", "/metrics.jsonl") == "/tmp/run/metrics.jsonl"
    assert fs.basename("s3://b/p/step_00000001/") == "step_00000001"


def test_a_symlink_in_place_of_a_file_is_never_written_through(tmp_path):
    """Issue 19, adversarial 5: events.jsonl as a symlink was appended through, out of the run dir."""
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    for name, write in (
        ("events.jsonl", fs.append_text),
        ("x.bin", lambda p, d: fs.write_bytes(p, d.encode())),
    ):
        os.symlink(outside, run / name)
        with pytest.raises(fs.StorageError, match=f"{run / name} refused: it is a symbolic link"):
            write(str(run / name), "record\n")
        assert outside.read_text() == "precious\n"
    fs.atomic_write(str(run / "events.jsonl"), "whole\n")  # a rename replaces the link itself
    assert not (run / "events.jsonl").is_symlink() and outside.read_text() == "precious\n"


def test_a_local_write_failure_names_the_file(tmp_path):
    """Issue 19, adversarial 7: OSError's own text leaves the file out when the write itself fails."""
    full = "/dev/full"  # every write fails with ENOSPC
    if not os.path.exists(full):
        pytest.skip("no /dev/full here")
    with pytest.raises(fs.StorageError, match=f"appending to {full} failed: .*No space left on device"):
        fs.append_text(full, "x\n")


def test_a_fence_refuses_writes_under_its_prefix_only(tmp_path):
    from disttrain import fence

    def refuse(path: str) -> None:
        raise fs.LeaseLost(f"fenced: {path}")

    run, other = str(tmp_path / "run"), str(tmp_path / "run-other")  # the same prefix, another dir
    fs.makedirs(run)
    fs.makedirs(other)
    fence.add(run, refuse)
    try:
        for write in (lambda p: fs.append_text(p, "x"), lambda p: fs.atomic_write(p, "x"), fs.remove):
            with pytest.raises(fs.LeaseLost, match="fenced"):
                write(fs.join(run, "metrics.jsonl"))
        fs.append_text(fs.join(other, "metrics.jsonl"), "x")
    finally:
        fence.remove(run)
    fs.append_text(fs.join(run, "metrics.jsonl"), "x")
    assert fs.read_text(fs.join(run, "metrics.jsonl")) == "x"


@pytest.mark.parametrize(
    "text, line",
    [("\n   Some tensors share memory\n  more", "Some tensors share memory"), ("", "ValueError")],
)
def test_first_line_is_the_first_non_empty_line_of_the_cause(text, line):
    assert fs.first_line(ValueError(text)) == line
