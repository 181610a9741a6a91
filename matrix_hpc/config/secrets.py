"""Secrets in configs: find them, and write configs with them as ``***``.

A value is secret when its key names one (a word of the key is ``token``,
``password``, ``secret``, ``credential``, ``auth``, or the key says
``api_key`` / ``private_key`` / ``access_key``) or when it is an
environment variable's value (any mapping under a key named ``env``,
``env_vars`` or ``environment``, e.g. ``sandbox.env``): secrets usually
reach a tool through the environment, and an env value is never worth
the risk of storing. Only strings are redacted, so counts and times whose
names mention tokens (``max_tokens``, ``time_per_output_token_s``) stay.

    >>> redact({"llm": {"openai": {"api_key_env": "MY_KEY"}}, "sandbox": {"env": {"HF_TOKEN": "hf_x"}}})
    {'llm': {'openai': {'api_key_env': '***'}}, 'sandbox': {'env': {'HF_TOKEN': '***'}}}

Any other string equal to a secret found this way (an interpolation that
copied it) is redacted too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "***"
#: Words of a key (split at '_', '-', '.') that make its value secret.
SECRET_WORDS = frozenset({"token", "password", "passwd", "passphrase", "secret", "secrets", "credential",
                          "credentials", "auth", "apikey", "cookie"})
#: Adjacent word pairs that make a value secret ("api_key", "private-key").
SECRET_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key"), ("secret", "key")})
#: Keys whose mapping holds environment variables: every value is redacted.
ENV_KEYS = frozenset({"env", "env_vars", "environment"})
#: Shorter strings are not looked for elsewhere in the config (too likely to match by chance).
MIN_SECRET_CHARS = 6


def is_secret_key(key: Any) -> bool:
    """True if a config key names a secret (``HF_TOKEN``, ``api_key_env``, ``db.password``)."""
    words = [w for w in re.split(r"[^a-z0-9]+", str(key).lower()) if w]
    pairs = zip(words, words[1:], strict=False)
    return bool(SECRET_WORDS.intersection(words)) or any(pair in SECRET_PAIRS for pair in pairs)


def redact(data: Any) -> Any:
    """A copy of a plain config tree (dicts, lists, scalars) with secret strings as ``***``."""
    found = set(secret_values(data))
    return _replace(data, found, secret=False)


def secret_values(data: Any, secret: bool = False) -> Iterable[str]:
    """Every string value of ``data`` that counts as secret (see the module doc)."""
    if isinstance(data, dict):
        for key, value in data.items():
            yield from secret_values(value, secret or is_secret_key(key) or str(key) in ENV_KEYS)
    elif isinstance(data, (list, tuple)):
        for value in data:
            yield from secret_values(value, secret)
    elif secret and isinstance(data, str) and data:
        yield data


def _replace(data: Any, found: set[str], secret: bool) -> Any:
    if isinstance(data, dict):
        return {k: _replace(v, found, secret or is_secret_key(k) or str(k) in ENV_KEYS) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_replace(v, found, secret) for v in data]
    if isinstance(data, str) and data and (secret or (len(data) >= MIN_SECRET_CHARS and data in found)):
        return REDACTED
    return data


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret (of at least MIN_SECRET_CHARS) replaced by ``***``."""
    for value in sorted({s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


def redacted_yaml(cfg: Any) -> str:
    """YAML of an OmegaConf config (resolved) with its secrets as ``***``.

    Byte-identical to ``OmegaConf.to_yaml(cfg, resolve=True)`` when the
    config holds no secret, so recorded configs of earlier runs still match.
    """
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if not any(True for _ in secret_values(plain)):
        return OmegaConf.to_yaml(cfg, resolve=True)
    return OmegaConf.to_yaml(OmegaConf.create(redact(plain)))
