"""Secrets, in one place: which keys hold one, the values that must never be written or printed,
masking them in text, argv and the process output, and how they travel into a SLURM job.

A config value under a secret-looking key (SECRET_KEY_PATTERN) is redacted in everything a run writes
(config.yaml, wandb's config, submitit's job files); credential-looking environment variables and those
config values are masked in free text (events, tracebacks, logs). A submitted job carries its config
with the secrets redacted; the secret values travel in the job's environment ($DISTTRAIN_SECRET_OVERRIDES,
exported for the submission only), which sbatch copies into the job and into no file.

Stdlib only and below `config` (which redacts with it): the entry point masks its output before anything
heavy is imported. Functions that read a config take it as plain data or any dataclass instance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from disttrain.errors import ConfigError

# "token" names credentials (HF_TOKEN, api_token) but also model vocabulary ids and counts (bos_token_id,
# tokenizer, max_new_tokens): those are model config a from_pretrained export needs, never secrets.
SECRET_KEY_PATTERN = re.compile(
    r"(secret|token(?!s|izer|_?ids?\b|_type)|password|passwd|api[_-]?key|credential|private[_-]?key)", re.I
)
REDACTED = "***REDACTED***"
SECRETS_ENV = "DISTTRAIN_SECRET_OVERRIDES"  # JSON list of `key=value` overrides, read once by the job
MIN_MASKED_CHARS = 8  # shorter values are too common to mask in free text


def is_secret_key(key: Any) -> bool:
    return bool(SECRET_KEY_PATTERN.search(str(key)))


def redact_tree(node: Any) -> Any:
    """Plain config data with every non-empty value under a secret-looking key replaced by REDACTED."""
    if isinstance(node, dict):
        return {
            k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact_tree(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [redact_tree(v) for v in node]
    return node


# ------------------------------------------------------------------------------------- values


def secret_values(cfg: Any = None) -> list[str]:
    """Values that must never be written: those of credential-looking environment variables
    (WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, HF_TOKEN, ...) and config values under secret-looking keys,
    longest first (so a secret containing another is masked whole). `cfg`: a Config or plain data."""
    found = [value for name, value in os.environ.items() if is_secret_key(name)]
    if cfg is not None:
        found += _secret_config_values(_plain(cfg))
    return sorted({v for v in found if len(v) >= MIN_MASKED_CHARS}, key=len, reverse=True)


def _plain(cfg: Any) -> Any:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) else cfg


def _secret_config_values(node: Any, secret: bool = False) -> list[str]:
    if isinstance(node, dict):
        return [
            v for k, child in node.items() for v in _secret_config_values(child, secret or is_secret_key(k))
        ]
    if isinstance(node, list):
        return [v for child in node for v in _secret_config_values(child, secret)]
    return [str(node)] if secret and node not in (None, "") else []


# ------------------------------------------------------------------------------------- masking


def redact_text(text: str, secrets: list[str]) -> str:
    for value in secrets:
        text = text.replace(value, REDACTED)
    return text


def redact_argv(argv: list[str], secrets: list[str]) -> list[str]:
    """`pipeline.args.api_token=X`, `--token=X` and `--token X` with X masked, plus any known secret."""
    out: list[str] = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and value and is_secret_key(key):
            arg = f"{key}={REDACTED}"
        elif out and out[-1].startswith("-") and "=" not in out[-1] and is_secret_key(out[-1]):
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


# ------------------------------------------------------------------------------- job transport


def secret_overrides(data: dict[str, Any]) -> list[str]:
    """The secrets of plain (unredacted) config data as `key=value` overrides, JSON values (JSON is
    YAML: types survive the trip through the job's override parser)."""
    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if is_secret_key(key) and value not in (None, ""):
                    found.append(f"{prefix}{key}={json.dumps(value)}")
                else:
                    walk(value, f"{prefix}{key}.")

    walk(data, "")
    return found


def redacted_keys(data: dict[str, Any]) -> list[str]:
    """Dotted keys of plain config data whose value is the redaction marker: a secret that did not reach
    this process (a config.yaml given back to --config, a job whose environment lost its secrets)."""
    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif node == REDACTED:
            found.append(prefix.rstrip("."))

    walk(data, "")
    return found


@contextlib.contextmanager
def secrets_in_environment(secrets: list[str]) -> Iterator[None]:
    """Export the secret overrides for the duration of a submission: sbatch (and submitit's local
    executor) copy the submitting environment into the job, and nothing of it into job files."""
    old = os.environ.get(SECRETS_ENV)
    os.environ[SECRETS_ENV] = json.dumps(secrets)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SECRETS_ENV, None)
        else:
            os.environ[SECRETS_ENV] = old


def take_secrets() -> list[str]:
    """In the job: its secret overrides, removed from os.environ so child processes do not inherit them.
    Raises ConfigError when the variable is not what a submission exports."""
    text = os.environ.pop(SECRETS_ENV, "") or "[]"
    try:
        items = json.loads(text)
    except ValueError:
        raise ConfigError(f"{SECRETS_ENV} is not a JSON list; resubmit the job") from None
    if not isinstance(items, list):
        raise ConfigError(f"{SECRETS_ENV} is not a JSON list; resubmit the job")
    return [str(i) for i in items]
