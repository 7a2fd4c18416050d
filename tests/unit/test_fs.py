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
