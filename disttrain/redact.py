"""Secrets: find the values that must never be written or printed, and mask them in text, argv and
the process output. Torch-free: the entry point masks its output before anything heavy is imported."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from disttrain.config import REDACTED, SECRET_KEY_PATTERN, Config, to_dict


def secret_values(cfg: Config | None = None) -> list[str]:
    """Values that must never be written: those of credential-looking environment variables
    (WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, HF_TOKEN, ...) and config values under secret-looking keys
    (SECRET_KEY_PATTERN). Values under 8 characters are left alone: too common to mask."""
    found = [value for name, value in os.environ.items() if SECRET_KEY_PATTERN.search(name)]
    if cfg is not None:
        found += _secret_config_values(to_dict(cfg, redact=False))
    return sorted({v for v in found if len(v) >= 8}, key=len, reverse=True)


def _secret_config_values(node: Any, secret: bool = False) -> list[str]:
    if isinstance(node, dict):
        return [v for k, child in node.items() for v in _secret_config_values(child, secret or _is_secret(k))]
    if isinstance(node, list):
        return [v for child in node for v in _secret_config_values(child, secret)]
    return [str(node)] if secret and node not in (None, "") else []


def _is_secret(key: Any) -> bool:
    return bool(SECRET_KEY_PATTERN.search(str(key)))


def redact_text(text: str, secrets: list[str]) -> str:
    for value in secrets:
        text = text.replace(value, REDACTED)
    return text


def redact_argv(argv: list[str], secrets: list[str]) -> list[str]:
    """`pipeline.args.api_token=X`, `--token=X` and `--token X` with X masked, plus any known secret."""
    out: list[str] = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and value and _is_secret(key):
            arg = f"{key}={REDACTED}"
        elif out and out[-1].startswith("-") and "=" not in out[-1] and _is_secret(out[-1]):
            arg = REDACTED
        out.append(redact_text(arg, secrets))
    return out


@contextlib.contextmanager
def argv_redacted(secrets: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = redact_argv(list(saved), secrets)
    try:
        yield
    finally:
        sys.argv = saved


class MaskedStream:
    """A text stream that writes everything with known secret values masked: what disttrain prints,
    logging, warnings and tracebacks alike (an exception quoting a token is printed with the token
    masked). Output written below Python (C++ libraries writing to fd 2) does not pass through it."""

    def __init__(self, stream: Any, secrets: list[str]):
        self.stream, self.secrets = stream, secrets

    def write(self, text: str) -> int:
        self.stream.write(redact_text(text, self.secrets))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def mask_output(secrets: list[str]) -> None:
    """Mask `secrets` in everything this process prints through sys.stdout and sys.stderr from now on
    (added to those already masked). Under SLURM stderr is a file in RUN_DIR/slurm/."""
    if not secrets:
        return
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, MaskedStream):
            stream.secrets = sorted(set(stream.secrets) | set(secrets), key=len, reverse=True)
        elif stream is not None:
            setattr(sys, name, MaskedStream(stream, list(secrets)))
