"""Inline subscriptions (``laneway.broker.core.nats.inline``) against a real nats-server:
the message a handler gets is the one nats-py builds, a failing handler or a screen
that says no drops only that message, and an unsubscribed handler gets nothing;
and one-reply requests on a shared inbox resolve, time out and close as they should."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import pytest
from nats.aio.msg import Msg

from laneway.broker.cli.natsd import EmbeddedNats
from laneway.broker.core.nats.connection import FastHeaderClient
from laneway.broker.core.nats.inbox import ReplyMux
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


# --- one-reply requests on a shared inbox (ReplyMux.one_reply) -------------------------


async def test_one_reply_resolves_times_out_and_survives_a_caller_that_gave_up(
    inline_nc: FastHeaderClient,
) -> None:
    mux = ReplyMux(inline_nc)
    await mux.start()
    try:
        # Answered: the future gets the reply, whichever order the answers come in.
        echo = await inline_nc.subscribe("echo", cb=_echo(inline_nc))
        futures = []
        for i in range(3):
            reply, future = mux.one_reply(5.0)
            futures.append(future)
            await inline_nc.publish("echo", str(i).encode(), reply=reply)
        assert [(await f).data for f in futures] == [b"0", b"1", b"2"]

        # Unanswered: each times out after its own timeout (a short one is not held
        # up by a longer one asked for first).
        loop = asyncio.get_running_loop()
        _, slow = mux.one_reply(30.0)
        started = loop.time()
        _, fast = mux.one_reply(0.2)
        with pytest.raises(TimeoutError):
            await fast
        # Not held up by the 30 s one: the upper bound leaves room for a loaded CI machine.
        assert 0.2 <= loop.time() - started < 5.0
        assert not slow.done()

        # A caller that gives up (cancels) leaves nothing to break: its late answer is
        # dropped, and later requests are answered as before.
        reply, abandoned = mux.one_reply(5.0)
        abandoned.cancel()
        await inline_nc.publish("echo", b"late", reply=reply)
        reply, future = mux.one_reply(5.0)
        await inline_nc.publish("echo", b"after", reply=reply)
        assert (await future).data == b"after"
        # A whole request: answered; nobody listening (503, as nats-py reports it); silent.
        assert (await mux.request("echo", b"ping", timeout=5.0)).data == b"ping"
        await echo.unsubscribe()
        nobody = await mux.request("nobody.listens", b"", timeout=5.0)
        assert nobody.headers is not None and nobody.headers.get("Status") == "503"
        silent = await inline_nc.subscribe("silent")
        with pytest.raises(TimeoutError):
            await mux.request("silent", b"", timeout=0.1)
        await silent.unsubscribe()
    finally:
        await mux.close()
    # Closing fails what still waits at once, rather than at its deadline.
    assert slow.done() and isinstance(slow.exception(), TimeoutError)


def _echo(nc: FastHeaderClient) -> Callable[[Msg], Awaitable[None]]:
    async def answer(msg: Msg) -> None:
        await nc.publish(msg.reply, msg.data)

    return answer
