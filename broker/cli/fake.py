"""``laneway fake-provider``: the fake OpenAI/Anthropic HTTP provider as a server,
for offline demos and for pointing real adapters at something that fails on cue."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from laneway.workers.fakes.server import FakeProviderSettings

__all__ = ["fake_provider", "parse_error_rates"]


def parse_error_rates(items: list[str]) -> dict[int, float]:
    """``["503=0.05", "429=0.01"]`` -> ``{503: 0.05, 429: 0.01}`` (BadParameter naming the option)."""
    rates: dict[int, float] = {}
    for item in items:
        status, sep, rate = item.partition("=")
        try:
            if not sep:
                raise ValueError
            rates[int(status)] = float(rate)
        except ValueError:
            raise typer.BadParameter(
                f"expected STATUS=RATE such as 503=0.05, got {item!r}", param_hint="'--error-rate'"
            ) from None
    return rates


async def _serve(settings: FakeProviderSettings) -> None:
    # Imported here so other commands do not pay for aiohttp.
    from laneway.workers.fakes.server import FakeProvider

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    async with FakeProvider(settings) as fake:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            typer.echo(fake.base_url)
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def fake_provider(
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one).", min=0, max=65535)] = 8080,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    rpm: Annotated[int, typer.Option(help="Requests per minute before 429s (0: unlimited).", min=0)] = 0,
    tpm: Annotated[int, typer.Option(help="Tokens per minute before 429s (0: unlimited).", min=0)] = 0,
    latency_ms: Annotated[float, typer.Option(help="Mean latency per call, in ms.", min=0)] = 0,
    latency_jitter_ms: Annotated[float, typer.Option(help="Uniform +/- latency jitter, in ms.", min=0)] = 0,
    token_delay_ms: Annotated[float, typer.Option(help="Delay per streamed token, in ms.", min=0)] = 0,
    error_rate: Annotated[
        list[str] | None,
        typer.Option(
            help="STATUS=RATE: share of calls failing with that status, e.g. 503=0.05 (repeatable)."
        ),
    ] = None,
    api_key_env: Annotated[
        str, typer.Option(help="Environment variable holding the API key requests must carry.")
    ] = "",
    output: Annotated[
        str, typer.Option(help="Chat output: 'echo' (the last user message) or a text.")
    ] = "echo",
) -> None:
    """Run a fake OpenAI/Anthropic provider over HTTP; prints its base URL, stops on Ctrl-C.

    Its calls and counters are at GET /_laneway/stats and /_laneway/calls?after=SEQ;
    POST /_laneway/control changes error rates or latency, or scripts the next answers,
    e.g. {"script": [{"status": 429, "retry_after_s": 5}]}.
    """
    from laneway.workers.fakes.server import FakeProviderSettings

    api_key = ""
    if api_key_env:
        api_key = os.environ.get(api_key_env, "")
        if not api_key:
            raise typer.BadParameter(
                f"environment variable {api_key_env} is not set", param_hint="'--api-key-env'"
            )
    rates = parse_error_rates(error_rate or [])
    try:
        settings = FakeProviderSettings(
            host=host,
            port=port,
            rpm=rpm,
            tpm=tpm,
            latency_ms=latency_ms,
            latency_jitter_ms=latency_jitter_ms,
            token_delay_ms=token_delay_ms,
            error_rates=rates,
            api_key=api_key,
            output=output,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="'--error-rate'" if rates else None) from None
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(settings))
    except OSError as err:
        typer.echo(f"error: cannot listen on {host}:{port}: {err.strerror or err}", err=True)
        raise typer.Exit(2) from None
