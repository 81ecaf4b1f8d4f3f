"""The API keys a broker accepts: the config's static keys and the ``laneway_keys`` bucket.

Static keys (``auth.static_keys``) are checked first: the key's SHA-256 against each
listed digest, in constant time. Then a ``lw_<key_id>_<secret>`` key is looked up
by its id in a cache of the bucket fed by a KV watch, so a key revoked on any
broker (or by ``laneway keys revoke``) is refused by every broker as soon as the
watch delivers it; an id the cache does not know yet (a key created a moment
ago) costs one KV read.

Errors say what is wrong (no key, unknown, revoked, expired) and name the key id
when there is one, never the key.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from laneway.broker.config.security import ROLES, AuthConfig
from laneway.broker.core import topology as t
from laneway.broker.core.api_keys import ApiKeyRecord, hash_key, key_id_of, matches
from laneway.broker.core.tasks import Background
from laneway.broker.server.principal import Principal
from laneway.errors import Unauthenticated, Unavailable

__all__ = ["KeyRing"]

log = structlog.get_logger("laneway.auth")


class KeyRing:
    """Looks API keys up; ``start`` follows the bucket, ``close`` stops."""

    def __init__(self, auth: AuthConfig, js: JetStreamContext | None = None) -> None:
        self._static = [
            (key_id, k.key_sha256, Principal(key_id, k.tenant, k.role))
            for key_id, k in auth.static_keys.items()
        ]
        self._js = js
        self._kv: KeyValue | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._watching = Background("laneway-keys-watch", Exception)
        self._cache: dict[str, tuple[int, ApiKeyRecord]] = {}
        self._loaded = asyncio.Event()

    async def __aenter__(self) -> KeyRing:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self, *, load_timeout_s: float = 5.0) -> None:
        if self._js is None:
            return
        self._kv = await self._js.key_value(t.KEYS_BUCKET)
        self._watcher = await self._kv.watchall()
        self._watching.start(self._follow(self._watcher))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._loaded.wait(), load_timeout_s)

    async def close(self) -> None:
        await self._watching.stop()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def authenticate(self, key: str) -> Principal:
        """The principal ``key`` stands for; ``Unauthenticated`` saying why when none."""
        if not key:
            raise Unauthenticated("no API key: send metadata 'authorization: Bearer <key>'")
        digest = hash_key(key)
        found: Principal | None = None
        for _, stored, principal in self._static:
            # Every static key is compared, so timing does not tell which one matched.
            if matches(digest, stored) and found is None:
                found = principal
        if found is not None:
            return found
        key_id = key_id_of(key)
        record = await self._record(key_id) if key_id else None
        if record is None or not matches(digest, record.sha256):
            raise Unauthenticated("unknown API key")
        if record.revoked:
            raise Unauthenticated(f"API key {key_id} was revoked")
        if record.expired(datetime.now(UTC)):
            assert record.expires is not None
            raise Unauthenticated(f"API key {key_id} expired at {record.expires.isoformat()}")
        if record.role not in ROLES:
            raise Unauthenticated(f"API key {key_id} has an unknown role")
        return Principal(key_id, record.tenant, record.role)

    async def _record(self, key_id: str) -> ApiKeyRecord | None:
        cached = self._cache.get(key_id)
        if cached is not None or self._kv is None:
            return cached[1] if cached is not None else None
        try:
            entry = await self._kv.get(key_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise Unavailable("API keys cannot be read now (NATS unreachable); retry") from exc
        if entry.value is None:
            return None
        self._apply(key_id, entry.revision or 0, entry.value)
        cached = self._cache.get(key_id)
        return cached[1] if cached is not None else None

    def _apply(self, key_id: str, rev: int, value: bytes | None, *, deleted: bool = False) -> None:
        current = self._cache.get(key_id)
        if current is not None and current[0] >= rev:
            return
        if deleted or not value:
            self._cache.pop(key_id, None)
            return
        try:
            self._cache[key_id] = (rev, ApiKeyRecord.from_json(value))
        except (ValueError, TypeError, KeyError) as exc:
            self._cache.pop(key_id, None)
            log.warning("unreadable API key record", key_id=key_id, error=repr(exc))

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # the watcher's marker: the initial values are all in
                self._loaded.set()
                continue
            deleted = entry.operation in (KV_DEL, KV_PURGE)
            self._apply(entry.key, entry.revision or 0, entry.value, deleted=deleted)
