"""API keys: their format, their hash and the record the ``laneway_keys`` bucket keeps.

A key is ``lw_<key_id>_<secret>``: the recognisable prefix lets secret scanners
find leaked keys, and the id is readable from the key so that looking one up is a
single KV read (``laneway_keys`` entry ``<key_id>``). The bucket keeps only the
key's SHA-256, never the key: it is shown once, when created. A secret of 32
random bytes needs no slow hash (nothing to brute-force), and a fast one keeps
every RPC cheap.

Roles are plain strings here (the core sits below the config, which names them).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import string
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

__all__ = [
    "KEY_ID_CHARS",
    "KEY_PREFIX",
    "ApiKeyRecord",
    "hash_key",
    "key_id_of",
    "matches",
    "new_key",
]

KEY_PREFIX = "lw_"
KEY_ID_CHARS = 10
_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_key() -> tuple[str, str]:
    """A fresh (key id, key). The key is shown once and never stored."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(KEY_ID_CHARS))
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str:
    """The id in a ``lw_<key_id>_<secret>`` key; "" when ``key`` does not have that form."""
    if not key.startswith(KEY_PREFIX):
        return ""
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    if not sep or not secret or len(key_id) != KEY_ID_CHARS or any(c not in _ID_ALPHABET for c in key_id):
        return ""
    return key_id


def hash_key(key: str) -> str:
    """SHA-256 of the key, hex: what the bucket and ``auth.static_keys`` keep."""
    return hashlib.sha256(key.encode()).hexdigest()


def matches(key_sha256: str, stored_sha256: str) -> bool:
    """Constant-time comparison of two hex digests."""
    return hmac.compare_digest(key_sha256.encode(), stored_sha256.encode())


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """One key as the bucket keeps it (JSON), without the key."""

    key_id: str
    tenant: str
    role: str
    sha256: str
    created: datetime
    expires: datetime | None = None
    revoked: bool = False

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires

    def to_json(self) -> bytes:
        body = asdict(self)
        body["created"] = self.created.isoformat()
        body["expires"] = self.expires.isoformat() if self.expires is not None else None
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ApiKeyRecord:
        body = json.loads(data)
        expires = body.get("expires")
        return cls(
            key_id=str(body["key_id"]),
            tenant=str(body["tenant"]),
            role=str(body["role"]),
            sha256=str(body["sha256"]),
            created=_aware(datetime.fromisoformat(body["created"])),
            expires=_aware(datetime.fromisoformat(expires)) if expires else None,
            revoked=bool(body.get("revoked", False)),
        )


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
