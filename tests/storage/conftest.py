"""A real S3 protocol server (moto) on a free loopback port, for tests that put a run dir on s3://."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.conftest import free_port


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """Start moto, point this process (and the AWS variables it yields) at it; undone at module end."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed: pip install 'moto[server]'")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed: pip install 'disttrain[s3]'")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()  # no filesystem cached against another endpoint
    try:
        yield env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.stop()
