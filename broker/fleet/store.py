"""A process's view of the ``laneway_providers`` KV bucket, and compare-and-set on it.

Workers' limiters change provider state through it; brokers only read it (for
``GetProviderHealth``, ``GetStats`` and the ``when_all_down: fail`` check).

The cache is fed by a KV watch (an ordered consumer, so only stored values
arrive: a write that loses its compare-and-set is never seen) and by this
process's own successful writes; revisions keep it from going backwards. A
change is computed from the cached state and written against the cached
revision; on conflict the key is re-read and the change recomputed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TypeVar

import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from laneway.broker.core import topology as t
from laneway.broker.core.tasks import Background
from laneway.broker.fleet.call_window import CallWindow
from laneway.broker.fleet.circuit import CircuitState
from laneway.broker.fleet.shares import ShareState
from laneway.broker.fleet.state import (
    LimitState,
    decode_calls,
    decode_circuit,
    decode_limit,
    decode_share,
    encode_state,
)

__all__ = ["ProviderStateStore"]

log = structlog.get_logger("laneway.limiter")

S = TypeVar("S", LimitState, CircuitState, ShareState, CallWindow)
State = LimitState | CircuitState | ShareState | CallWindow
R = TypeVar("R")

_CAS_TRIES = 12


class ProviderStateStore:
    """Cached, watched provider states with compare-and-set updates."""

    def __init__(self, js: JetStreamContext, clock: Callable[[], float] = time.time) -> None:
        self._js = js
        self.clock = clock
        self._kv: KeyValue | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._watching = Background("laneway-provider-state-watch", Exception)
        self._cache: dict[str, tuple[int, State]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._loaded = asyncio.Event()

    async def start(self, *, load_timeout_s: float = 5.0, setup_timeout_s: float = 30.0) -> None:
        """Follow the bucket; returns once its current values are in (or after
        ``load_timeout_s``, serving meanwhile: missing keys read as fresh state).

        Opening the watch is retried for up to ``setup_timeout_s``: on a NATS cluster
        just after a node loss, creating its consumer times out until the bucket's
        stream has settled its leader, and a process starting then should wait, not fail."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + setup_timeout_s
        delay = 0.1
        while True:
            try:
                self._kv = await self._js.key_value(t.PROVIDERS_BUCKET)
                self._watcher = await self._kv.watchall()
                break
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as err:
                if loop.time() + delay >= give_up:
                    raise
                log.info("provider state bucket not ready; retrying", error=type(err).__name__)
                await asyncio.sleep(delay)  # back off while the bucket's stream elects a leader
                delay = min(delay * 2, 2.0)
        self._watching.start(self._follow(self._watcher))
        try:
            await asyncio.wait_for(self._loaded.wait(), load_timeout_s)
        except TimeoutError:
            log.warning("provider state not loaded in time; serving while it loads")

    async def close(self) -> None:
        await self._watching.stop()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever any provider's state changes (any process's write)."""
        self._listeners.append(listener)

    def states(self) -> dict[str, State]:
        """Every known key's latest state."""
        return {key: state for key, (_, state) in self._cache.items()}

    def apply(self, key: str, rev: int, value: bytes | None, *, deleted: bool = False) -> None:
        """Record one bucket entry (public so tests can replay entries without a server)."""
        if deleted or not value:
            self._cache.pop(key, None)
            return
        try:
            self._store(key, rev, _decode(key, value))
        except (ValueError, TypeError, KeyError) as exc:
            # A newer worker's format this process cannot read: keep serving the rest.
            self._cache.pop(key, None)
            log.warning("unreadable provider state", key=key, error=repr(exc))

    def cached(self, key: str, kind: type[S]) -> S | None:
        entry = self._cache.get(key)
        return entry[1] if entry is not None and isinstance(entry[1], kind) else None

    async def change(
        self,
        key: str,
        fresh: Callable[[], S],
        change: Callable[[S, float], tuple[S | None, R]],
        failed: R,
    ) -> R:
        """Apply ``change`` to ``key``'s state with compare-and-set; ``failed`` if the
        store stays contended or unreachable (the caller then acts as if refused)."""
        assert self._kv is not None
        for _ in range(_CAS_TRIES):
            cached = self._cache.get(key)
            template = fresh()
            if cached is not None and isinstance(cached[1], type(template)):
                rev, state = cached[0], cached[1]
            else:
                rev, state = (cached[0] if cached is not None else 0), template
            new, result = change(state, self.clock())
            if new is None or new is state:
                return result
            data = encode_state(new)
            try:
                if rev:
                    rev = await self._kv.update(key, data, last=rev)
                else:
                    rev = await self._kv.create(key, data)
            except nats.js.errors.KeyWrongLastSequenceError:
                await self._reload(key)
                continue
            except (nats.errors.Error, OSError) as exc:
                log.warning("provider state write failed", key=key, error=str(exc))
                return failed
            self._store(key, rev, new)
            return result
        log.warning("provider state contended; giving up this change", key=key)
        return failed

    async def _reload(self, key: str) -> None:
        assert self._kv is not None
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            self._cache.pop(key, None)
            return
        if entry.value is not None and entry.revision is not None:
            self._store(key, entry.revision, _decode(key, entry.value))

    def _store(self, key: str, rev: int, state: State) -> None:
        cached = self._cache.get(key)
        if cached is not None and cached[0] >= rev:
            return
        self._cache[key] = (rev, state)
        for listener in self._listeners:
            listener()

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # the watcher's marker: the initial values are all in
                self._loaded.set()
                continue
            deleted = entry.operation in (KV_DEL, KV_PURGE)
            self.apply(entry.key, entry.revision or 0, entry.value, deleted=deleted)


def _decode(key: str, value: bytes) -> State:
    if key.startswith("circuit."):
        return decode_circuit(value)
    if key.startswith("share."):
        return decode_share(value)
    if key.startswith("calls."):
        return decode_calls(value)
    return decode_limit(value)
