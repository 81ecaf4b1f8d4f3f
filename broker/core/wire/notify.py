"""A job's webhooks <-> protobuf, and as the compact header written beside its events.

Pure: no IO. The header (``Laneway-Notify``) lets the webhook fan-out learn a job's
webhooks from the event stream alone, so nothing is added to the job path: no
lookup, no extra write (``laneway.broker.webhooks``).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from urllib.parse import urlsplit

from laneway.broker.core.model import Notify
from laneway.errors import InvalidArgument
from laneway.v1 import job_pb2

__all__ = [
    "MAX_NOTIFY",
    "MAX_NOTIFY_URL",
    "decode_notify",
    "encode_notify",
    "notify_from_pb",
    "notify_to_pb",
]

MAX_NOTIFY = 4
MAX_NOTIFY_URL = 2048

_EVENTS_FROM_PB = {
    job_pb2.NOTIFY_EVENTS_UNSPECIFIED: "final",
    job_pb2.NOTIFY_EVENTS_FINAL: "final",
    job_pb2.NOTIFY_EVENTS_STATE_CHANGES: "state_changes",
    job_pb2.NOTIFY_EVENTS_ALL: "all",
}
_EVENTS_TO_PB = {
    "final": job_pb2.NOTIFY_EVENTS_FINAL,
    "state_changes": job_pb2.NOTIFY_EVENTS_STATE_CHANGES,
    "all": job_pb2.NOTIFY_EVENTS_ALL,
}


def _bad(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{field}: {message}", field=field, reason="INVALID_FIELD")


def notify_from_pb(
    items: Sequence[job_pb2.Notify], field: str, secrets: Collection[str] | None
) -> tuple[Notify, ...]:
    """Validate submitted webhooks: http(s) URLs with a host, a known event set, and a
    secret name the config holds (``secrets``; None: not checked, for trusted input)."""
    if len(items) > MAX_NOTIFY:
        raise _bad(field, f"at most {MAX_NOTIFY} webhooks")
    out: list[Notify] = []
    for index, item in enumerate(items):
        f = f"{field}[{index}]"
        if not item.url:
            raise _bad(f"{f}.url", "required")
        if len(item.url) > MAX_NOTIFY_URL:
            raise _bad(f"{f}.url", f"at most {MAX_NOTIFY_URL} characters")
        try:
            parts = urlsplit(item.url)
            host = parts.hostname
        except ValueError:
            raise _bad(f"{f}.url", "not a valid URL") from None
        if parts.scheme not in ("http", "https"):
            raise _bad(f"{f}.url", "only http:// and https:// URLs are allowed")
        if not host or any(c.isspace() for c in item.url):
            raise _bad(f"{f}.url", "not a valid URL (no host)")
        if item.events not in _EVENTS_FROM_PB:
            raise _bad(f"{f}.events", f"unknown value {item.events}")
        if not item.secret:
            raise _bad(f"{f}.secret", "required: the name of a secret in webhooks.secrets")
        if secrets is not None and item.secret not in secrets:
            raise _bad(
                f"{f}.secret", f"no secret named {item.secret[:64]!r} in the config (webhooks.secrets)"
            )
        out.append(Notify(url=item.url, events=_EVENTS_FROM_PB[item.events], secret=item.secret))
    return tuple(out)


def notify_to_pb(items: Sequence[Notify], out: job_pb2.JobSpec) -> None:
    for item in items:
        out.notify.add(url=item.url, events=_EVENTS_TO_PB[item.events], secret=item.secret)


def encode_notify(items: Sequence[Notify]) -> str:
    """One header line (ASCII JSON) naming the webhooks."""
    return json.dumps([[n.url, n.events, n.secret] for n in items], separators=(",", ":"))


def decode_notify(value: str) -> tuple[Notify, ...]:
    """The header's webhooks; () when it is malformed (a fan-out never fails on it)."""
    try:
        data = json.loads(value)
        return tuple(Notify(url=str(u), events=str(e), secret=str(s)) for u, e, s in data)
    except (ValueError, TypeError):
        return ()
