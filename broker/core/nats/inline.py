"""Subscriptions handled inline, in the connection's read loop.

nats-py hands each message of a subscription with a callback to a task of its own
through a queue, then awaits the callback: a queue put, a task switch and a
coroutine per message. The broker's live feed and the reply inboxes take several
messages per job (every event of every job, every acknowledgement and read), and
their handlers only route the message to a queue or a future: the hop was a
measurable share of a process's CPU. An inline subscription calls a plain function
from the read loop instead, with the message built by nats-py's own code (same
headers, same status parsing).

An inline handler must not block or await; an exception it raises is logged and
the message dropped, never the connection's read loop. A ``screen`` may look at
the raw subject and headers first and say whether the message is wanted at all, so
messages nobody waits for are not even parsed.

On a client that is not a ``InlineClient`` (a test's plain ``nats.connect``), the
same handlers run from an ordinary callback subscription.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["InlineClient", "OnMsg", "Screen", "raw_header", "subscribe_inline"]

log = structlog.get_logger("laneway.nats")

OnMsg = Callable[[Msg], None]
"""Called with each wanted message, in the read loop."""
Screen = Callable[[bytes, bytes], bool]
"""Called with a message's raw subject and headers (b"" without): whether ``OnMsg`` wants it."""

_HDR_LINE = b"NATS/1.0"


def raw_header(raw: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` in a message's raw header block (``NATS/1.0`` line
    first), stripped; None when it has none. For headers Laneway writes itself (one
    spelling, one value each): nats-py's full parse is the reference for the rest."""
    start = raw.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += 3 + len(name)
    end = raw.find(b"\r\n", start)
    return raw[start : end if end >= 0 else len(raw)].strip()


class InlineClient(NatsClient):
    """nats-py's client with inline subscriptions (``subscribe_inline``)."""

    def __init__(self) -> None:
        super().__init__()
        self._inline: dict[int, tuple[Screen | None, OnMsg]] = {}

    async def subscribe_inline(
        self, subject: str, on_msg: OnMsg, screen: Screen | None = None
    ) -> Subscription:
        # Without a callback nats-py starts no task; every message is taken below first.
        sub = await self.subscribe(subject)
        self._inline[sub._id] = (screen, on_msg)
        return sub

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._inline.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        inline = self._inline.get(sid)
        if inline is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        screen, on_msg = inline
        try:
            if screen is not None and not screen(subject, headers or b""):
                return
            msg = self._build_message(sid, subject, reply, data, await self._process_headers(headers))
            on_msg(msg)
        except Exception:
            log.exception("inline message handler failed", subject=subject.decode(errors="replace"))


async def subscribe_inline(
    nc: NatsClient, subject: str, on_msg: OnMsg, screen: Screen | None = None
) -> Subscription:
    """Subscribe ``on_msg`` (after ``screen``) to ``subject``: inline on an
    ``InlineClient``, else through an ordinary callback subscription."""
    if isinstance(nc, InlineClient):
        return await nc.subscribe_inline(subject, on_msg, screen)

    async def callback(msg: Msg) -> None:
        if screen is None or screen(msg.subject.encode(), _raw_headers(msg)):
            on_msg(msg)

    return await nc.subscribe(subject, cb=callback)


def _raw_headers(msg: Msg) -> bytes:
    if not msg.headers:
        return b""
    lines = b"".join(f"{k}: {v}\r\n".encode() for k, v in msg.headers.items())
    return _HDR_LINE + b"\r\n" + lines + b"\r\n"
