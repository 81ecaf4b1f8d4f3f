"""Where each webhook delivery of a job stands, for ``GetJob``: one record per job,
``deliveries.<job_id>`` in the ``laneway_webhooks`` bucket (kept 7 days, like the
bucket's other entries).

Why one record per job: ``GetJob`` reads it with a single get (no scan of the
deliveries stream or of keys), and only the webhook processes write it (the fan-out
when it queues deliveries, the delivery loop after each attempt), so nothing is added
to a job's own path. Writes are read-modify-write with compare-and-set: several
deliveries of one job may finish at the same moment, in this process (serialised by a
lock per job) or in another (a retry on conflict).

Bounded: at most ``MAX_ENTRIES`` deliveries a job (a webhook receiving every text
delta of a long stream would otherwise grow it without end); past it the oldest
finished ones make room. What is stored is already safe to show: the endpoint's URL
with credentials and query masked, and errors passed through ``redact_text``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace

import nats.js.errors
from nats.js.kv import KeyValue

from laneway.broker.core.redact import MASK, redact_text

__all__ = [
    "FINISHED",
    "MAX_ENTRIES",
    "DeliveryStatus",
    "StatusWriter",
    "read_statuses",
    "redact_endpoint",
    "status_key",
]

MAX_ENTRIES = 100
#: States a delivery does not leave by itself (a redelivery makes a dead letter pending).
FINISHED = frozenset({"delivered", "dead_lettered", "disabled"})
_MAX_ERROR = 200
_CAS_TRIES = 8
_LOCKS = 10_000
# A key never written, or deleted: nothing recorded.
_MISSING = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)


def status_key(job_id: str) -> str:
    return f"deliveries.{job_id}"


def redact_endpoint(url: str) -> str:
    """``url`` safe to show: user info and query string masked (either may hold a
    token, e.g. ``https://hooks.example.com/x?token=...``)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, MASK if parts.query else "", ""))


@dataclass(frozen=True, slots=True)
class DeliveryStatus:
    """One delivery (one event for one webhook), as last recorded."""

    webhook_id: str
    endpoint: str
    """The URL, redacted (``redact_endpoint``)."""
    source: str
    """``job`` or ``<route>#<index>``."""
    event_seq: int
    state: str
    """pending, delivered, retrying, dead_lettered or disabled."""
    attempts: int = 0
    last_status: int = 0
    last_error: str = ""
    last_attempt: float = 0.0
    """Unix time; 0 before the first attempt."""
    next_attempt: float = 0.0
    """Unix time, when retrying; else 0."""
    updated: float = 0.0

    @classmethod
    def new(
        cls, *, webhook_id: str, url: str, source: str, event_seq: int, state: str, **outcome: object
    ) -> DeliveryStatus:
        status = cls(
            webhook_id=webhook_id,
            endpoint=redact_endpoint(url),
            source=source,
            event_seq=event_seq,
            state=state,
            updated=time.time(),
        )
        return replace(status, **outcome) if outcome else status  # type: ignore[arg-type]

    def safe(self) -> DeliveryStatus:
        error = redact_text(self.last_error)
        return replace(self, last_error=error[:_MAX_ERROR]) if error != self.last_error else self


def _decode(data: bytes | None) -> dict[str, DeliveryStatus]:
    if not data:
        return {}
    try:
        raw = json.loads(data)
        return {key: DeliveryStatus(**value) for key, value in raw.items()}
    except (ValueError, TypeError):  # an unreadable record is replaced, never fatal
        return {}


def _encode(entries: dict[str, DeliveryStatus]) -> bytes:
    return json.dumps({k: asdict(v) for k, v in entries.items()}, separators=(",", ":")).encode()


def _bounded(entries: dict[str, DeliveryStatus]) -> dict[str, DeliveryStatus]:
    if len(entries) <= MAX_ENTRIES:
        return entries
    # Finished ones go first, oldest first; then the oldest of the rest.
    order = sorted(entries.values(), key=lambda s: (s.state not in FINISHED, s.updated))
    drop = {s.webhook_id for s in order[: len(entries) - MAX_ENTRIES]}
    return {k: v for k, v in entries.items() if k not in drop}


async def read_statuses(kv: KeyValue, job_id: str) -> list[DeliveryStatus]:
    """The job's deliveries in event order (one KV get; none recorded: empty)."""
    try:
        entry = await kv.get(status_key(job_id))
    except _MISSING:
        return []
    return sorted(_decode(entry.value).values(), key=lambda s: (s.event_seq, s.source, s.webhook_id))


class StatusWriter:
    """Records delivery states of many jobs; one per process that writes them."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.contextmanager
    def _pinned(self, job_id: str) -> Iterator[asyncio.Lock]:
        lock = self._locks.get(job_id)
        if lock is None:
            if len(self._locks) >= _LOCKS:  # drop idle locks: the dict stays bounded
                for key in [k for k, v in self._locks.items() if not v.locked()]:
                    del self._locks[key]
            lock = self._locks[job_id] = asyncio.Lock()
        yield lock

    async def record(
        self, job_id: str, statuses: Iterable[DeliveryStatus], *, only_new: bool = False
    ) -> None:
        """Store ``statuses`` of one job (each replacing its delivery's previous one;
        with ``only_new``, only for deliveries not recorded yet)."""
        wanted = [s.safe() for s in statuses]
        if not wanted:
            return
        key = status_key(job_id)
        with self._pinned(job_id) as lock:
            async with lock:
                for _ in range(_CAS_TRIES):
                    try:
                        entry = await self._kv.get(key)
                        entries, revision = _decode(entry.value), entry.revision or 0
                    except _MISSING:
                        entries, revision = {}, 0
                    before = dict(entries)
                    for status in wanted:
                        if not (only_new and status.webhook_id in entries):
                            entries[status.webhook_id] = status
                    if entries == before:
                        return
                    data = _encode(_bounded(entries))
                    try:
                        if revision:
                            await self._kv.update(key, data, last=revision)
                        else:
                            await self._kv.create(key, data)
                        return
                    except nats.js.errors.KeyWrongLastSequenceError:
                        continue  # another process wrote it meanwhile: read again
