"""Secrets in configs are found by key name and env mapping, and written as *** (config/secrets.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from matrix_hpc.config.hydra_secrets import redact_override
from matrix_hpc.config.secrets import REDACTED, is_secret_key, redact, redact_text, redacted_yaml

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@pytest.mark.parametrize("key", ["HF_TOKEN", "api_key_env", "OPENAI_API_KEY", "db_password", "client-secret",
                                 "auth_header", "aws_secret_access_key", "private_key", "token"])
def test_keys_that_name_a_secret(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["max_tokens", "output_tokens", "sticky_max_keys", "model", "key", "monkey",
                                 "tokenizer", "author"])
def test_keys_that_do_not(key: str) -> None:
    assert not is_secret_key(key)


def test_redact_keeps_numbers_and_structure_and_catches_copies() -> None:
    data = {"llm": {"sim": {"time_per_output_token_s": 0.002, "output_tokens": 64},
                    "openai": {"api_key_env": "OPENAI_API_KEY", "model": "gpt"}},
            "sandbox": {"env": {"HF_HOME": "/data/hf", "HF_TOKEN": "hf_canary_1234"}},
            "workflow": {"note": "hf_canary_1234", "tools": [{"password": "pw-canary-99"}, "plain"]}}
    out = redact(data)
    assert out["llm"]["sim"] == {"time_per_output_token_s": 0.002, "output_tokens": 64}
    assert out["llm"]["openai"] == {"api_key_env": REDACTED, "model": "gpt"}
    assert out["sandbox"]["env"] == {"HF_HOME": REDACTED, "HF_TOKEN": REDACTED}  # every env value
    assert out["workflow"] == {"note": REDACTED, "tools": [{"password": REDACTED}, "plain"]}
    assert data["sandbox"]["env"]["HF_TOKEN"] == "hf_canary_1234"  # a copy; the input is untouched


def test_redact_text_and_overrides() -> None:
    assert redact_text("x=hf_canary_1234 y=abc", ["hf_canary_1234", "abc"]) == "x=*** y=abc"  # short ones stay
    assert redact_override("+sandbox.env.HF_TOKEN=hf_x") == "+sandbox.env.HF_TOKEN=***"
    assert redact_override("llm.openai.api_key_env=MY_KEY") == "llm.openai.api_key_env=***"
    assert redact_override("run.max_tokens=12") == "run.max_tokens=12"
    assert redact_override("workflow=coral") == "workflow=coral"


def _compose(*overrides: str) -> object:
    from matrix_hpc.cli.config_check import compose
    from matrix_hpc.config.schema import register_configs

    register_configs()
    return compose(["dataset.path=in.jsonl", "output.dir=out", *overrides], CONF_DIR)


def test_a_config_without_secrets_is_written_as_before() -> None:
    cfg = _compose()  # llm=none, sandbox=disabled: nothing secret
    assert redacted_yaml(cfg) == OmegaConf.to_yaml(cfg, resolve=True)


def test_a_composed_config_with_a_canary_is_written_redacted() -> None:
    cfg = _compose("llm=openai", "sandbox=bwrap", "+sandbox.env.HF_TOKEN=hf_canary_1234")
    text = redacted_yaml(cfg)
    assert "hf_canary_1234" not in text and "OPENAI_API_KEY" not in text
    written = OmegaConf.create(text)
    assert written.sandbox.env.HF_TOKEN == REDACTED and written.llm.openai.api_key_env == REDACTED
    assert written.llm.openai.model == cfg.llm.openai.model  # everything else as it was
