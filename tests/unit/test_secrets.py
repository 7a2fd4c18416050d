"""No credential from the environment and no config value under a secret key lands anywhere a run
writes: config.yaml, metrics, events, checkpoints, TensorBoard, wandb's offline files and logs, wandb's
own config and cache dirs, or the process output. The run is real (four segments: killed, failed,
stopped, finished; see writers_support), with WANDB_API_KEY, AWS_SECRET_ACCESS_KEY and HF_TOKEN
in its environment and `pipeline.args.api_token` on its command line.

(submitit's job files are covered by the cluster tests.)"""

from __future__ import annotations

import pytest
import yaml

from disttrain.secrets import REDACTED
from tests.unit.writers_support import CONFIG_SECRET, ENV_SECRETS, shared_run

SECRETS = [*ENV_SECRETS.values(), CONFIG_SECRET]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory.getbasetemp())


def test_planted_secrets_are_found_in_no_file(run):
    files = [
        p for root in (run.run_dir, run.home) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
    ]
    names = {p.name for p in files}
    assert {"config.yaml", "metrics.jsonl", "events.jsonl", "manifest.json", "debug-internal.log"} <= names
    assert any(n.endswith(".wandb") for n in names) and any(
        n.startswith("events.out.tfevents") for n in names
    )
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, f"a planted secret leaked into {path}"


def test_planted_secrets_are_not_in_the_output(run):
    assert len(run.outputs) == 4 and "Traceback" in run.outputs[1]  # even the failure's report
    for out in run.outputs:
        for secret in SECRETS:
            assert secret not in out


def test_the_secret_key_stays_visible_redacted(run):
    config = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert config["pipeline"]["args"] == {"step_delay": 0.02, "eval_delay": 0.08, "api_token": REDACTED}


def test_model_vocabulary_keys_are_not_taken_for_secrets():
    """`token` in a key names a credential (hf_token), not a vocabulary id (bos_token_id) or a tokenizer:
    an HF model's config must reach config.yaml as it is, or an export cannot rebuild the model."""
    from disttrain.config import dump_yaml, load_config

    cfg = load_config(overrides=[
        "pipeline.args.model.bos_token_id=0", "pipeline.args.model.pad_token_id=1", "pipeline.args.tokenizer=gpt2",
        "pipeline.args.max_new_tokens=8", "pipeline.args.hf_token=hf_abcdefgh12345678",
    ])  # fmt: skip
    args = yaml.safe_load(dump_yaml(cfg))["pipeline"]["args"]
    assert args["model"] == {"bos_token_id": 0, "pad_token_id": 1}
    assert args["tokenizer"] == "gpt2" and args["max_new_tokens"] == 8
    assert args["hf_token"] == REDACTED
