"""The adversarial suite: each test replays something an adversarial pass broke once (issue 11), as a
user would meet it, and must keep passing. The S3 cases reuse the storage stage's moto server."""

from tests.storage.conftest import s3_env  # noqa: F401 - a fixture for this folder's S3 tests
