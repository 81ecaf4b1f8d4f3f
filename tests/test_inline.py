"""Inline subscriptions (``laneway.broker.core.nats.inline``) against a real nats-server:
the message a handler gets is the one nats-py builds, a failing handler or a screen
that says no drops only that message, and an unsubscribed handler gets nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import nats
import pytest
from nats.aio.msg import Msg

from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.core.nats.connection import FastHeaderClient
from laneway.broker.core.nats.inline import raw_header, subscribe_inline

from .conftest import eventually


@pytest.fixture
async def inline_nc(nats_server: EmbeddedNats) -> AsyncIterator[FastHeaderClient]:
    nc = FastHeaderClient()
    await nc.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.close()


async def _until(predicate: Callable[[], bool]) -> None:
    async def check() -> bool:
        return predicate()

    await eventually(check, interval=0.005)


async def test_inline_message_is_what_nats_py_builds(inline_nc: FastHeaderClient, nats_server) -> None:
    pub = await nats.connect(nats_server.url)
    try:
        plain: list[Msg] = []
        inline: list[Msg] = []

        async def collect(msg: Msg) -> None:
            plain.append(msg)

        await pub.subscribe("t.>", cb=collect)
        await subscribe_inline(inline_nc, "t.>", inline.append)
        await inline_nc.flush()
        await pub.flush()
        headers = {"Laneway-State": "SUCCEEDED", "Laneway-Seq": "7", "X": " spaced "}
        await pub.publish("t.a", b"one", reply="r.1", headers=headers)
        await pub.publish("t.b", b"")
        # A status reply (no responders: "NATS/1.0 503") goes through the same parser.
        await subscribe_inline(inline_nc, "t.inbox.inline", inline.append)
        await pub.subscribe("t.inbox.plain", cb=collect)
        await inline_nc.flush()
        await pub.flush()
        await inline_nc.publish("nobody.listens", b"", reply="t.inbox.inline", headers={"A": "1"})
        await pub.publish("nobody.listens", b"", reply="t.inbox.plain", headers={"A": "1"})
        await _until(lambda: len(inline) == 3 and len(plain) == 3)
        assert inline[2].headers is not None and inline[2].headers.get("Status") == "503"
        inline[2].subject = plain[2].subject = "(inbox)"
        for a, b in zip(inline, plain, strict=True):
            assert (a.subject, a.reply, a.data, a.headers) == (b.subject, b.reply, b.data, b.headers)
        assert inline[0].headers is not None and inline[0].headers["Laneway-Seq"] == "7"
    finally:
        await pub.close()


async def test_screen_and_failing_handler_drop_only_their_message(inline_nc: FastHeaderClient) -> None:
    got: list[str] = []
    screened: list[bytes | None] = []

    def screen(subject: bytes, headers: bytes) -> bool:
        screened.append(raw_header(headers, b"Laneway-State"))
        return not subject.endswith(b".skip")

    def handler(msg: Msg) -> None:
        if msg.subject.endswith(".boom"):
            raise RuntimeError("handler bug")
        got.append(msg.subject)

    sub = await subscribe_inline(inline_nc, "s.>", handler, screen)
    for name in ("first", "skip", "boom", "last"):
        await inline_nc.publish(f"s.{name}", b"x", headers={"Laneway-State": name.upper()})
    await _until(lambda: got == ["s.first", "s.last"])
    assert screened == [b"FIRST", b"SKIP", b"BOOM", b"LAST"]
    # The connection's read loop survived the handler's exception: it still answers.
    await inline_nc.flush(timeout=5)

    await sub.unsubscribe()
    assert sub._id not in inline_nc._inline
    await inline_nc.publish("s.after", b"x")
    await inline_nc.flush(timeout=5)
    assert got == ["s.first", "s.last"]


def test_raw_header_reads_one_value() -> None:
    raw = b"NATS/1.0\r\nNats-Subject: a.b\r\nLaneway-Seq:  12 \r\nLaneway-State: RUNNING\r\n\r\n"
    assert raw_header(raw, b"Laneway-Seq") == b"12"
    assert raw_header(raw, b"Laneway-State") == b"RUNNING"
    assert raw_header(raw, b"Laneway-Job-Id") is None
    assert raw_header(b"", b"Laneway-Seq") is None
