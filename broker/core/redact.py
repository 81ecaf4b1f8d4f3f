"""Hiding credentials in text meant for people: logs, error messages, CLI output.

NATS URLs carry their credentials (``nats://user:password@host``, ``nats://token@host``),
and every process logs the URL it connects to, so each such line would leak them.
``redact_url`` is for the places that show a URL on purpose; ``redact_text`` is the
safety net the log pipeline runs over every string (an error message from a library
may quote a URL, and a new log line may forget to call ``redact_url``).
"""

from __future__ import annotations

import re

__all__ = ["MASK", "redact_text", "redact_url"]

MASK = "***"

# scheme://userinfo@ — the userinfo is "user:password" or a bare token (NATS's token auth).
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/@\s,\"']+)@")
# key=value and key: value pairs whose value is a credential ("token=abc", "nkey: SU...").
_SECRET_PAIR = re.compile(
    r"(?P<key>\b(?:[\w\-]*[_\-])?(?:password|passwd|pass|secret|token|api[_\-]?key|nkey|jwt|authorization)"
    r"[\"']?\s*[=:]\s*[\"']?)(?P<value>(?:bearer\s+)?[^\s\"',;&}]+)",
    re.IGNORECASE,
)
# NATS nkey seeds (S + type letter + base32) and user JWTs, wherever they appear.
_NKEY_SEED = re.compile(r"\bS[AOUNCPX][A-Z2-7]{54,}\b")
_NATS_JWT = re.compile(r"\beyJ[\w\-]+\.eyJ[\w\-]+\.[\w\-]+")
# Laneway API keys (``lw_<key_id>_<secret>``, ``laneway.broker.core.api_keys``): the id stays.
_API_KEY = re.compile(r"\b(?P<id>lw_[a-z0-9]{10}_)[\w\-]{16,}")


def _mask_userinfo(match: re.Match[str]) -> str:
    user, sep, _password = match["userinfo"].partition(":")
    # With a colon, the user name is not secret and helps to tell accounts apart.
    return f"{match['scheme']}{user}:{MASK}@" if sep else f"{match['scheme']}{MASK}@"


def redact_url(url: str) -> str:
    """``url`` (or a comma-separated list of URLs) with passwords and tokens masked:
    ``nats://app:***@host:4222``, ``nats://***@host:4222``."""
    return _URL_USERINFO.sub(_mask_userinfo, url)


def redact_text(text: str) -> str:
    """``text`` with URL credentials, ``password=...``/``token: ...``-like values, nkey
    seeds and JWTs masked; text without them is returned unchanged."""
    if "@" in text:
        text = _URL_USERINFO.sub(_mask_userinfo, text)
    text = _SECRET_PAIR.sub(lambda m: f"{m['key']}{MASK}", text)
    text = _NKEY_SEED.sub(MASK, text)
    if "lw_" in text:
        text = _API_KEY.sub(lambda m: f"{m['id']}{MASK}", text)
    return _NATS_JWT.sub(MASK, text)
