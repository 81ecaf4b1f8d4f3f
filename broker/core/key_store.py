"""Creating, listing and revoking API keys in the ``laneway_keys`` bucket.

Operator commands (``laneway keys``) and tests write here; brokers only read and
watch the bucket (``laneway.broker.server.keyring``). A revoke keeps the record
(revoked, so ``keys list`` still shows it and every broker's watch sees it)
instead of deleting it.
"""

from __future__ import annotations

from datetime import datetime

import nats.js.errors
from nats.js import JetStreamContext

from laneway.broker.core import topology as t
from laneway.broker.core.api_keys import ApiKeyRecord, hash_key, new_key
from laneway.broker.core.model import utcnow

__all__ = ["UnknownKey", "create_key", "list_keys", "revoke_key"]


class UnknownKey(LookupError):
    """No key with that id in the bucket."""


async def create_key(
    js: JetStreamContext, *, tenant: str, role: str, expires: datetime | None = None
) -> tuple[ApiKeyRecord, str]:
    """A new key for ``tenant`` with ``role``: its record (stored) and the key (not stored)."""
    kv = await js.key_value(t.KEYS_BUCKET)
    while True:
        key_id, key = new_key()
        record = ApiKeyRecord(
            key_id=key_id,
            tenant=tenant,
            role=role,
            sha256=hash_key(key),
            created=utcnow(),
            expires=expires,
        )
        try:
            await kv.create(key_id, record.to_json())
        except nats.js.errors.KeyWrongLastSequenceError:
            continue  # that id is taken (one chance in 36**10): draw another
        return record, key


async def list_keys(js: JetStreamContext) -> list[ApiKeyRecord]:
    """Every key's record, oldest first (none when the bucket does not exist yet)."""
    try:
        kv = await js.key_value(t.KEYS_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        return []
    try:
        ids = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    records = []
    for key_id in ids:
        try:
            entry = await kv.get(key_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            continue
        if entry.value:
            records.append(ApiKeyRecord.from_json(entry.value))
    return sorted(records, key=lambda r: (r.created, r.key_id))


async def revoke_key(js: JetStreamContext, key_id: str) -> ApiKeyRecord:
    """Mark the key revoked (compare-and-set on its revision); ``UnknownKey`` when there is none."""
    try:
        kv = await js.key_value(t.KEYS_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        raise UnknownKey(key_id) from None
    while True:
        try:
            entry = await kv.get(key_id)
        except (
            nats.js.errors.KeyNotFoundError,
            nats.js.errors.KeyDeletedError,
            nats.js.errors.InvalidKeyError,
        ):
            raise UnknownKey(key_id) from None
        if not entry.value:
            raise UnknownKey(key_id)
        current = ApiKeyRecord.from_json(entry.value)
        revoked = ApiKeyRecord(
            key_id=current.key_id,
            tenant=current.tenant,
            role=current.role,
            sha256=current.sha256,
            created=current.created,
            expires=current.expires,
            revoked=True,
        )
        try:
            await kv.update(key_id, revoked.to_json(), last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            continue
        return revoked
